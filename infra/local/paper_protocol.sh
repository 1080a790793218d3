#!/usr/bin/env bash
# Real chest X-rays, the paper's protocol, end to end on the local services:
#   infra/local/paper_protocol.sh [--data-dir ../shared/data/cxr] [--name NAME] [protocol options]
# uploads the folder (metadata.csv + images) to s3://covidray-cxr/data, then submits one Ray
# job: train (paper preset unless options say otherwise) -> export -> evaluate, writing
# s3://covidray-cxr/runs/NAME/ (report: .../eval/report/report.html and summary.md).
# Example (what the README's tables came from; ImageNet weights are not reachable here):
#   infra/local/paper_protocol.sh --name paper-random --weights none
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA_DIR=../shared/data/cxr
NAME=paper
ARGS=()
while [ $# -gt 0 ]; do
  case "$1" in
    --data-dir) DATA_DIR="$2"; shift 2 ;;
    --name) NAME="$2"; shift 2 ;;
    *) ARGS+=("$1"); shift ;;
  esac
done
infra/local/setup.sh
infra/local/up.sh
source "${COVIDRAY_LOCAL:-.local}/env.sh"  # the local S3 settings for the upload
.venv/bin/python -c "from covidray.storage import Storage; import sys; sys.exit(0 if Storage().exists('s3://covidray-cxr/data/manifest.csv') else 1)" \
  || .venv/bin/covidray upload --source "$DATA_DIR" --dest s3://covidray-cxr/data
infra/local/submit.sh jobs/protocol.py --data s3://covidray-cxr/data/manifest.csv \
  --run "s3://covidray-cxr/runs/$NAME" "${ARGS[@]}"
