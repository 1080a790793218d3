"""Drift watch on real X-rays: one source of ``../shared/data/cxr`` as the reference, another
as the "new scanner".

    python benchmarks/drift_by_source.py --model s3://covidray-cxr/runs/paper-random/model/model.onnx

Takes the test split (patient groups, seed 0: the split the protocol's runs hold out) of
``../shared/data/cxr``, scores the images of ``--reference-source`` with ``covidray score``
(local paths, a private local Ray instance), makes the reference profile from them exactly
as ``covidray evaluate`` does from a validation split, then scores ``--same-source`` images
of the reference's own source that were not in the reference (it should not drift) and
``--new-source`` (it should), and prints each run's verdict and figures; ``drift.png`` of
the new source goes to ``--figure``. Without ``--model`` it exports a randomly initialised
ResNet18 (the input statistics do not depend on the model; its score does, so the score's
drift then means nothing) and says so.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from covidray.datasets import assign_splits, load_index  # noqa: E402
from covidray.drift import make_reference  # noqa: E402
from covidray.layout import ScoreLayout, drift_reference_beside  # noqa: E402
from covidray.stages.score import ScoreConfig, score_archive  # noqa: E402
from covidray.stages.train import TrainConfig  # noqa: E402
from covidray.storage import Storage  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=os.path.join(HERE, "..", "..", "shared", "data", "cxr"))
    parser.add_argument("--model", help="model.onnx (default: random ResNet18 weights)")
    parser.add_argument("--reference-source", default="covid19-radiography-rsna-normal")
    parser.add_argument("--new-source", default="nih-chestxray8-darkcovidnet")
    parser.add_argument("--figure", default=os.path.join(HERE, "results", "drift-by-source",
                                                         "drift.png"))
    args = parser.parse_args()
    storage, work = Storage(), tempfile.mkdtemp(prefix="covidray-drift-")
    index = load_index(storage, os.path.join(args.data, "metadata.csv"))
    defaults = TrainConfig()  # the split the protocol holds out
    test = assign_splits(index, defaults.val_fraction, defaults.test_fraction, defaults.seed)
    test = test[test["split"] == "test"]
    model = os.path.join(work, "model", "model.onnx")
    os.makedirs(os.path.dirname(model))
    if args.model:
        storage.write_bytes(model, storage.read_bytes(args.model))
        print(f"model: {args.model}")
    else:
        from covidray.model import build_model
        from covidray.onnx_export import export_onnx, model_metadata

        storage.write_bytes(model, export_onnx(build_model("none"),
                                               model_metadata(0.5, "none", {}, 0)))
        print("model: random ResNet18 weights (the score's drift means nothing here)")
    reference_rows = test[test["source"] == args.reference_source].sample(frac=1, random_state=0)
    half = len(reference_rows) // 2
    archives = {"reference": reference_rows.head(half),
                f"same source ({args.reference_source}, other images)": reference_rows.tail(
                    len(reference_rows) - half),
                f"new source ({args.new_source})": test[test["source"] == args.new_source]}
    outputs = {}
    for number, (name, rows) in enumerate(archives.items()):
        manifest = storage.write_table(os.path.join(work, f"archive-{number}.csv"),
                                       rows[["uri", "label", "source"]])
        output = os.path.join(work, f"scores-{number}")
        summary = score_archive(ScoreConfig(manifest, model, output, threshold=0.5), storage)
        outputs[name] = (output, summary)
        if name == "reference":
            layout = ScoreLayout(output)
            storage.write_json(drift_reference_beside(model), make_reference(
                storage.read_parquet_dir(layout.predictions),
                storage.read_parquet_dir(layout.errors), 0.5, summary["model_digest"],
                f"{args.reference_source}, {len(rows)} test images"))
    print("\n| archive | images | verdict |\n|---|---:|---|")
    for name, (output, summary) in list(outputs.items())[1:]:
        print(f"| {name} | {summary['scored']} | {summary['drift']['verdict']} |")
    output, _ = list(outputs.values())[-1]
    drift = storage.read_json(ScoreLayout(output).drift_json)
    print(f"\n{args.new_source} against {args.reference_source}:")
    print("| quantity | statistic | value | limit | drifted |\n|---|---|---:|---:|---|")
    for quantity, entry in drift["quantities"].items():
        print(f"| {quantity} | {entry['statistic']} | {entry['value']:g} | "
              f"{entry.get('limit', '')} | {'yes' if entry['drifted'] else 'no'} |")
    os.makedirs(os.path.dirname(args.figure), exist_ok=True)
    shutil.copy(ScoreLayout(output).drift_png, args.figure)
    print(f"\nfigure: {args.figure}")


if __name__ == "__main__":
    main()
