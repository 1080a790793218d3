"""PNG figures of the evaluation: confusion matrices and the score histogram (paper Fig. 3/4)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from covidray.datasets import LABELS  # noqa: E402


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def confusion_matrix_png(matrix: list[list[int]], threshold: float, title: str = "") -> bytes:
    """``[[TN, FP], [FN, TP]]`` as an annotated heat map."""
    counts = np.asarray(matrix)
    figure, axes = plt.subplots(figsize=(4.2, 3.6))
    axes.imshow(counts, cmap="Blues")
    for (row, column), value in np.ndenumerate(counts):
        colour = "white" if value > counts.max() / 2 else "black"
        axes.text(column, row, f"{value}", ha="center", va="center", color=colour, fontsize=13)
    axes.set_xticks([0, 1], [f"pred {n}" for n in LABELS])
    axes.set_yticks([0, 1], [f"true {n}" for n in LABELS])
    axes.set_title(title or f"Confusion matrix, score >= {threshold:.2f}")
    return _png(figure)


def score_histogram_png(report: dict) -> bytes:
    """Predicted COVID probability by true class (the paper's Fig. 3)."""
    edges = np.asarray(report["histogram"]["edges"])
    centres, width = (edges[:-1] + edges[1:]) / 2, np.diff(edges)
    figure, axes = plt.subplots(figsize=(6, 3.6))
    for name, colour in (("non_covid", "tab:blue"), ("covid", "tab:red")):
        axes.bar(centres, report["histogram"][name], width=width, alpha=0.6, color=colour,
                 label=f"true {name} (n={report[name]})")
    axes.set_yscale("symlog")
    axes.set_xlabel("predicted COVID probability")
    axes.set_ylabel("images")
    axes.legend()
    axes.set_title("Predicted scores by true class")
    return _png(figure)
