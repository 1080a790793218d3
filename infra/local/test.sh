#!/usr/bin/env bash
# The second README command: set up, then run the test suite. Tests start their own S3
# server (free port, temporary directory) and Ray instances; nothing else need be running.
set -euo pipefail
cd "$(dirname "$0")/../.."
infra/local/setup.sh
source .venv/bin/activate
python -m pytest "$@"
