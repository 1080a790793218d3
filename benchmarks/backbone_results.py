#!/usr/bin/env python3
"""One row per backbone: the paper's frozen protocol on real X-rays, from evaluated runs.

    source .local/env.sh   # the local S3 server the runs were written to
    python benchmarks/backbone_results.py NAME=s3://covidray-cxr/runs/NAME[@SECONDS] ...

For each evaluated run (``covidray protocol`` or ``infra/local/paper_protocol.sh``) it reads
the val and test predictions ``covidray evaluate`` wrote, the report and the model card, and
prints a Markdown table: validation and test ROC AUC overall and within each source that
holds both classes, each with its patient-level bootstrap 95% CI (1,000 replicates, the
evaluation's own functions), the shortcut audit's source AUC (macro over sources), the
backbone and weights the run started from, and the job's time (``@SECONDS``, as measured
by the caller). Each row is also written to
``benchmarks/results/backbones/NAME.json``. Nothing is trained or scored here.
"""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from covidray.evaluation import bootstrap_interval, labelled  # noqa: E402
from covidray.layout import EvalLayout, RunLayout, ScoreLayout  # noqa: E402
from covidray.metrics import decimal, roc_auc  # noqa: E402
from covidray.storage import Storage  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPLICATES = 1000


def auc_with_interval(frame) -> dict:
    interval = bootstrap_interval(frame, roc_auc, REPLICATES, seed=0)
    return {"images": int(len(frame)), "covid": int(frame["target"].sum()),
            "auc": roc_auc(frame["score"], frame["target"]), "ci95": interval}


def run_row(storage: Storage, name: str, run_uri: str, seconds: float | None) -> dict:
    run = RunLayout(run_uri)
    evaluation = EvalLayout(run.eval_dir)
    report = storage.read_json(evaluation.report_file("report.json"))
    card = storage.read_json(run.model_card)
    row = {"name": name, "run": run_uri, "seconds": seconds,
           "starting_weights": card["starting_weights"],
           "audit_source_auc": report.get("audit", {}).get("predictability", {})
           .get("source", {}).get("macro_auc")}
    for split in ("val", "test"):
        frame = labelled(storage.read_parquet_dir(ScoreLayout(evaluation.scores(split))
                                                  .predictions))
        within = {}
        for source, part in frame.groupby("source"):
            if part["target"].nunique() == 2:
                within[str(source)] = auc_with_interval(part)
        row[split] = {"overall": auc_with_interval(frame), "within_source": within}
    return row


def cell(entry: dict) -> str:
    low_high = entry["ci95"]
    interval = f" ({decimal(low_high[0])}-{decimal(low_high[1])})" if low_high else ""
    return f"{decimal(entry['auc'])}{interval}"


def markdown(rows: list[dict]) -> str:
    sources = sorted({s for row in rows for split in ("val", "test")
                      for s in row[split]["within_source"]})
    header = ["backbone, weights", "val AUC", "test AUC",
              *(f"{split} AUC within {s} (covid/images)" for s in sources
                for split in ("val", "test")),
              "audit: source AUC", "job time"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        weights = row["starting_weights"]
        within = []
        for source in sources:
            for split in ("val", "test"):
                entry = row[split]["within_source"].get(source)
                within.append(f"{cell(entry)} ({entry['covid']}/{entry['images']})" if entry
                              else "n/a (one class)")
        seconds = f"{row['seconds'] / 60:.1f} min" if row["seconds"] else "n/a"
        lines.append("| " + " | ".join([
            f"{weights['backbone']}, {weights['weights']}", cell(row["val"]["overall"]),
            cell(row["test"]["overall"]), *within, decimal(row["audit_source_auc"]),
            seconds]) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    storage, rows = Storage(), []
    for argument in argv:
        name, _, rest = argument.partition("=")
        run_uri, _, seconds = rest.partition("@")
        row = run_row(storage, name, run_uri, float(seconds) if seconds else None)
        os.makedirs(os.path.join(HERE, "results", "backbones"), exist_ok=True)
        with open(os.path.join(HERE, "results", "backbones", f"{name}.json"), "w") as fh:
            json.dump(row, fh, indent=1)
        rows.append(row)
    print(markdown(rows))


if __name__ == "__main__":
    main(sys.argv[1:])
