"""The demo: stage a dataset in storage, train, export, score the test split, summarise.

Used by ``covidray demo`` and ``jobs/demo.py``; every stage is the production code path.
The scored archive also holds three unreadable files (a truncated JPEG, an empty file
and a text file named ``.png``) so the errors table and the count reconciliation show.
"""

from __future__ import annotations

import os
import time
from concurrent.futures import ThreadPoolExecutor

import pandas as pd

from covidray.datasets import LABELS, unit_hash
from covidray.layout import RunLayout, ScoreLayout
from covidray.model import WeightsUnavailable, load_weights
from covidray.report import split_rows
from covidray.storage import Storage, join_uri, read_table
from covidray.synthetic import synthetic_dataset

UNREADABLE = {"truncated.jpg": "truncated JPEG", "empty.png": "zero bytes",
              "not-an-image.png": "text named .png"}


def stage_synthetic(storage: Storage, data_uri: str, images: int, seed: int) -> str:
    rows, uploads = [], []
    for relative, label, patient, data in synthetic_dataset(images // 2, images - images // 2, seed):
        rows.append({"file": relative, "label": label, "patient_id": patient, "source": "synthetic"})
        uploads.append((join_uri(data_uri, relative), data))
    _upload(storage, uploads)
    return _write_manifest(storage, data_uri, pd.DataFrame(rows))


def stage_folder(storage: Storage, data_uri: str, folder: str, images: int | None,
                 seed: int) -> str:
    """Upload ``folder/metadata.csv``'s images (all, or a subset of whole patient groups with
    both classes kept) and write a manifest with every metadata column."""
    metadata = pd.read_csv(os.path.join(folder, "metadata.csv"))
    subset = metadata if images is None else _sample_groups(metadata, images, seed)
    uploads = []
    for relative in subset["file"]:
        with open(os.path.join(folder, relative), "rb") as fh:
            uploads.append((join_uri(data_uri, relative), fh.read()))
    _upload(storage, uploads)
    return _write_manifest(storage, data_uri, subset)


def _sample_groups(metadata: pd.DataFrame, images: int, seed: int) -> pd.DataFrame:
    group_column = "split_group" if "split_group" in metadata.columns else "patient_id"
    chosen = []
    natural = metadata["label"].value_counts(normalize=True)
    for label in LABELS:
        share = max(natural.get(label, 0.0), 0.3) if label == "covid" else 1.0 - max(
            natural.get("covid", 0.0), 0.3)
        budget = int(images * share)
        members = metadata[metadata["label"] == label]
        order = sorted(members[group_column].astype(str).unique(), key=lambda g: unit_hash(seed, g))
        sizes = members.groupby(members[group_column].astype(str)).size()
        taken, total = [], 0
        for group in order:
            if total >= budget:
                break
            taken.append(group)
            total += int(sizes[group])
        chosen.append(members[members[group_column].astype(str).isin(taken)])
    return pd.concat(chosen)


def _upload(storage: Storage, uploads: list[tuple[str, bytes]]) -> None:
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda item: storage.write_bytes(*item), uploads))


def _write_manifest(storage: Storage, data_uri: str, frame: pd.DataFrame) -> str:
    uri = join_uri(data_uri, "manifest.csv")
    storage.write_bytes(uri, frame.to_csv(index=False).encode(), "text/csv")
    return uri


def stage_test_archive(storage: Storage, workdir: str, run: str) -> str:
    """A manifest of the run's test split plus three unreadable files; returns its URI."""
    test = split_rows(read_table(storage, RunLayout(run).splits), "test")
    sample = storage.read_bytes(test["uri"].iloc[0])
    contents = {"truncated.jpg": sample[: max(1, len(sample) // 3)], "empty.png": b"",
                "not-an-image.png": b"this is a text file, not an X-ray\n"}
    extra = []
    for name, data in contents.items():
        uri = join_uri(workdir, "unreadable", name)
        storage.write_bytes(uri, data)
        extra.append({"uri": uri, "label": None, "source": f"demo: {UNREADABLE[name]}"})
    archive = pd.concat([test, pd.DataFrame(extra)], ignore_index=True)
    uri = join_uri(workdir, "test-archive.csv")
    storage.write_bytes(uri, archive.to_csv(index=False).encode(), "text/csv")
    return uri


def resolve_demo_weights(weights: str, storage: Storage) -> str:
    if weights != "auto":
        return weights
    try:
        load_weights("imagenet", storage)
        return "imagenet"
    except WeightsUnavailable:
        print("ImageNet weights are not reachable from here: the demo trains from random "
              "initialisation (--weights none). See README 'ImageNet weights offline'.")
        return "none"


def run_demo(args, storage: Storage) -> dict:
    from covidray.cli import resolved, train_config_from
    from covidray.export import export_run
    from covidray.scoring import score_archive
    from covidray.train import fit

    started = time.time()
    workdir = args.workdir
    storage.ensure_bucket(workdir)
    storage.check(workdir, writable=True)
    data_uri, run, scores = (join_uri(workdir, p) for p in ("data", "run", "scores/test"))
    print(f"[1/4] staging data ({args.data}) at {data_uri}")
    manifest = (stage_synthetic(storage, data_uri, args.images, args.seed) if args.data == "synthetic"
                else stage_folder(storage, data_uri, args.data, args.images, args.seed))
    weights = resolve_demo_weights(resolved(args, "weights"), storage)
    print(f"[2/4] training ({resolved(args, 'epochs')} epochs, weights={weights}) -> {run}")
    trained = fit(train_config_from(args, manifest, run, weights), storage, args.ray_address)
    print(f"[3/4] exporting ONNX -> {RunLayout(run).onnx}")
    exported = export_run(run, storage)
    archive = stage_test_archive(storage, workdir, run)
    print(f"[4/4] scoring {archive} -> {scores}")
    scored = score_archive(archive, RunLayout(run).onnx, scores, storage,
                           ray_address=args.ray_address)
    summary = {"seconds": round(time.time() - started, 1), "weights": trained["weights"],
               "epochs": trained["epochs"], "final_epoch": trained["final"],
               "onnx_parity_max_abs_diff": exported["max_abs_diff_probabilities"],
               "scoring": scored, "artifacts": artifacts(storage, run, scores)}
    print(summary_table(summary))
    return summary


def artifacts(storage: Storage, run: str, scores: str) -> dict:
    run_layout, score_layout = RunLayout(run), ScoreLayout(scores)
    return {"checkpoint": run_layout.model_checkpoint, "onnx": run_layout.onnx,
            "export_report": run_layout.export_report, "history": run_layout.history,
            "splits": run_layout.splits, "predictions": score_layout.predictions,
            "errors": score_layout.errors, "metrics": score_layout.metrics_json,
            "sweep_csv": score_layout.sweep_csv,
            "figures": sorted(u for u in storage.list_files(join_uri(scores, "metrics"), (".png",))),
            "success_marker": score_layout.success}


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
        lines.append(f"{threshold:>9}  {_pct(values['sensitivity']):>11}  "
                     f"{_pct(values['specificity']):>11}")
    lines += ["", "artifacts:"]
    for name, value in summary["artifacts"].items():
        for item in (value if isinstance(value, list) else [value]):
            lines.append(f"  {name:<15} {item}")
    lines.append(f"\ntotal {summary['seconds']} s")
    return "\n".join(lines)


def _pct(value) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
