"""``covidray calibrate``: adopt a model at a site on the site's own labelled sample.

Scores the sample with the one scorer (a ``covidray score`` run into ``<output>/sample``),
then writes the site card (:func:`covidray.evaluation.build_site_card`), the site's drift
reference (the sample's profile), the ROC with the site's operating point, the
reliability diagrams of the raw scores and the chosen calibration map, and one HTML page of
it all (:func:`covidray.report.site_html`); the layout is
:class:`covidray.layout.SiteLayout`. A sample with fewer than 20 labelled images of either
class is refused before any cluster work, and again if too few of them could be scored.
"""

from __future__ import annotations

from dataclasses import dataclass

from covidray import figures
from covidray.config import (DEFAULT_BOOTSTRAP, DEFAULT_SEED, DEFAULT_TARGET_SENSITIVITY,
                             option, to_dict, validate)
from covidray.datasets import load_index
from covidray.drift import make_reference
from covidray.evaluation import labelled, with_columns
from covidray.labels import label_index
from covidray.layout import ScoreLayout, SiteLayout
from covidray.metrics import decimal, percent
from covidray.report import site_html
from covidray.evaluation import build_site_card, require_enough
from covidray.stages.score import ScoreConfig, score_archive
from covidray.storage import Storage


@dataclass(frozen=True)
class CalibrateConfig:
    model: str = option("", "the exported model to adopt (model.onnx)", required=True)
    labelled: str = option("", "the site's labelled sample: a manifest (CSV or Parquet) with "
                               "uri and label (covid / non_covid); group (patient), source "
                               "and view where known", required=True)
    site: str = option("", "the site's name, recorded in its card", required=True)
    output: str = option("", "where the site card goes, e.g. s3://bucket/sites/NAME",
                         required=True)
    target_sensitivity: float = option(DEFAULT_TARGET_SENSITIVITY,
                                       "choose the site's threshold as the highest one "
                                       "reaching this sensitivity on the sample", bounds=(0, 1))
    bootstrap: int = option(DEFAULT_BOOTSTRAP, "bootstrap replicates (patients resampled) for "
                                               "the AUC interval", bounds=(0, None))
    breakdown: str = option("source,view,view_position,manufacturer",
                            "comma-separated columns (manifest or DICOM) to measure the AUC "
                            "within, where the sample holds more than one value")
    seed: int = option(DEFAULT_SEED, "seed of the bootstrap and the calibration folds")

    def __post_init__(self):
        validate(self)

    @property
    def layout(self) -> SiteLayout:
        return SiteLayout(self.output)


def calibrate_site(config: CalibrateConfig, storage: Storage,
                   ray_address: str | None = None) -> dict:
    """Score the site's labelled sample and write its site card; returns the headline."""
    layout = config.layout
    manifest = load_index(storage, config.labelled, require_labels=False)
    require_enough(label_index(manifest["label"]), config.labelled)
    storage.write_json(layout.config, to_dict(config))
    # Any threshold: only the sample's scores are used (not a card beside the model: a card
    # of an earlier export must not stop a site from measuring this one).
    scored = score_archive(ScoreConfig(archive=config.labelled, model=config.model,
                                       output=layout.sample_scores, threshold=0.5),
                           storage, ray_address)
    result = ScoreLayout(layout.sample_scores)
    predictions = storage.read_parquet_dir(result.predictions)
    errors = storage.read_parquet_dir(result.errors)
    columns = [c for c in config.breakdown.split(",") if c]
    sample = labelled(with_columns(predictions, manifest, columns))
    card = build_site_card(sample, len(errors), site=config.site, model_uri=config.model,
                           digest=scored["model_digest"], labelled_uri=config.labelled,
                           target_sensitivity=config.target_sensitivity,
                           breakdown_columns=columns, bootstrap=config.bootstrap,
                           seed=config.seed)
    threshold = card["operating_point"]["threshold"]
    reference = make_reference(predictions, errors, threshold, scored["model_digest"],
                               f"{config.labelled} (the labelled sample of site "
                               f"{config.site})")
    card["drift_reference"] = layout.drift_reference
    storage.write_json(layout.drift_reference, reference)
    pngs = {"site_roc.png": figures.site_roc_png(sample["score"], sample["target"],
                                                 card["roc_auc"], card["operating_point"]),
            "reliability.png": figures.reliability_pair_png(card["calibration"])}
    for uri, data in zip((layout.site_roc_png, layout.reliability_png), pngs.values()):
        storage.write_bytes(uri, data, "image/png")
    storage.write_bytes(layout.report, site_html(card, pngs), "text/html")
    storage.write_json(layout.site_card, card)
    return headline(card, layout)


def headline(card: dict, layout: SiteLayout) -> dict:
    point, chosen = card["operating_point"], card["calibration"]
    held = chosen["held_out"]
    method = chosen["map"]["method"]
    return {
        "site": card["site"], "site_card": layout.site_card, "report": layout.report,
        "images": card["sample"]["images"],
        "roc_auc": card["roc_auc"], "roc_auc_ci95": card["roc_auc_ci95"],
        "threshold": point["threshold"],
        "sensitivity": point["sensitivity"], "specificity": point["specificity"],
        "calibration": method,
        "summary": (f"site {card['site']}: AUC {decimal(card['roc_auc'])} on "
                    f"{card['sample']['images']} images; threshold {decimal(point['threshold'])}"
                    f" for sensitivity {percent(point['sensitivity'])}, specificity "
                    f"{percent(point['specificity'])}; calibration {method} (held-out Brier "
                    f"{decimal(held['none']['brier'])} raw -> "
                    f"{decimal(held[method]['brier'])})"),
    }
