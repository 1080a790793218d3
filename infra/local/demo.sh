#!/usr/bin/env bash
# The first README command: set up, start the local S3 server and Ray head, and submit the
# demo job (stage data -> train -> export -> score) with `ray job submit`.
#   infra/local/demo.sh                          # synthetic X-ray-like data
#   infra/local/demo.sh --data ../shared/data/cxr --images 600   # real chest X-rays
set -euo pipefail
cd "$(dirname "$0")/../.."
infra/local/setup.sh
infra/local/up.sh
source .local/env.sh
source .venv/bin/activate
# Storage settings reach the job (driver and workers) through its runtime environment.
RUNTIME_ENV=$(python - <<'PY'
import json, os
keys = ["AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION",
        "AWS_EC2_METADATA_DISABLED"]
print(json.dumps({"env_vars": {k: os.environ[k] for k in keys}}))
PY
)
ray job submit --address "$COVIDRAY_RAY_DASHBOARD" --working-dir . --runtime-env-json "$RUNTIME_ENV" \
  -- python jobs/demo.py "$@"
echo "Everything the demo wrote is under s3://covidray-demo at $AWS_ENDPOINT_URL;" \
     "source .local/env.sh to reach it (credentials in .local/s3/credentials.json)." >&2
