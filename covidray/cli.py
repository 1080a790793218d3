"""``covidray <stage>``: the command line, generated from the stages' configs.

Each stage module (``covidray/stages/<stage>.py``) declares a ``*Config`` dataclass and one
entry function ``f(config, storage, ray_address)``; this module only builds a parser per
stage from the config's fields (:mod:`covidray.config`) and dispatches.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass

from covidray.config import add_options, from_args
from covidray.storage import Storage, StorageSettings


@dataclass(frozen=True)
class Stage:
    name: str
    summary: str
    config: str  # "module:ConfigClass" under covidray.stages, imported when the stage runs
    entry: str  # "module:function"

    def _load(self, spec: str):
        module, name = spec.split(":")
        return getattr(importlib.import_module(f"covidray.stages.{module}"), name)

    def defaults(self):
        return self._load(self.config)()

    def run(self, config, storage: Storage, ray_address: str | None):
        return self._load(self.entry)(config, storage, ray_address)


STAGES = (
    Stage("train", "fine-tune ResNet18 with Ray Train, fed by Ray Data (the paper's protocol "
                   "by default)", "train:TrainConfig", "train:fit"),
    Stage("export", "export a trained run to ONNX, parity-checked against torch",
          "export:ExportConfig", "export:export_run"),
    Stage("score", "score an archive with onnxruntime on Ray Data; write predictions, errors "
                   "and (labelled archives) metrics", "score:ScoreConfig", "score:score_archive"),
    Stage("evaluate", "score a run's val/test splits, choose the operating threshold on val, "
                      "write the report", "evaluate:EvaluateConfig", "evaluate:evaluate_run"),
    Stage("calibrate", "adopt a model at a site: score the site's labelled sample, choose its "
                       "threshold and calibration, write its site card",
          "calibrate:CalibrateConfig", "calibrate:calibrate_site"),
    Stage("protocol", "train, export and evaluate in one job", "protocol:ProtocolConfig",
          "protocol:run_protocol"),
    Stage("upload", "copy a local labelled folder (metadata.csv + images) to storage",
          "upload:UploadConfig", "upload:upload_dataset"),
    Stage("demo", "the whole pipeline on a small dataset (synthetic, or a folder such as "
                  "../shared/data/cxr)", "demo:DemoConfig", "demo:run_demo"),
)
BY_NAME = {stage.name: stage for stage in STAGES}


def _environment_options(parser: argparse.ArgumentParser) -> None:
    """Where storage and the cluster are: settings of the environment, not of the stage."""
    group = parser.add_argument_group("storage and cluster (defaults from the environment)")
    group.add_argument("--s3-endpoint", metavar="URL",
                       help="S3-compatible endpoint, e.g. http://127.0.0.1:8333 "
                            "(default: $AWS_ENDPOINT_URL, else AWS itself)")
    group.add_argument("--s3-region", metavar="REGION",
                       help="region (default: $AWS_REGION / $AWS_DEFAULT_REGION, else us-east-1)")
    group.add_argument("--aws-profile", metavar="NAME",
                       help="named profile from ~/.aws/config (default: $AWS_PROFILE); otherwise "
                            "$AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY")
    group.add_argument("--s3-outage-seconds", metavar="SECONDS", type=float,
                       help="how long transient storage errors are retried before the run "
                            "fails without publishing (default: "
                            f"{StorageSettings.outage_seconds:g})")
    group.add_argument("--ray-address", metavar="ADDRESS",
                       help="Ray cluster to join (default: $RAY_ADDRESS, as set by `ray job "
                            "submit`; else a local Ray instance is started)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidray", description="Train, export and score COVID-19 chest X-ray classifiers "
                                     "(ResNet18) on Ray against S3-compatible storage.")
    commands = parser.add_subparsers(dest="command", required=True)
    for stage in STAGES:
        sub = commands.add_parser(stage.name, help=stage.summary, description=stage.summary)
        add_options(sub, stage.defaults())
        _environment_options(sub)
    return parser


def parse(argv=None) -> tuple[Stage, object, argparse.Namespace]:
    """Command line -> (stage, its config, the namespace with the environment options)."""
    args = build_parser().parse_args(argv)
    stage = BY_NAME[args.command]
    return stage, from_args(args, stage.defaults()), args


def main(argv=None) -> int:
    try:
        stage, config, args = parse(argv)
    except ValueError as exc:  # a value outside an option's bounds (the config says which)
        print(f"covidray: error: {exc}", file=sys.stderr)
        return 2
    from covidray.drift import DriftDetected
    from covidray.storage.lease import LeaseHeld
    from covidray.backbones import WeightsUnavailable
    from covidray.onnx_export import ExportParityError
    from covidray.storage import StorageError

    try:
        storage = Storage(StorageSettings.from_env(args.s3_endpoint, args.s3_region,
                                                   args.aws_profile, args.s3_outage_seconds))
        result = stage.run(config, storage, args.ray_address)
    except DriftDetected as exc:  # --fail-on-drift: the results are published all the same
        print(f"covidray {stage.name}: {exc}", file=sys.stderr)
        return 3
    except (StorageError, WeightsUnavailable, ExportParityError, LeaseHeld, ValueError) as exc:
        print(f"covidray {stage.name}: error: {exc}", file=sys.stderr)
        return 2
    if stage.name == "export":
        result = {k: v for k, v in result.items() if k != "metadata"}
    if stage.name != "demo":  # the demo prints its own summary table
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
