#!/usr/bin/env bash
# Start the local S3 server (SeaweedFS) and a local Ray head, both on 127.0.0.1, and write
# .local/env.sh (readable by you only: it holds the local S3 secret):  source .local/env.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=.venv/bin/python
umask 077
mkdir -p .local
$PY infra/local/s3_server.py start
{ $PY infra/local/s3_server.py env
  $PY infra/local/ray_head.py env   # RAY_AUTH_MODE=token and the token file (0600)
  # Drivers (covidray train/score run here) join through the GCS address; `ray job submit`
  # talks to the dashboard: --address "$COVIDRAY_RAY_DASHBOARD".
  echo "export RAY_ADDRESS=127.0.0.1:${COVIDRAY_RAY_PORT:-6380}"
  echo "export COVIDRAY_RAY_DASHBOARD=http://127.0.0.1:${COVIDRAY_RAY_DASHBOARD_PORT:-8265}"
} > .local/env.sh
chmod 600 .local/env.sh
# The node carries the credentials, as a pod does on Kubernetes: the Ray head starts with the
# S3 settings in its environment and every job and worker on it inherits them, so jobs are
# submitted with no secret in their runtime env (infra/local/submit.sh).
( source .local/env.sh; unset RAY_ADDRESS; $PY infra/local/ray_head.py start )
echo "services up; now: source .local/env.sh" >&2
