#!/usr/bin/env bash
# Stop what up.sh started (by PID), nothing else.
set -uo pipefail
cd "$(dirname "$0")/../.."
.venv/bin/python infra/local/ray_head.py stop
.venv/bin/python infra/local/s3_server.py stop
