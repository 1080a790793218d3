#!/usr/bin/env bash
# Start the local S3 server (SeaweedFS) and a local Ray head, both on 127.0.0.1, and write
# $COVIDRAY_LOCAL/env.sh (readable by you only: it holds the local S3 secret):
#   source .local/env.sh
# A second stack beside the first: its own state folder and ports, e.g.
#   COVIDRAY_LOCAL=/tmp/b COVIDRAY_S3_PORT=8334 COVIDRAY_RAY_PORT=6381 \
#   COVIDRAY_RAY_DASHBOARD_PORT=8266 COVIDRAY_RAY_CLIENT_PORT=10000 \
#   COVIDRAY_RAY_AGENT_PORT=52375 infra/local/up.sh
# Each port is checked free first; a taken one is named with the variable that moves it.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
umask 077
export COVIDRAY_LOCAL="$(realpath -m "${COVIDRAY_LOCAL:-.local}")"
mkdir -p "$COVIDRAY_LOCAL"
$PY infra/local/s3_server.py start
{ $PY infra/local/s3_server.py env
  $PY infra/local/ray_head.py env   # RAY_AUTH_MODE=token and the token file (0600)
  # Drivers (covidray train/score run here) join through the GCS address; `ray job submit`
  # talks to the dashboard: --address "$COVIDRAY_RAY_DASHBOARD".
  echo "export RAY_ADDRESS=127.0.0.1:${COVIDRAY_RAY_PORT:-6380}"
  echo "export COVIDRAY_RAY_DASHBOARD=http://127.0.0.1:${COVIDRAY_RAY_DASHBOARD_PORT:-8265}"
  echo "export COVIDRAY_LOCAL=$COVIDRAY_LOCAL"
} > "$COVIDRAY_LOCAL/env.sh"
chmod 600 "$COVIDRAY_LOCAL/env.sh"
# The node carries the credentials, as a pod does on Kubernetes: the Ray head starts with the
# S3 settings in its environment and every job and worker on it inherits them, so jobs are
# submitted with no secret in their runtime env (infra/local/submit.sh).
( source "$COVIDRAY_LOCAL/env.sh"; unset RAY_ADDRESS; $PY infra/local/ray_head.py start )
echo "services up; now: source $COVIDRAY_LOCAL/env.sh" >&2
