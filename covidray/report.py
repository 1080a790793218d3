"""The evaluation report: one page (HTML), its text and tables (Markdown) and every figure
(PNG).

Pure rendering of what :func:`covidray.evaluation.evaluate_split` computed; the
``covidray evaluate`` stage (:mod:`covidray.stages.evaluate`) writes it. The text and tables
are one list of blocks (:func:`summary_blocks`), rendered once as Markdown
(``summary.md``) and once as HTML (``report.html``), so the two cannot disagree.
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass

import numpy as np
import pandas as pd

from covidray import figures
from covidray.drift import verdict
from covidray.layout import EvalLayout
from covidray.metrics import (PAPER_THRESHOLDS, POSITIVE_RULE, decimal, metrics_report, percent,
                              summarise, sweep_thresholds)
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
    storage.write_bytes(layout.report_file("summary.md"), summary_markdown(result).encode(),
                        "text/markdown")
    storage.write_bytes(layout.report_file("report.html"), report_html(result, pngs),
                        "text/html")


def _ci(interval, percent_values: bool = True) -> str:
    if interval is None:
        return "n/a"
    lo, hi = interval
    return f"{100 * lo:.1f}-{100 * hi:.1f}%" if percent_values else f"{lo:.3f}-{hi:.3f}"


# --- the document: one list of blocks, rendered to Markdown and to HTML --------------------

@dataclass(frozen=True)
class Table:
    header: list[str]
    rows: list[list[str]]


def _figure_captions(names) -> dict[str, str]:
    """What each figure shows, in words (the file name is shown beside it)."""
    fixed = {
        "roc_pr.png": "ROC and precision-recall curves on the test split",
        "score_histogram.png": "Scores of the test images by true class, with the paper's "
                               "thresholds and the operating point",
        "calibration.png": "Calibration: mean score against the observed COVID rate, by bin",
        "forest.png": "Sensitivity and specificity by subgroup at the operating point (95% CI)",
        "audit.png": "Shortcut audit: source predictability and the border-only / lungs-only "
                     "test",
    }
    captions = {}
    for name in names:
        stem = name[:-len(".png")]
        if name in fixed:
            captions[name] = fixed[name]
        elif stem.startswith("histograms_by_"):
            captions[name] = f"Score histograms by {stem[len('histograms_by_'):]}"
        elif stem.startswith("confusion_"):
            point, kind = stem[len("confusion_"):].rsplit("_", 1)
            where = "the operating point" if point == "operating" else f"threshold {point[1:]}"
            captions[name] = f"Confusion matrix at {where} ({kind})"
        elif stem.startswith("saliency_"):
            split, rest = stem[len("saliency_"):].split("_", 1)
            maps = rest.endswith("_maps")
            kind = rest.removesuffix("_maps").replace("_", " ")
            captions[name] = (f"Grad-CAM of the {split} split's most confident {kind}s"
                              + (", maps only with the lung box" if maps else ""))
        else:
            captions[name] = stem.replace("_", " ")
    return captions


def summary_blocks(result: dict) -> list:
    """The report's text and tables, in reading order: ``("h1" | "h2" | "p", text)``,
    ``("ul", [items])`` and :class:`Table` blocks."""
    operating = result["operating_point"]
    blocks = [("h1", f"covidray evaluation: {result['run']}"),
              ("p", f"Weights: {result['weights']} (licence: "
                    f"{result.get('weights_licence', 'n/a')}). Test: {result['test_images']} images "
                    f"({result['test_covid']} covid, {result['test_non_covid']} non_covid, "
                    f"{result['test_patients']} patients)."),
              ("p", f"ROC AUC {decimal(result['roc_auc'])} (95% CI "
                    f"{_ci(result['roc_auc_ci95'], False)}), average precision "
                    f"{decimal(result['average_precision'])} (95% CI "
                    f"{_ci(result['average_precision_ci95'], False)}); patient-level bootstrap, "
                    f"{result['bootstrap']['replicates']} replicates. Brier score "
                    f"{decimal(result['calibration']['brier'])}."),
              ("h2", "The paper's thresholds")]
    rows = []
    for key, entry in result["paper_thresholds"].items():
        paper = PAPER_TABLE_1.get(key, (None, None))
        rows.append([key, f"{percent(entry['sensitivity'])} ({_ci(entry['sensitivity_ci95'])})",
                     f"{percent(entry['specificity'])} ({_ci(entry['specificity_ci95'])})",
                     percent(paper[0]), percent(paper[1])])
    blocks.append(Table(["threshold", "sensitivity (95% CI)", "specificity (95% CI)",
                         "paper sens.", "paper spec."], rows))
    test, val = operating["test"], operating["val"]
    blocks += [("h2", "Operating point"),
               ("p", f"Chosen on validation for sensitivity >= "
                     f"{operating['target_sensitivity']:.2f}: threshold "
                     f"{operating['threshold']:.4g} (val sensitivity "
                     f"{percent(val['sensitivity'])}, specificity {percent(val['specificity'])}); "
                     f"on test: sensitivity {percent(test['sensitivity'])} "
                     f"({_ci(test['sensitivity_ci95'])}), specificity "
                     f"{percent(test['specificity'])} ({_ci(test['specificity_ci95'])}).")]
    for column, entries in result["breakdown"].items():
        blocks += [("h2", f"By {column}"), breakdown_table(column, entries, mean_score=True)]
    if "audit" in result:
        blocks += [("h2", "Shortcut audit"), ("p", result["audit"]["reading"])]
    if "drift" in result:
        drift = result["drift"]
        rows = [[name, q["statistic"], f"{q['value']:g}",
                 "n/a" if q.get("limit") is None else f"{q['limit']:g}",
                 "yes" if q["drifted"] else "no"] for name, q in drift["quantities"].items()]
        blocks += [("h2", "Inputs: test against the validation reference"),
                   ("p", f"{verdict(drift)}. The validation split's profile is kept beside the "
                         "model card (drift_reference.json); every scoring run compares its "
                         "inputs with it the same way."),
                   Table(["quantity", "statistic", "value", "limit", "drifted"], rows)]
    if result.get("saliency"):
        items = []
        for split, kinds in result["saliency"].items():
            for kind, entry in kinds.items():
                shares = [s for s in entry["central_share"] if s is not None]
                mean = f"{np.mean(shares):.2f}" if shares else "n/a"
                items.append(f"{split} {kind.replace('_', ' ')}s: {len(entry['images'])} "
                             f"images, mean central share {mean}")
        blocks += [("h2", "Saliency"),
                   ("p", "Grad-CAM on the last convolutional block for the most confident true "
                         "positives, false positives and false negatives of each split. Share "
                         "of each map inside the central lung region (1.0 = all of it):"),
                   ("ul", items)]
    blocks.append(("p", f"Positive means {POSITIVE_RULE}. Sensitivity/specificity at the "
                        "operating point use the threshold chosen on validation only."))
    return blocks


def breakdown_table(column: str, entries: list[dict], mean_score: bool = False) -> Table:
    """Rows of :func:`covidray.evaluation.breakdown` as a table."""
    rows = [[str(row[column]), str(row["images"]), str(row["covid"]), str(row["non_covid"]),
             "n/a (one class)" if row["roc_auc"] is None else decimal(row["roc_auc"]),
             percent(row["sensitivity"]), percent(row["specificity"]),
             *([decimal(row["mean_score"], ".3g")] if mean_score else [])] for row in entries]
    return Table([column, "images", "covid", "non_covid", "ROC AUC", "sensitivity",
                  "specificity", *(["mean score"] if mean_score else [])], rows)


def to_markdown(blocks: list) -> str:
    lines = []
    for block in blocks:
        if isinstance(block, Table):
            lines += ["| " + " | ".join(block.header) + " |",
                      "|" + "---|" * len(block.header),
                      *("| " + " | ".join(row) + " |" for row in block.rows), ""]
        elif block[0] == "ul":
            lines += [*(f"- {item}" for item in block[1]), ""]
        else:
            kind, text = block
            lines += [{"h1": "# ", "h2": "## ", "p": ""}[kind] + text, ""]
    return "\n".join(lines)


def summary_markdown(result: dict) -> str:
    return to_markdown(summary_blocks(result))


def to_html(blocks: list) -> str:
    out = []
    for block in blocks:
        if isinstance(block, Table):
            head = "".join(f"<th>{html.escape(c)}</th>" for c in block.header)
            body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                           for row in block.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif block[0] == "ul":
            out.append("<ul>" + "".join(f"<li>{html.escape(i)}</li>" for i in block[1]) + "</ul>")
        else:
            kind, text = block
            out.append(f"<{kind}>{html.escape(text)}</{kind}>")
    return "\n".join(out)


_STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
line-height:1.45;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:right}th{background:#f2f2f2}td:first-child,th:first-child{text-align:left}
figure{display:inline-block;margin:.5em;vertical-align:top;max-width:520px}
img{max-width:520px}figcaption{font-size:.9em;color:#444}"""


def report_html(result: dict, pngs: dict[str, bytes]) -> bytes:
    """One page: the summary's headings, text and tables as HTML, then every figure inline
    with its caption."""
    return page_html(f"covidray evaluation: {result['run']}", summary_blocks(result), pngs,
                     _figure_captions(pngs),
                     f"Paper thresholds: {', '.join(f'{t:.2f}' for t in PAPER_THRESHOLDS)}.")


def page_html(title: str, blocks: list, pngs: dict[str, bytes], captions: dict[str, str],
              note: str = "") -> bytes:
    """``blocks`` as HTML under ``title``, then every figure inline with its caption."""
    figures_html = "\n".join(
        f'<figure><img alt="{html.escape(captions[name])}" src="data:image/png;base64,'
        f'{base64.b64encode(data).decode()}"><figcaption>{html.escape(captions[name])} '
        f'<code>{html.escape(name)}</code></figcaption></figure>'
        for name, data in pngs.items())
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style>
</head><body>
{to_html(blocks)}
<h2>Figures</h2>
<p>{html.escape(note)}</p>
{figures_html}
</body></html>"""
    return page.encode()


# --- a site's page (covidray calibrate) ------------------------------------------------------

SITE_CAPTIONS = {"site_roc.png": "ROC on the site's labelled sample, with the site's "
                                 "operating point",
                 "reliability.png": "Reliability: the raw scores, and the chosen map's held-out "
                                    "probabilities"}


def site_blocks(card: dict) -> list:
    """A site card as text and tables (:func:`covidray.evaluation.build_site_card`)."""
    sample, point, chosen = card["sample"], card["operating_point"], card["calibration"]
    blocks = [("h1", f"covidray site card: {card['site']}"),
              ("p", f"Model {card['model']} (digest {card['model_digest'][:16]}), measured on "
                    f"{sample['images']} labelled images of the site ({sample['covid']} covid, "
                    f"{sample['non_covid']} non_covid, {sample['patients']} patients; "
                    f"{sample['failed']} failed to load) from {sample['manifest']}."),
              ("p", f"ROC AUC at the site {decimal(card['roc_auc'])} (95% CI "
                    f"{_ci(card['roc_auc_ci95'], False)}; patient-level bootstrap, "
                    f"{card['bootstrap']['replicates']} replicates)."),
              ("h2", "Operating point"),
              ("p", f"Threshold {point['threshold']:.4g}: {point['how']}. Sensitivity "
                    f"{percent(point['sensitivity'])} ({_ci(point['sensitivity_ci95'])}), "
                    f"specificity {percent(point['specificity'])} "
                    f"({_ci(point['specificity_ci95'])}); positive means {card['positive_rule']}.")]
    for column, entries in card["by"].items():
        blocks += [("h2", f"Within each {column}"), breakdown_table(column, entries)]
    held = chosen["held_out"]
    blocks += [("h2", "Calibration"),
               ("p", f"Map: {chosen['map']['method']}, chosen by {chosen['chosen_by']}."),
               Table(["scores", "held-out log-loss", "held-out Brier"],
                     [[name, decimal(held[name]["log_loss"]), decimal(held[name]["brier"])]
                      for name in held]),
               ("h2", "What this does not prove"), ("p", card["not_proven"])]
    return blocks


def site_html(card: dict, pngs: dict[str, bytes]) -> bytes:
    return page_html(f"covidray site card: {card['site']}", site_blocks(card), pngs,
                     {name: SITE_CAPTIONS.get(name, name) for name in pngs})
