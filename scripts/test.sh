#!/usr/bin/env bash
# Set up, then run the whole test suite (unit and end-to-end, MQTT over a real Mosquitto).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q "$@"
