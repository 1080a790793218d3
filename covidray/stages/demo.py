"""``covidray demo``: stage a dataset, train, export, score its test split, summarise.

Every step is the production stage (upload, train, export, score). The scored archive
also holds three unreadable files (a truncated JPEG, an empty file and a text file named
``.png``) so the errors table and the count reconciliation show.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import ClassVar

import pandas as pd

from covidray.config import option, to_dict, validate
from covidray.datasets import split_rows
from covidray.metrics import percent
from covidray.layout import DataLayout, DemoLayout, RunLayout, ScoreLayout
from covidray.stages.evaluate import EvaluateConfig, evaluate_run
from covidray.stages.export import ExportConfig, export_run
from covidray.stages.score import ScoreConfig, score_archive
from covidray.stages.train import TrainConfig, fit
from covidray.stages.upload import UploadConfig, upload, upload_dataset
from covidray.storage import Storage
from covidray.synthetic import synthetic_dataset

SYNTHETIC = "synthetic"
UNREADABLE = {"truncated.jpg": "truncated JPEG", "empty.png": "zero bytes",
              "not-an-image.png": "text named .png"}


@dataclass(frozen=True)
class DemoConfig:
    DERIVED: ClassVar[tuple[str, ...]] = ("run",)  # the demo trains into <workdir>/run

    data: str = option(SYNTHETIC, "'synthetic' or a folder holding metadata.csv (file, "
                                  "label, ...) such as ../shared/data/cxr")
    workdir: str = option("s3://covidray-demo", "where the demo writes everything (bucket "
                                                "created if missing)")
    images: int = option(240, "synthetic: images to make; a folder: most images to use "
                              "(whole patient groups, both classes kept)", bounds=(8, None))
    train: TrainConfig = option(factory=lambda: TrainConfig.preset("demo"))

    def __post_init__(self):
        validate(self)


def stage_synthetic(storage: Storage, data_uri: str, images: int, seed: int) -> str:
    """Make ``images`` synthetic labelled X-rays under ``data_uri``; returns the manifest URI."""
    layout, rows, items = DataLayout(data_uri), [], []
    for relative, label, patient, data in synthetic_dataset(images // 2, images - images // 2,
                                                            seed):
        rows.append({"file": relative, "label": label, "patient_id": patient,
                     "source": SYNTHETIC})
        items.append((layout.image(relative), data))
    upload(storage, items)
    return storage.write_table(layout.manifest, pd.DataFrame(rows))


def stage_test_archive(storage: Storage, layout: DemoLayout) -> str:
    """A manifest of the run's test split plus three unreadable files; returns its URI."""
    test = split_rows(storage.read_table(RunLayout(layout.run).splits), "test")
    sample = storage.read_bytes(test["uri"].iloc[0])
    contents = {"truncated.jpg": sample[: max(1, len(sample) // 3)], "empty.png": b"",
                "not-an-image.png": b"this is a text file, not an X-ray\n"}
    extra = []
    for name, data in contents.items():
        uri = storage.write_bytes(layout.unreadable(name), data)
        extra.append({"uri": uri, "label": None, "source": f"demo: {UNREADABLE[name]}"})
    archive = pd.concat([test, pd.DataFrame(extra)], ignore_index=True)
    return storage.write_table(layout.test_archive, archive)


def run_demo(config: DemoConfig, storage: Storage, ray_address: str | None = None) -> dict:
    started = time.time()
    layout = DemoLayout(config.workdir)
    storage.ensure_bucket(config.workdir)
    storage.check(config.workdir, writable=True)
    storage.write_json(layout.config, to_dict(config))
    seed = config.train.seed
    print(f"[1/5] staging data ({config.data}) at {layout.data}")
    if config.data == SYNTHETIC:
        manifest = stage_synthetic(storage, layout.data, config.images, seed)
    else:
        manifest = upload_dataset(UploadConfig(config.data, layout.data, config.images, seed),
                                  storage)["manifest"]
    train = dataclasses.replace(config.train, data=manifest, run=layout.run)
    print(f"[2/5] training {train.backbone} ({train.epochs} epochs, weights={train.weights}) "
          f"-> {layout.run}")
    trained = fit(train, storage, ray_address)
    print(f"[3/5] exporting ONNX -> {RunLayout(layout.run).onnx}")
    exported = export_run(ExportConfig(run=layout.run), storage)
    print(f"[4/5] evaluating (threshold chosen on val, report, model card) -> "
          f"{RunLayout(layout.run).eval_dir}")
    evaluated = evaluate_run(EvaluateConfig(run=layout.run), storage, ray_address)
    archive = stage_test_archive(storage, layout)
    print(f"[5/5] scoring {archive} with the model card's threshold -> {layout.scores}")
    scored = score_archive(ScoreConfig(archive=archive, model=RunLayout(layout.run).onnx,
                                       output=layout.scores), storage, ray_address)
    summary = {"seconds": round(time.time() - started, 1), "weights": trained["weights"],
               "epochs": trained["epochs"], "final_epoch": trained["final"],
               "onnx_parity_max_abs_diff": exported["max_abs_diff_probabilities"],
               "scoring": scored, "evaluation": evaluated,
               "artifacts": artifacts(storage, layout)}
    print(summary_table(summary))
    return summary


def artifacts(storage: Storage, layout: DemoLayout) -> dict:
    run, scores = RunLayout(layout.run), ScoreLayout(layout.scores)
    return {"checkpoint": run.model_checkpoint, "onnx": run.onnx,
            "export_report": run.export_report, "history": run.history,
            "splits": run.splits, "predictions": scores.predictions,
            "errors": scores.errors, "metrics": scores.metrics_json,
            "sweep_csv": scores.sweep_csv,
            "figures": sorted(storage.list_files(scores.metrics, (".png",))),
            "success_marker": scores.success}


def summary_table(summary: dict) -> str:
    scoring = summary["scoring"]
    metrics = scoring.get("metrics", {})
    lines = ["", "covidray demo summary", "=" * 64,
             f"weights        {summary['weights']}",
             f"epochs         {summary['epochs']}  (final train loss "
             f"{summary['final_epoch'].get('train_loss', float('nan')):.4f}, val AUC "
             f"{summary['final_epoch'].get('val_auc', float('nan')):.3f})",
             f"ONNX parity    max |torch - onnxruntime| = {summary['onnx_parity_max_abs_diff']:.2e}",
             f"test archive   listed {scoring['listed']} = scored {scoring['scored']} + failed "
             f"{scoring['failed']}  ({'reconciled' if scoring['reconciled'] else 'NOT reconciled'})",
             f"test ROC AUC   {metrics.get('roc_auc')}", "",
             "threshold  sensitivity  specificity"]
    for threshold, values in metrics.get("paper_thresholds", {}).items():
        lines.append(f"{threshold:>9}  {percent(values['sensitivity']):>11}  "
                     f"{percent(values['specificity']):>11}")
    lines += ["", "artifacts:"]
    for name, value in summary["artifacts"].items():
        for item in (value if isinstance(value, list) else [value]):
            lines.append(f"  {name:<15} {item}")
    evaluation = summary["evaluation"]
    lines += ["", f"evaluation     test ROC AUC {evaluation['roc_auc']:.3f}; threshold "
                  f"{evaluation['operating_threshold']:.3g} chosen on val: test sensitivity "
                  f"{percent(evaluation['test_sensitivity'])}, specificity "
                  f"{percent(evaluation['test_specificity'])}",
              f"report         {evaluation['report']}",
              f"model card     {evaluation['model_card']}"]
    lines.append(f"\ntotal {summary['seconds']} s")
    return "\n".join(lines)



