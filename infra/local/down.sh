#!/usr/bin/env bash
# Stop what up.sh started (by PID), nothing else: the stack of $COVIDRAY_LOCAL (.local).
set -uo pipefail
cd "$(dirname "$0")/../.."
export COVIDRAY_LOCAL="$(realpath -m "${COVIDRAY_LOCAL:-.local}")"
.venv/bin/python infra/local/ray_head.py stop
.venv/bin/python infra/local/s3_server.py stop
