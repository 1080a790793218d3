"""``covidray train | export | score | demo``: the command line, a thin layer over the library."""

from __future__ import annotations

import argparse
import json
import sys

from covidray.augment import AugmentConfig
from covidray.metrics import DEFAULT_THRESHOLD
from covidray.model import TRAIN_LAYERS
from covidray.storage import Storage, StorageSettings


def _storage_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("storage (defaults come from the standard AWS variables)")
    group.add_argument("--s3-endpoint", metavar="URL",
                       help="S3-compatible endpoint, e.g. http://127.0.0.1:8333 "
                            "(default: $AWS_ENDPOINT_URL, else AWS itself)")
    group.add_argument("--s3-region", metavar="REGION",
                       help="region (default: $AWS_REGION / $AWS_DEFAULT_REGION, else us-east-1)")
    group.add_argument("--aws-profile", metavar="NAME",
                       help="named profile from ~/.aws/config (default: $AWS_PROFILE); otherwise "
                            "$AWS_ACCESS_KEY_ID / $AWS_SECRET_ACCESS_KEY")
    parser.add_argument("--ray-address", metavar="ADDRESS",
                        help="Ray cluster to join (default: $RAY_ADDRESS, as set by `ray job "
                             "submit`; else a local Ray instance is started)")


# Every training value comes from a preset unless given on the command line.
PRESETS = {
    # Yamani & Malek: ImageNet ResNet18, last layer only, 100 epochs, batch 20, Adam 1e-4,
    # COVID class grown to 450 with Augmentor (crop, rotation, horizontal/vertical flips).
    "paper": {"epochs": 100, "batch_size": 20, "lr": 1e-4, "weights": "imagenet",
              "train_layers": "fc", "covid_target": 450, "max_rotation": 10,
              "flip_vertical": 0.5},
    # A few quick epochs that learn something even from random initialisation.
    "demo": {"epochs": 6, "batch_size": 20, "lr": 1e-3, "weights": "auto",
             "train_layers": "fc", "covid_target": 0, "max_rotation": 10, "flip_vertical": 0.0},
}


def _train_options(parser: argparse.ArgumentParser, protocol: str) -> None:
    preset = PRESETS[protocol]
    parser.add_argument("--protocol", choices=sorted(PRESETS), default=protocol,
                        help=f"preset for every option below that is not given (default "
                             f"{protocol}; paper = {PRESETS['paper']})")
    parser.add_argument("--epochs", type=int, help=f"passes over the training set ({protocol}: "
                                                   f"{preset['epochs']})")
    parser.add_argument("--batch-size", type=int, help="images per step (paper: 20)")
    parser.add_argument("--lr", type=float, help="Adam learning rate (paper: 1e-4)")
    parser.add_argument("--weights",
                        help="starting weights: imagenet (torchvision IMAGENET1K_V1, hash-checked),"
                             " none (random), a state-dict file path / s3:// URI, or auto "
                             "(imagenet if reachable, else none)")
    parser.add_argument("--train-layers", choices=TRAIN_LAYERS,
                        help="fc: only the last layer on a frozen backbone whose features are "
                             "computed once (paper); all: fine-tune every layer")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    parser.add_argument("--use-gpu", action="store_true", help="one GPU per training worker")
    parser.add_argument("--val-fraction", type=float, default=0.15,
                        help="share of patients held out for validation (rows without a split)")
    parser.add_argument("--test-fraction", type=float, default=0.15,
                        help="share of patients held out for testing (rows without a split)")
    parser.add_argument("--seed", type=int, default=0, help="seeds splits, augmentation, init")
    parser.add_argument("--covid-target", type=int,
                        help="grow the COVID training class to this many images with augmented "
                             "copies (paper: 450; 0 = no copies)")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                        help="operating threshold stored in the model (COVID if score >= it)")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="epochs between checkpoints (default: every epoch when all layers "
                             "train, every 10 for a head on cached features; always the last)")
    parser.add_argument("--max-rotation", type=int, help="augmentation: largest rotation, degrees")
    parser.add_argument("--flip-vertical", type=float,
                        help="augmentation: probability of a vertical flip (paper: 0.5)")


def _evaluate_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target-sensitivity", type=float, default=0.95,
                        help="choose the operating threshold on validation as the highest one "
                             "reaching this sensitivity")
    parser.add_argument("--eval-output", help="where the report goes (default <run>/eval)")
    parser.add_argument("--bootstrap", type=int, default=1000,
                        help="bootstrap replicates (patients resampled) for AUC intervals")
    parser.add_argument("--breakdown", default="source,view,sex,age_group",
                        help="comma-separated columns of the manifest to break results down by "
                             "(those present are used)")


def resolved(args, name: str):
    """An option's value: given on the command line, else the chosen preset's."""
    value = getattr(args, name)
    return PRESETS[args.protocol][name] if value is None else value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidray", description="Train, export and score COVID-19 chest X-ray classifiers "
                                     "(ResNet18) on Ray against S3-compatible storage.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune ResNet18 with Ray Train",
                                description="Fine-tune ResNet18 with Ray Train, fed by Ray Data.")
    train.add_argument("--data", required=True,
                       help="labelled images: a manifest (.csv/.parquet with uri/file, label, "
                            "optional patient_id, split, source) or a prefix <p>/<label>/<file>")
    train.add_argument("--output", required=True, help="run directory (s3://... or a local path)")
    train.add_argument("--resume", action="store_true",
                       help="continue from the newest checkpoint under <output>/train/checkpoints")
    _train_options(train, "paper")
    _storage_options(train)

    export = commands.add_parser("export", help="export a trained run to ONNX",
                                 description="Export <run>/model/model.pt to ONNX and check parity "
                                             "against torch on the run's held-out images.")
    export.add_argument("--run", required=True, help="run directory written by `covidray train`")
    export.add_argument("--output", help="where to write the .onnx (default <run>/model/model.onnx)")
    _storage_options(export)

    score = commands.add_parser("score", help="score an archive with onnxruntime on Ray Data",
                                description="Score every image of an archive; write predictions, "
                                            "errors and (when labels are known) metrics.")
    score.add_argument("--archive", required=True,
                       help="a prefix of images (labels from <p>/<label>/ folders when present) "
                            "or a manifest .csv/.parquet")
    score.add_argument("--model", required=True, help="model.onnx written by `covidray export`")
    score.add_argument("--output", required=True, help="output directory (s3://... or a path)")
    score.add_argument("--threshold", type=float,
                       help="operating threshold (default: the one stored in the model)")
    score.add_argument("--batch-size", type=int, default=32, help="images per inference batch")
    score.add_argument("--actors", type=int,
                       help="most onnxruntime actors (default: sized from the cluster)")
    _storage_options(score)

    evaluate = commands.add_parser(
        "evaluate", help="score a run's val/test splits and write the evaluation report",
        description="Score the run's validation and test splits with its ONNX model, choose the "
                    "operating threshold on validation, report everything on test.")
    evaluate.add_argument("--run", required=True, help="run directory (trained and exported)")
    _evaluate_options(evaluate)
    _storage_options(evaluate)

    protocol = commands.add_parser(
        "protocol", help="train, export and evaluate in one go (the paper's protocol by default)",
        description="train -> export -> evaluate on one labelled dataset.")
    protocol.add_argument("--data", required=True, help="labelled images (manifest or prefix)")
    protocol.add_argument("--output", required=True, help="run directory")
    _train_options(protocol, "paper")
    _evaluate_options(protocol)
    _storage_options(protocol)

    upload = commands.add_parser(
        "upload", help="copy a local labelled folder (metadata.csv + images) to storage",
        description="Upload <source>/metadata.csv's images and write <dest>/manifest.csv with "
                    "all of its columns (label, patient_id, split_group, source, ...).")
    upload.add_argument("--source", required=True, help="folder with metadata.csv (file, label, ...)")
    upload.add_argument("--dest", required=True, help="where to put it, e.g. s3://bucket/cxr")
    upload.add_argument("--images", type=int,
                        help="at most this many images, whole patient groups (default: all)")
    upload.add_argument("--seed", type=int, default=0, help="seeds the choice of groups")
    _storage_options(upload)

    demo = commands.add_parser("demo", help="the whole pipeline on a small dataset",
                               description="Upload a dataset (synthetic, or a folder with "
                                           "metadata.csv such as ../shared/data/cxr), train, "
                                           "export, score its test split and print a summary.")
    demo.add_argument("--data", default="synthetic",
                      help="'synthetic' or a folder holding metadata.csv (file, label, ...)")
    demo.add_argument("--workdir", default="s3://covidray-demo",
                      help="where the demo writes everything (bucket created if missing)")
    demo.add_argument("--images", type=int, default=240,
                      help="synthetic: images to make; a folder: most images to use "
                           "(whole patient groups, both classes kept)")
    _train_options(demo, "demo")
    _storage_options(demo)
    return parser


def storage_from(args) -> Storage:
    return Storage(StorageSettings.from_env(args.s3_endpoint, args.s3_region, args.aws_profile))


def train_config_from(args, data: str, output: str, weights: str | None = None):
    from covidray.train import TrainConfig

    return TrainConfig(
        data=data, output=output, protocol=args.protocol, epochs=resolved(args, "epochs"),
        batch_size=resolved(args, "batch_size"), lr=resolved(args, "lr"),
        weights=weights or resolved(args, "weights"),
        train_layers=resolved(args, "train_layers"), workers=args.workers,
        use_gpu=args.use_gpu, val_fraction=args.val_fraction, test_fraction=args.test_fraction,
        seed=args.seed, covid_target=resolved(args, "covid_target"), threshold=args.threshold,
        checkpoint_every=args.checkpoint_every,
        augment=AugmentConfig(max_rotation_degrees=resolved(args, "max_rotation"),
                              flip_vertical_probability=resolved(args, "flip_vertical")),
        resume=getattr(args, "resume", False))


def run(args) -> dict:
    storage = storage_from(args)
    if args.command == "train":
        from covidray.train import fit

        return fit(train_config_from(args, args.data, args.output), storage, args.ray_address)
    if args.command == "export":
        from covidray.export import export_run

        report = export_run(args.run, storage, args.output)
        return {k: v for k, v in report.items() if k != "metadata"}
    if args.command == "score":
        from covidray.scoring import score_archive

        return score_archive(args.archive, args.model, args.output, storage, args.threshold,
                             args.batch_size, args.actors, args.ray_address)
    if args.command in ("evaluate", "protocol"):
        from covidray.report import evaluate_run

        result = {}
        run_dir = args.run if args.command == "evaluate" else args.output
        if args.command == "protocol":
            from covidray.export import export_run
            from covidray.train import fit

            result["train"] = fit(train_config_from(args, args.data, args.output), storage,
                                  args.ray_address)
            exported = export_run(args.output, storage)
            result["export"] = {k: v for k, v in exported.items() if k != "metadata"}
        result["evaluation"] = evaluate_run(
            run_dir, storage, args.target_sensitivity, args.eval_output,
            tuple(c for c in args.breakdown.split(",") if c), args.bootstrap, args.ray_address)
        return result
    if args.command == "upload":
        from covidray.demo import stage_folder

        storage.ensure_bucket(args.dest)
        return {"manifest": stage_folder(storage, args.dest, args.source, args.images, args.seed)}
    from covidray.demo import run_demo

    return run_demo(args, storage)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from covidray.export import ExportParityError
    from covidray.model import WeightsUnavailable
    from covidray.storage import StorageError

    try:
        result = run(args)
    except (StorageError, WeightsUnavailable, ExportParityError, ValueError) as exc:
        print(f"covidray {args.command}: error: {exc}", file=sys.stderr)
        return 2
    if args.command != "demo":  # the demo prints its own summary table
        print(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
