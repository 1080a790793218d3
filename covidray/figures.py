"""PNG figures, each a function of numbers already computed (no model, no storage):

- scoring's metrics: confusion matrices (counts and rates) and the score histogram (the
  paper's Fig. 3/4);
- the evaluation report: ROC and precision-recall curves, calibration, score histograms
  by source or view, the forest plot of subgroups, Grad-CAM saliency, the shortcut audit;
- the drift watch: one run against the reference, and the nightly history.
"""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from covidray.labels import LABELS  # noqa: E402
from covidray.metrics import decimal, json_number  # noqa: E402


def _known(value) -> bool:
    """A number to draw: not None, not NaN."""
    return json_number(value) is not None


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


def confusion_rates_png(rates: list[list[float | None]], threshold: float, title: str = "") -> bytes:
    """Row-normalised confusion matrix: each true class sums to 1."""
    values = np.asarray([[np.nan if v is None else v for v in row] for row in rates], float)
    figure, axes = plt.subplots(figsize=(4.2, 3.6))
    axes.imshow(values, cmap="Blues", vmin=0, vmax=1)
    for (row, column), value in np.ndenumerate(values):
        axes.text(column, row, "n/a" if np.isnan(value) else f"{value:.1%}", ha="center",
                  va="center", color="white" if value > 0.5 else "black", fontsize=12)
    axes.set_xticks([0, 1], [f"pred {n}" for n in LABELS])
    axes.set_yticks([0, 1], [f"true {n}" for n in LABELS])
    axes.set_title(title or f"Rates, score >= {threshold:.2f}")
    return _png(figure)


def roc_pr_png(scores, targets, auc: float, ap: float) -> bytes:
    """ROC and precision-recall curves side by side."""
    from sklearn.metrics import precision_recall_curve, roc_curve

    targets = np.asarray(targets)
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 4))
    left.plot([0, 1], [0, 1], ls="--", color="grey")
    if (targets == 1).any() and (targets == 0).any():  # a curve needs both classes
        fpr, tpr, _ = roc_curve(targets, scores)
        precision, recall, _ = precision_recall_curve(targets, scores)
        left.plot(fpr, tpr, color="tab:red")
        right.step(recall, precision, where="post", color="tab:red")
        right.axhline(np.mean(targets), ls="--", color="grey")
    else:
        for axes in (left, right):
            axes.text(0.5, 0.5, f"no curve: {len(targets)} images, one class or none",
                      ha="center", va="center", color="grey", fontsize=8)
    left.set(xlabel="1 - specificity", ylabel="sensitivity", title=f"ROC (AUC {decimal(auc)})")
    right.set(xlabel="recall (sensitivity)", ylabel="precision", title=f"PR (AP {decimal(ap)})")
    return _png(figure)


def calibration_png(calibration: dict) -> bytes:
    """Reliability diagram: mean predicted score vs fraction COVID per bin."""
    figure, axes = plt.subplots(figsize=(4.5, 4))
    _reliability(axes, calibration, "Calibration")
    return _png(figure)


def _reliability(axes, calibration: dict, title: str) -> None:
    bins = [b for b in calibration["bins"] if b["images"]]
    axes.plot([0, 1], [0, 1], ls="--", color="grey")
    axes.plot([b["mean_score"] for b in bins], [b["fraction_covid"] for b in bins], "o-",
              color="tab:red")
    for b in bins:
        axes.annotate(str(b["images"]), (b["mean_score"], b["fraction_covid"]), fontsize=7)
    axes.set(xlabel="mean predicted COVID probability", ylabel="fraction COVID",
             title=f"{title} (Brier {decimal(calibration['brier'])})", xlim=(0, 1), ylim=(0, 1))


def site_roc_png(scores, targets, auc: float, point: dict) -> bytes:
    """A site's ROC curve on its labelled sample, with its chosen operating point."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(targets), np.asarray(scores, float))
    figure, axes = plt.subplots(figsize=(4.5, 4))
    axes.plot([0, 1], [0, 1], ls="--", color="grey")
    axes.plot(fpr, tpr, color="tab:red")
    axes.plot([1 - point["specificity"]], [point["sensitivity"]], "o", color="black")
    axes.annotate(f"threshold {point['threshold']:.3g}",
                  (1 - point["specificity"], point["sensitivity"]), fontsize=8,
                  xytext=(8, -12), textcoords="offset points")
    axes.set(xlabel="1 - specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.02),
             title=f"ROC at the site (AUC {decimal(auc)})")
    return _png(figure)


def reliability_pair_png(calibration: dict) -> bytes:
    """A site card's reliability diagrams: the raw scores, and the chosen map's held-out
    probabilities (:func:`covidray.evaluation.build_site_card`)."""
    figure, panels = plt.subplots(1, 2, figsize=(9, 4))
    method = calibration["map"]["method"]
    _reliability(panels[0], calibration["reliability_raw"], "raw scores")
    _reliability(panels[1], calibration["reliability_calibrated"], f"{method}, held out")
    return _png(figure)


def histograms_by_png(frame, column: str) -> bytes:
    """Score histograms per value of ``column`` (e.g. source), by true class."""
    values = sorted(frame[column].astype(str).unique()) or ["(no images)"]
    figure, axes_list = plt.subplots(len(values), 1, figsize=(7, 1.6 * len(values) + 0.6),
                                     sharex=True, squeeze=False)
    edges = np.linspace(0, 1, 41)
    for axes, value in zip(axes_list[:, 0], values):
        part = frame[frame[column].astype(str) == value]
        for target, name, colour in ((0, "non_covid", "tab:blue"), (1, "covid", "tab:red")):
            scores = part.loc[part["target"] == target, "score"]
            if len(scores):
                axes.hist(scores, bins=edges, alpha=0.6, color=colour, label=f"{name} ({len(scores)})")
        axes.set_title(value, fontsize=9, loc="left")
        if axes.patches:
            axes.legend(fontsize=7)
    axes_list[-1, 0].set_xlabel("predicted COVID probability")
    return _png(figure)


def forest_png(breakdown: dict, threshold: float) -> bytes:
    """Sensitivity and specificity (95% Wilson intervals) per subgroup at the operating
    point: one row per subgroup, grouped by column (source, view, manufacturer, ...)."""
    rows = [(column, row) for column, entries in breakdown.items() for row in entries]
    figure, panes = plt.subplots(1, 2, figsize=(10, 0.32 * len(rows) + 1.4), sharey=True)
    if not rows:
        panes[0].text(0.5, 0.5, "no subgroups", ha="center", va="center", color="grey")
    labels = [f"{column}: {row[column]} (n={row['images']})" for column, row in rows]
    positions = np.arange(len(rows))[::-1]
    for axes, measure, colour in ((panes[0], "sensitivity", "tab:red"),
                                  (panes[1], "specificity", "tab:blue")):
        for y, (_, row) in zip(positions, rows):
            value, interval = row.get(measure), row.get(f"{measure}_ci95")
            if not _known(value):
                axes.text(0.5, y, "n/a", ha="center", va="center", fontsize=7, color="grey")
                continue
            axes.plot(value, y, "o", color=colour, markersize=4)
            if interval is not None and all(_known(v) for v in interval):
                # A bar never reaches past its point (an interval rounded the wrong side).
                below, above = max(0.0, value - interval[0]), max(0.0, interval[1] - value)
                axes.errorbar(value, y, xerr=[[below], [above]], fmt="none", ecolor=colour,
                              capsize=2)
        axes.set_xlim(-0.02, 1.02)
        axes.set_title(f"{measure} at threshold {threshold:.3g}", fontsize=10)
        axes.grid(axis="x", alpha=0.3)
    panes[0].set_yticks(positions, labels, fontsize=7)
    return _png(figure)


def saliency_png(pixels: np.ndarray, maps: np.ndarray, captions: list[str], title: str,
                 show_images: bool = True, box: tuple[int, int, int, int] | None = None) -> bytes:
    """X-rays (grey) with their Grad-CAM maps (jet, transparent where cold), side by side.
    ``show_images=False``: the maps alone over the outline of the central lung region, a
    figure that holds no pixel of any X-ray (one that can leave the hospital). ``box``:
    (top, bottom, left, right) of the region outlined on the maps."""
    from matplotlib.patches import Rectangle

    count = max(1, len(pixels))
    figure, panes = plt.subplots(1, count, figsize=(2.6 * count, 3.0), squeeze=False)
    for axes in panes[0]:
        axes.axis("off")
    for axes, image, heat, caption in zip(panes[0], pixels, maps, captions):
        if show_images:
            axes.imshow(image, cmap="gray", vmin=0, vmax=255)
            axes.imshow(np.ma.masked_less(heat, 0.15), cmap="jet", alpha=0.45, vmin=0, vmax=1)
        else:
            axes.imshow(heat, cmap="jet", vmin=0, vmax=1)
            if box is not None:
                top, bottom, left, right = box
                axes.add_patch(Rectangle((left, top), right - left, bottom - top, fill=False,
                                         edgecolor="white", linestyle="--", linewidth=1))
        axes.set_title(caption, fontsize=7)
    if not len(pixels):
        panes[0][0].text(0.5, 0.5, "none in this split", ha="center", va="center")
    figure.suptitle(title, fontsize=10)
    return _png(figure)


def audit_png(audit: dict) -> bytes:
    """The shortcut audit at a glance: source vs label-within-source AUCs, and the border test."""
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.4))
    predictability = audit["predictability"]
    names, values, colours = [], [], []
    for name, value in predictability["source"]["per_source"].items():
        if not _known(value):
            continue
        names.append(f"source: {name}"[:40])
        values.append(value)
        colours.append("tab:orange")
    for row in predictability["label_within_source"]:
        if row["label_auc"] is not None:
            names.append(f"label within {row['source']}"[:40])
            values.append(row["label_auc"])
            colours.append("tab:green")
    left.barh(np.arange(len(values))[::-1], values, color=colours)
    left.set_yticks(np.arange(len(values))[::-1], names, fontsize=7)
    left.axvline(0.5, color="grey", lw=0.8, ls="--")
    left.set_xlim(0, 1)
    left.set_title("cross-validated AUC from penultimate features", fontsize=9)
    border = audit["border"]
    bars = [("original", border["original_auc"]),
            ("lungs only", border["variants"]["lungs"]["auc"]),
            ("border only", border["variants"]["border"]["auc"])]
    right.bar([b[0] for b in bars], [b[1] if _known(b[1]) else 0 for b in bars],
              color=["tab:grey", "tab:green", "tab:purple"])
    right.axhline(0.5, color="grey", lw=0.8, ls="--")
    right.set_ylim(0, 1)
    right.set_title("test AUC with parts of the image blanked", fontsize=9)
    return _png(figure)


def _bin_labels(edges: list[float]) -> list[str]:
    """Names of :func:`covidray.drift.bin_index`'s bins: ``<e1``, ``=e1``, ``e1-e2``, ..."""
    labels = [f"<{edges[0]:.3g}"]
    for i, edge in enumerate(edges):
        labels.append(f"={edge:.3g}")
        labels.append(f"{edge:.3g}-{edges[i + 1]:.3g}" if i + 1 < len(edges) else f">{edge:.3g}")
    return labels


def drift_png(drift: dict) -> bytes:
    """One panel per quantity: the reference's shares against this run's (bins or
    categories), the statistic in the title, red where it drifted."""
    quantities = drift["quantities"]
    names = list(quantities)
    columns = 4
    rows = max(1, -(-len(names) // columns))
    figure, axes = plt.subplots(rows, columns, figsize=(4.0 * columns, 2.9 * rows),
                                squeeze=False)
    for axis, name in zip(axes.ravel(), names):
        entry = quantities[name]
        if "reference_counts" in entry:
            labels = _bin_labels(entry["bins"])
            ref, run = (np.asarray(entry[k], float) for k in ("reference_counts", "run_counts"))
            keep = (ref + run) > 0  # the bins either side holds something in
            labels = [label for label, k in zip(labels, keep) if k]
            ref, run = ref[keep], run[keep]
        elif "interval" in entry:
            labels, ref, run = ["positive"], np.asarray([entry["reference"]]), \
                np.asarray([entry["value"]])
        else:
            labels = sorted(set(entry["reference"]) | set(entry["run"]))[:8]
            ref = np.asarray([entry["reference"].get(v, 0) for v in labels], float)
            run = np.asarray([entry["run"].get(v, 0) for v in labels], float)
            labels = [v or "(none)" for v in labels]
        ref, run = ref / max(ref.sum(), 1e-12), run / max(run.sum(), 1e-12)
        if "interval" in entry:
            ref, run = np.asarray([entry["reference"]]), np.asarray([entry["value"]])
        x = np.arange(len(labels))
        axis.bar(x - 0.2, ref, 0.4, label="reference", color="#8da0cb")
        axis.bar(x + 0.2, run, 0.4, label="this run",
                 color="#d62728" if entry["drifted"] else "#66c2a5")
        axis.set_xticks(x, labels, rotation=35, ha="right", fontsize=7)
        limit = (f" (limit {entry['limit']:g})" if entry.get("limit") is not None else
                 f" (reference {entry['reference']:g})" if "interval" in entry else "")
        axis.set_title(f"{name}: {entry['statistic']} {entry['value']:g}{limit}", fontsize=9,
                       color="#d62728" if entry["drifted"] else "black")
    for axis in axes.ravel()[len(names):]:
        axis.axis("off")
    axes.ravel()[0].legend(fontsize=7)
    figure.suptitle(f"Inputs against the reference ({drift['images']} images): "
                    f"{', '.join(drift['drifted']) or 'no drift'}", fontsize=11)
    figure.tight_layout()
    return _png(figure)


def drift_history_png(history, limits: dict) -> bytes:
    """Each quantity's statistic over the nightly runs, as a multiple of its limit (1 = the
    limit), with the runs that drifted marked."""
    figure, axis = plt.subplots(figsize=(9, 4))
    x = np.arange(len(history))
    for name, limit in limits.items():
        if limit and name in history:
            axis.plot(x, history[name].astype(float) / limit, marker="o", lw=1, label=name)
    drifted = history["drifted"].fillna("").astype(str) != ""
    for i in np.flatnonzero(drifted.to_numpy()):
        axis.axvline(i, color="#d62728", alpha=0.25, lw=8)
        axis.annotate(str(history["drifted"].iloc[i]).replace(";", "\n"), (i, 1.0), fontsize=7,
                      color="#d62728", xytext=(4, 6), textcoords="offset points")
    axis.axhline(1.0, color="black", ls="--", lw=1)
    axis.set_xticks(x, [str(r)[:15] for r in history["run"]], rotation=30, ha="right",
                    fontsize=7)
    axis.set_ylabel("statistic / its limit")
    axis.set_title("Drift over the nightly runs (shaded: a run that drifted)")
    if axis.get_lines()[1:]:  # a line besides the limit's: there is something to name
        axis.legend(fontsize=6, ncol=3)
    figure.tight_layout()
    return _png(figure)
