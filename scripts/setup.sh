#!/usr/bin/env bash
# Set up everything splitfed-edge needs on this machine: a virtual environment at .venv/ with the
# CPU build of torch and the project, the BlazeFace face-detector model, and Mosquitto (for the
# tests and for deployments that use a real broker). Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# The CPU wheel first: a bare "torch" requirement would pull a multi-GB CUDA build.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/python -m pip install --quiet "torch==2.13.0"
fi
.venv/bin/python -m pip install --quiet -e ".[test]"

# BlazeFace short-range (Apache-2.0), taken from the mediapipe wheel on PyPI.
.venv/bin/python scripts/fetch_face_model.py

# Mosquitto, the broker the tests run against (not started here: tests start their own).
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    if [ "$(id -u)" = 0 ]; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
    elif command -v sudo >/dev/null 2>&1; then
        sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mosquitto >/dev/null
    else
        echo "warning: mosquitto is not installed and this user cannot install it; MQTT tests will fail" >&2
    fi
fi
echo "setup done: .venv/ ready"
