"""A scoring run's record, typed: what made a result, what a nightly view holds, the counts
a run keeps while it writes, and the summary it publishes.

Each JSON file has one writer and one reader here (``to_json`` / ``from_json``), and their
fields are the ones docs/outputs.md documents:

- ``run.json`` of every result and run part: :class:`RunIdentity`;
- ``_SUCCESS.json``, a whole run's ready marker and ``_CURRENT.json``'s ``last_run``:
  :class:`RunSummary`;
- ``_CURRENT.json``'s identity (archive, model, digest, views, threshold): :class:`ViewIdentity`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass(frozen=True)
class RunIdentity:
    """Which run, with which model, made a result (``run.json``): a nightly run adopts a
    killed run's part only when the same model made it."""

    run: str
    model: str
    model_digest: str

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "RunIdentity":
        return cls(data["run"], data["model"], data["model_digest"])


@dataclass(frozen=True)
class ViewIdentity:
    """What a nightly view holds: one model's results over one archive, under one ``--views``
    policy, at one operating threshold, under one site card's calibration map
    (``calibration``: its digest, ``""`` without a site card; the head of
    ``_CURRENT.json``)."""

    archive: str
    model: str
    model_digest: str
    views: str
    threshold: float
    calibration: str = ""

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict, views: str) -> "ViewIdentity":
        """A view written before ``views`` was recorded is of the policy given."""
        return cls(data["archive"], data["model"], data["model_digest"],
                   data.get("views", views), float(data["threshold"]),
                   data.get("calibration", ""))


@dataclass
class Counts:
    """What a run holds so far: images scored, failed (with their reason), scored with a
    label; and the objects rewritten after they were listed (scored as read)."""

    scored: int = 0
    failed: int = 0
    labelled: int = 0
    changed: int = 0
    changed_examples: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.scored + self.failed


@dataclass(frozen=True)
class NightlyCounts:
    """A nightly run's part in the view: objects new or changed (scored now), adopted from a
    killed run, gone from the listing, re-thresholded; and the state it wrote."""

    new: int
    adopted: int
    removed: int
    rethresholded: int
    state: str = ""
    objects: int = 0


@dataclass(frozen=True)
class RunSummary:
    """The summary a complete, reconciled run publishes (``_SUCCESS.json``)."""

    identity: RunIdentity
    archive: str
    output: str
    listed: int
    counts: Counts
    threshold: float
    predictions: str
    errors: str
    drift: dict
    nightly: NightlyCounts | None = None
    metrics: dict | None = None
    threshold_source: str = ""
    seconds: float = 0.0

    @property
    def drifted(self) -> list[str]:
        return self.drift["drifted"]

    def to_json(self) -> dict:
        nightly = self.nightly
        return {"archive": self.archive, "model": self.identity.model,
                "model_digest": self.identity.model_digest, "output": self.output,
                "run": self.identity.run, "listed": self.listed,
                **({"new": nightly.new, "adopted": nightly.adopted, "removed": nightly.removed,
                    "rethresholded": nightly.rethresholded} if nightly else {}),
                "scored": self.counts.scored, "failed": self.counts.failed,
                "threshold": self.threshold, "predictions": self.predictions,
                "errors": self.errors, "reconciled": True,
                "changed_since_listing": self.counts.changed,
                "changed_examples": list(self.counts.changed_examples), "drift": self.drift,
                **({"metrics": self.metrics} if self.metrics is not None else {}),
                **({"state": nightly.state, "objects": nightly.objects} if nightly else {}),
                "threshold_source": self.threshold_source, "seconds": self.seconds}

    @classmethod
    def from_json(cls, data: dict) -> "RunSummary":
        nightly = (NightlyCounts(data["new"], data["adopted"], data["removed"],
                                 data["rethresholded"], data["state"], data["objects"])
                   if "state" in data else None)
        counts = Counts(data["scored"], data["failed"], changed=data["changed_since_listing"],
                        changed_examples=list(data["changed_examples"]))
        return cls(RunIdentity.from_json(data), data["archive"], data["output"], data["listed"],
                   counts, data["threshold"], data["predictions"], data["errors"],
                   data["drift"], nightly, data.get("metrics"), data["threshold_source"],
                   data["seconds"])


@dataclass(frozen=True)
class NothingNew:
    """A nightly run that found every listed object already scored by this model: it
    publishes nothing, and says so."""

    archive: str
    output: str
    listed: int
    last_run: str
    threshold_source: str = ""
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"archive": self.archive, "output": self.output, "listed": self.listed,
                "new": 0, "nothing_new": True, "last_run": self.last_run,
                "threshold_source": self.threshold_source, "seconds": self.seconds}
