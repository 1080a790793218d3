#!/usr/bin/env bash
# Submit a covidray job to the local Ray head:
#   infra/local/submit.sh jobs/score.py --archive ... --model ... --output ...
# The job carries locations only: the head (infra/local/up.sh) carries the S3 credentials in
# its environment, as nodes and pods do on a cluster. Nothing secret goes into the runtime
# env, which Ray stores with the job and shows in the dashboard and `ray job list`.
# Needs infra/local/up.sh to have run.
set -euo pipefail
cd "$(dirname "$0")/../.."
source "${COVIDRAY_LOCAL:-.local}/env.sh"
source .venv/bin/activate
exec ray job submit --address "$COVIDRAY_RAY_DASHBOARD" --working-dir . -- python "$@"
