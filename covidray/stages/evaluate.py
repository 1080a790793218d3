"""``covidray evaluate``: score a run's validation and test splits, then write the report.

The operating threshold is chosen on validation (the highest threshold reaching
``target_sensitivity``) and reported on test; the layout of what it writes is
:class:`covidray.layout.EvalLayout` (``<run>/eval`` by default).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from covidray import audit, figures
from covidray.config import (DEFAULT_BOOTSTRAP, DEFAULT_SEED, DEFAULT_TARGET_SENSITIVITY,
                             option, to_dict, validate)
from covidray.imaging.loader import pixels_of
from covidray.datasets import split_rows
from covidray.drift import DriftTally, compare, make_reference
from covidray.evaluation import evaluate_split, labelled, with_columns
from covidray.layout import EvalLayout, RunLayout, ScoreLayout
from covidray.backbones import get_backbone
from covidray.model import checkpoint_recipe, load_checkpoint, model_from_checkpoint
from covidray.model_card import build_model_card
from covidray.onnx_runtime import OnnxScorer
from covidray.report import write_report
from covidray.stages.score import ScoreConfig, score_archive
from covidray.storage import Storage

EVALUATED_SPLITS = ("val", "test")


@dataclass(frozen=True)
class EvaluateConfig:
    run: str = option("", "run directory (trained and exported)", required=True)
    eval_dir: str | None = option(None, "evaluation directory (default <run>/eval)")
    target_sensitivity: float = option(DEFAULT_TARGET_SENSITIVITY,
                                       "choose the operating threshold on validation as the "
                                       "highest one reaching this sensitivity", bounds=(0, 1))
    bootstrap: int = option(DEFAULT_BOOTSTRAP, "bootstrap replicates (patients resampled) for "
                                               "AUC intervals", bounds=(0, None))
    breakdown: str = option("source,view,view_position,manufacturer,sex,age_group",
                            "comma-separated columns (manifest or DICOM) to break results down "
                            "by; those with a known value are used")
    saliency: int = option(4, "Grad-CAM overlays per kind (true positive, false positive, false "
                              "negative) and split; 0: none", bounds=(0, None))
    audit: bool = option(True, "run the shortcut audit (source predictability, border test)")

    def __post_init__(self):
        validate(self)

    @property
    def breakdown_columns(self) -> tuple[str, ...]:
        return tuple(c for c in self.breakdown.split(",") if c)

    @property
    def layout(self) -> EvalLayout:
        return EvalLayout(self.eval_dir or RunLayout(self.run).eval_dir)


def evaluate_run(config: EvaluateConfig, storage: Storage, ray_address: str | None = None) -> dict:
    """Score the run's val and test splits with its ONNX model and write the report."""
    run, layout = RunLayout(config.run), config.layout
    storage.write_json(layout.config, to_dict(config))
    splits = storage.read_table(run.splits)
    metadata = storage.read_json(run.export_report)["metadata"]
    tables, scored, digests = {}, {}, set()
    for split in EVALUATED_SPLITS:
        manifest = storage.write_table(layout.manifest(split), split_rows(splits, split))
        scores = layout.scores(split)
        # The training default, explicitly: the card beside the model is what this
        # evaluation writes (a card of an earlier model must not set its predictions).
        digests.add(score_archive(ScoreConfig(archive=manifest, model=run.onnx, output=scores,
                                              threshold=float(metadata["threshold"])),
                                  storage, ray_address)["model_digest"])
        predictions = storage.read_parquet_dir(ScoreLayout(scores).predictions)
        scored[split] = (predictions, storage.read_parquet_dir(ScoreLayout(scores).errors))
        tables[split] = labelled(with_columns(predictions, splits, config.breakdown_columns))
    test = tables["test"]
    columns = [c for c in config.breakdown_columns
               if c in test.columns and (test[c] != "unknown").any()]
    result = evaluate_split(tables["val"], test, config.target_sensitivity, columns,
                            config.bootstrap)
    result.update(run=config.run, weights=metadata["weights"],
                  weights_licence=metadata.get("weights_licence") or "n/a", eval_dir=layout.root,
                  config=to_dict(config))
    digest = next(iter(digests))
    reference = make_reference(*scored["val"], result["operating_point"]["threshold"], digest,
                               f"{layout.scores('val')} (validation split of {config.run})")
    result["drift"] = split_against_reference(reference, *scored["test"])
    pngs = {"forest.png": figures.forest_png(result["breakdown"],
                                             result["operating_point"]["threshold"])}
    if config.saliency or config.audit:
        pngs.update(inspect_model(config, storage, run, tables, result))
    write_report(storage, layout, result, test, pngs)
    if len(digests) != 1:
        raise RuntimeError(f"{run.onnx} changed while it was evaluated: no model card written")
    storage.write_json(run.drift_reference, reference)
    storage.write_json(run.model_card, build_model_card(run.onnx, digests.pop(), metadata, splits,
                                                        result))
    return {**headline(result, layout), "model_card": run.model_card,
            "drift_reference": run.drift_reference}


def split_against_reference(reference: dict, predictions: pd.DataFrame, errors: pd.DataFrame
                           ) -> dict:
    """The test split's inputs judged against the validation reference, with scoring's own
    default limits: how far apart two held-out splits of one collection already are."""
    limits = ScoreConfig()
    tally = DriftTally(reference, reference["threshold"])
    tally.add(pd.concat([predictions.assign(error=""), errors], ignore_index=True))
    return compare(tally, limits.drift_psi, limits.drift_share, limits.drift_min_images)


def inspect_model(config: EvaluateConfig, storage: Storage, run: RunLayout, tables: dict,
                  result: dict) -> dict[str, bytes]:
    """Saliency for each split and the shortcut audit; adds ``saliency`` and ``audit`` to
    ``result`` and returns their figures. Runs on the driver: a few hundred held-out images."""
    checkpoint = load_checkpoint(storage, run.model_checkpoint)
    model, recipe = model_from_checkpoint(checkpoint), checkpoint_recipe(checkpoint)
    layer = f"{model.backbone} {get_backbone(model.backbone).cam_layer}"
    threshold = result["operating_point"]["threshold"]
    pngs, result["saliency"] = {}, {}
    for split, frame in tables.items():
        if not config.saliency:
            break
        sample = audit.saliency_sample(frame, threshold, config.saliency, DEFAULT_SEED)
        result["saliency"][split] = {}
        for kind, rows in sample.items():
            pixels = pixels_of(storage, rows["uri"].tolist())
            maps = audit.grad_cam(model, pixels, recipe=recipe)
            share = audit.central_share(maps)
            captions = [f"{kind.replace('_', ' ')} {s:.2f}\n{src}"[:48]
                        for s, src in zip(rows["score"], rows["source"])]
            title = f"{split}: {kind.replace('_', ' ')}s (Grad-CAM, {layer})"
            pngs[f"saliency_{split}_{kind}.png"] = figures.saliency_png(pixels, maps, captions,
                                                                        title)
            pngs[f"saliency_{split}_{kind}_maps.png"] = figures.saliency_png(
                pixels, maps, captions, title + ", maps only", show_images=False,
                box=audit.LUNG_BOX)
            result["saliency"][split][kind] = {
                "images": rows["uri"].tolist(), "scores": rows["score"].astype(float).tolist(),
                "central_share": [None if np.isnan(v) else float(v) for v in share]}
    if config.audit:
        held_out = pd.concat([tables["val"], tables["test"]], ignore_index=True)
        pixels = pixels_of(storage, held_out["uri"].tolist())
        # One onnxruntime pass: the features the last layer reads, and the scores the
        # border test starts from (the exported model at scoring speed, not torch).
        scorer = OnnxScorer(storage.read_bytes(run.onnx), run.onnx, features=True)
        scores, features = scorer.scores_and_features(pixels)
        predictability = audit.source_and_label_predictability(features, held_out, DEFAULT_SEED)
        test_rows = np.arange(len(tables["val"]), len(held_out))
        border = audit.border_test(scorer.scores, pixels[test_rows],
                                   held_out["target"].to_numpy()[test_rows], threshold,
                                   original=scores[test_rows])
        result["audit"] = {"images": int(len(held_out)), "splits": ["val", "test"],
                           "predictability": predictability, "border": border,
                           "lung_box": list(audit.LUNG_BOX)}
        result["audit"]["reading"] = audit.plain_reading(result["audit"])
        pngs["audit.png"] = figures.audit_png(result["audit"])
    return pngs


def headline(result: dict, layout: EvalLayout) -> dict:
    operating = result["operating_point"]
    return {"report": layout.report_file("report.html"),
            "weights": result["weights"], "test_images": result["test_images"],
            "roc_auc": result["roc_auc"], "roc_auc_ci95": result["roc_auc_ci95"],
            "operating_threshold": operating["threshold"],
            "test_sensitivity": operating["test"]["sensitivity"],
            "test_specificity": operating["test"]["specificity"]}
