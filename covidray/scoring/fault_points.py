"""Named points in a scoring run where a test makes the run fail as a real fault would
(a kill, an outage, a lost result), without patching the code under test.

A point is a call, ``reached("name", **what)``, that does nothing unless a test armed it
with :func:`armed`; the hook it armed then runs with the point's values, and may raise (the
run dies there) or change a mutable value it is handed. The points:

``scoring.snapshot_taken`` (``archive``)
    the run has read its index snapshot; nothing is scored yet.
``scoring.part_written`` (``part``)
    the driver has written a result part; the run goes on scoring.
``scoring.results_counted`` (``counts``)
    every result batch is written; ``counts`` is about to be reconciled.
``scoring.part_committed`` (``summary``)
    a nightly run's part has its marker; ``_CURRENT.json`` is not written yet.
"""

from __future__ import annotations

from contextlib import contextmanager

_ARMED: dict = {}


def reached(point: str, **values) -> None:
    """The run is at ``point``: run the hook armed there, if any."""
    hook = _ARMED.get(point)
    if hook is not None:
        hook(**values)


@contextmanager
def armed(point: str, hook):
    """Within the block, ``hook(**values)`` runs whenever the run reaches ``point``."""
    _ARMED[point] = hook
    try:
        yield
    finally:
        _ARMED.pop(point, None)
