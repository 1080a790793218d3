#!/usr/bin/env bash
# The first README command: set up, start the local S3 server and Ray head, and submit the
# demo job (stage data -> train -> export -> score) with `ray job submit`.
#   infra/local/demo.sh                          # synthetic X-ray-like data
#   infra/local/demo.sh --data ../shared/data/cxr --images 600   # real chest X-rays
set -euo pipefail
cd "$(dirname "$0")/../.."
infra/local/setup.sh
infra/local/up.sh
# The job runs from its own copy of the working dir: hand it absolute paths to local data.
ARGS=()
while [ $# -gt 0 ]; do
  if [ "$1" = "--data" ] && [ -d "${2:-}" ]; then ARGS+=(--data "$(realpath "$2")"); shift 2
  else ARGS+=("$1"); shift; fi
done
infra/local/submit.sh jobs/demo.py "${ARGS[@]}"
source "${COVIDRAY_LOCAL:-.local}/env.sh"
echo "Everything the demo wrote is under s3://covidray-demo at $AWS_ENDPOINT_URL;" \
     "source $COVIDRAY_LOCAL/env.sh to reach it (credentials in $COVIDRAY_LOCAL/s3/credentials.json)." >&2
