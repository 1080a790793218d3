#!/usr/bin/env bash
# Submit a covidray job to the local Ray head, passing the local S3 settings through the
# job's runtime environment (how a job reaches storage on any cluster):
#   infra/local/submit.sh jobs/score.py --archive ... --model ... --output ...
# Needs infra/local/up.sh to have run.
set -euo pipefail
cd "$(dirname "$0")/../.."
source .local/env.sh
source .venv/bin/activate
RUNTIME_ENV=$(python - <<'PY'
import json, os
keys = ["AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
        "AWS_EC2_METADATA_DISABLED"]
print(json.dumps({"env_vars": {k: os.environ[k] for k in keys}}))
PY
)
ray job submit --address "$COVIDRAY_RAY_DASHBOARD" --working-dir . \
  --runtime-env-json "$RUNTIME_ENV" -- python "$@"
