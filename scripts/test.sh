#!/usr/bin/env bash
# Set up, then run the whole test suite (unit and end-to-end, MQTT over a real Mosquitto).
# Tests run in one pytest-xdist worker per core (SPLITFED_TEST_WORKERS overrides: a number, or 0
# for one process); each module stays on one worker, so its fixtures are built once.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/ruff check .
exec .venv/bin/python -m pytest -q -n "${SPLITFED_TEST_WORKERS:-auto}" --dist loadscope "$@"
