#!/usr/bin/env bash
# The paper's frozen protocol on real X-rays once per registry backbone, timed, then one
# table row per backbone (benchmarks/backbone_results.py):
#   benchmarks/backbone_protocol.sh [--data-dir ../shared/data/cxr]
# Each run is infra/local/paper_protocol.sh (--preset paper: last layer, 100 epochs, batch 20,
# Adam 1e-4, COVID grown to 450) with --backbone and --weights changed: ImageNet where the
# weights install here, random initialisation for ResNet18 (its file cannot be fetched here).
# Resumable: a backbone whose time is recorded (benchmarks/results/backbones/NAME.seconds)
# is not run again.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=benchmarks/results/backbones
mkdir -p "$OUT"
RUNS=("mobilenet_v2 imagenet" "efficientnet_lite0 imagenet" "resnet18 none")
ARGS=()
for spec in "${RUNS[@]}"; do
  read -r backbone weights <<< "$spec"
  name="paper-$backbone-$weights"
  if [ ! -f "$OUT/$name.seconds" ]; then
    start=$(date +%s)
    infra/local/paper_protocol.sh --name "$name" --backbone "$backbone" --weights "$weights" \
      "$@" > "$OUT/$name.log" 2>&1
    echo $(( $(date +%s) - start )) > "$OUT/$name.seconds"
  fi
  ARGS+=("$name=s3://covidray-cxr/runs/$name@$(cat "$OUT/$name.seconds")")
done
source .local/env.sh
.venv/bin/python benchmarks/backbone_results.py "${ARGS[@]}" | tee "$OUT/table.md"
