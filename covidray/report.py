"""The evaluation report: one page (HTML), its tables (Markdown) and every figure (PNG).

Pure rendering of what :func:`covidray.evaluation.evaluate_split` computed; the
``covidray evaluate`` stage (:mod:`covidray.stages.evaluate`) writes it.
"""

from __future__ import annotations

import base64
import html

import numpy as np
import pandas as pd

from covidray import figures
from covidray.layout import EvalLayout
from covidray.metrics import PAPER_THRESHOLDS, metrics_report, summarise, sweep_thresholds
from covidray.storage import Storage

PAPER_TABLE_1 = {"0.10": (1.000, 0.725), "0.15": (0.976, 0.899), "0.20": (0.943, 0.919),
                 "0.25": (0.900, 0.956)}


def write_report(storage: Storage, layout: EvalLayout, result: dict, test: pd.DataFrame,
                 extra_pngs: dict[str, bytes] | None = None) -> None:
    """Write report.json, summary.md, report.html and the PNGs under ``layout.report``
    (``extra_pngs``: the subgroup forest plot, saliency and audit figures)."""
    scores, targets = test["score"].to_numpy(float), test["target"].to_numpy()
    operating = result["operating_point"]
    pngs = {
        "roc_pr.png": figures.roc_pr_png(scores, targets, result["roc_auc"],
                                         result["average_precision"]),
        "score_histogram.png": figures.score_histogram_png(
            metrics_report(summarise(scores, targets,
                                     {*sweep_thresholds().tolist(), operating["threshold"]}),
                           result["roc_auc"], operating["threshold"])),
        "calibration.png": figures.calibration_png(result["calibration"]),
    }
    for column in result["breakdown"]:
        pngs[f"histograms_by_{column}.png"] = figures.histograms_by_png(test, column)
    for key, entry in [*result["paper_thresholds"].items(), ("operating", operating["test"])]:
        t = entry["threshold"]
        name = "operating" if key == "operating" else f"t{key}"
        pngs[f"confusion_{name}_counts.png"] = figures.confusion_matrix_png(
            entry["matrix"], t, f"{'Operating point' if key == 'operating' else 'Threshold'} "
                                f"{t:.3g}: counts")
        pngs[f"confusion_{name}_rates.png"] = figures.confusion_rates_png(
            entry["matrix_rates"], t, f"{'Operating point' if key == 'operating' else 'Threshold'} "
                                      f"{t:.3g}: rates")
    pngs.update(extra_pngs or {})
    for name, data in pngs.items():
        storage.write_bytes(layout.report_file(name), data, "image/png")
    storage.write_json(layout.report_file("report.json"), result)
    markdown = summary_markdown(result)
    storage.write_bytes(layout.report_file("summary.md"), markdown.encode(), "text/markdown")
    storage.write_bytes(layout.report_file("report.html"), report_html(result, markdown, pngs),
                        "text/html")


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"


def _ci(interval, percent: bool = True) -> str:
    if interval is None:
        return "n/a"
    lo, hi = interval
    return f"{100 * lo:.1f}-{100 * hi:.1f}%" if percent else f"{lo:.3f}-{hi:.3f}"


def summary_markdown(result: dict) -> str:
    operating = result["operating_point"]
    lines = [f"# covidray evaluation: {result['run']}", "",
             f"Weights: {result['weights']}. Test: {result['test_images']} images "
             f"({result['test_covid']} covid, {result['test_non_covid']} non_covid, "
             f"{result['test_patients']} patients).", "",
             f"ROC AUC {result['roc_auc']:.3f} (95% CI {_ci(result['roc_auc_ci95'], False)}), "
             f"average precision {result['average_precision']:.3f} "
             f"(95% CI {_ci(result['average_precision_ci95'], False)}); patient-level bootstrap, "
             f"{result['bootstrap']['replicates']} replicates. Brier score "
             f"{result['calibration']['brier']:.3f}.", "",
             "| threshold | sensitivity (95% CI) | specificity (95% CI) | paper sens. | paper spec. |",
             "|---|---|---|---|---|"]
    for key, entry in result["paper_thresholds"].items():
        paper = PAPER_TABLE_1.get(key, (None, None))
        lines.append(f"| {key} | {_pct(entry['sensitivity'])} ({_ci(entry['sensitivity_ci95'])}) "
                     f"| {_pct(entry['specificity'])} ({_ci(entry['specificity_ci95'])}) "
                     f"| {_pct(paper[0])} | {_pct(paper[1])} |")
    test, val = operating["test"], operating["val"]
    lines += ["", f"Operating point chosen on validation for sensitivity >= "
                  f"{operating['target_sensitivity']:.2f}: threshold {operating['threshold']:.4g} "
                  f"(val sensitivity {_pct(val['sensitivity'])}, specificity "
                  f"{_pct(val['specificity'])}); on test: sensitivity "
                  f"{_pct(test['sensitivity'])} ({_ci(test['sensitivity_ci95'])}), specificity "
                  f"{_pct(test['specificity'])} ({_ci(test['specificity_ci95'])}).", ""]
    for column, rows in result["breakdown"].items():
        lines += [f"## By {column}", "",
                  f"| {column} | images | covid | non_covid | ROC AUC | sensitivity | specificity "
                  f"| mean score |", "|---|---|---|---|---|---|---|---|"]
        for row in rows:
            auc = "n/a (one class)" if row["roc_auc"] is None else f"{row['roc_auc']:.3f}"
            lines.append(f"| {row[column]} | {row['images']} | {row['covid']} | {row['non_covid']} "
                         f"| {auc} | {_pct(row['sensitivity'])} | {_pct(row['specificity'])} "
                         f"| {row['mean_score']:.3g} |")
        lines.append("")
    if "audit" in result:
        lines += ["## Shortcut audit", "", result["audit"]["reading"], ""]
    if result.get("saliency"):
        lines += ["## Saliency", "",
                  "Grad-CAM on the last convolutional block for the most confident true "
                  "positives, false positives and false negatives of each split. Share of each "
                  "map inside the central lung region (1.0 = all of it):", ""]
        for split, kinds in result["saliency"].items():
            for kind, entry in kinds.items():
                shares = [s for s in entry["central_share"] if s is not None]
                mean = f"{np.mean(shares):.2f}" if shares else "n/a"
                lines.append(f"- {split} {kind.replace('_', ' ')}s: {len(entry['images'])} "
                             f"images, mean central share {mean}")
        lines.append("")
    lines.append("Positive means score >= threshold. Sensitivity/specificity at the operating "
                 "point use the threshold chosen on validation only.")
    return "\n".join(lines) + "\n"


def report_html(result: dict, markdown: str, pngs: dict[str, bytes]) -> bytes:
    """One page: the summary tables (as preformatted Markdown) and every figure inline."""
    images = "\n".join(
        f'<figure><img alt="{html.escape(name)}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}"><figcaption>{html.escape(name)}</figcaption></figure>'
        for name, data in pngs.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>covidray evaluation</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}
pre{{white-space:pre-wrap;background:#f6f6f6;padding:1em}}
figure{{display:inline-block;margin:.5em;vertical-align:top}}img{{max-width:520px}}</style>
</head><body><h1>covidray evaluation</h1>
<p>Run <code>{html.escape(result['run'])}</code>. Paper thresholds:
{', '.join(f'{t:.2f}' for t in PAPER_THRESHOLDS)}.</p>
<pre>{html.escape(markdown)}</pre>
{images}
</body></html>"""
    return page.encode()
