"""The two classes, defined once: index 0 ``non_covid``, index 1 ``covid`` (the positive class).

A *score* everywhere in covidray is P(covid), the model's probability of index 1.
"""

from __future__ import annotations

import numpy as np

LABELS = ("non_covid", "covid")
POSITIVE_LABEL = "covid"


def label_index(labels) -> np.ndarray:
    """Labels -> class indices (covid=1, non_covid=0, missing or unknown=-1)."""
    lookup = {name: i for i, name in enumerate(LABELS)}
    return np.asarray([lookup.get(label, -1) if isinstance(label, str) else -1 for label in labels],
                      dtype=np.int64)
