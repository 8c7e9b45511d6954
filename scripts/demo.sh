#!/usr/bin/env bash
# The demo: set up, then compare the algorithms on the synthetic eye-region set at small scale.
# Leaves runs/demo/results.md, results.csv, comparison.png and per-run curves and confusion plots.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/aggregator compare \
    --algos "${ALGOS:-centralized,fedavg,sl,sflv1,sflv2,pyvertical,fedsl}" \
    --clients "${CLIENTS:-2,5}" --rounds "${ROUNDS:-10}" --synth-identities "${IDENTITIES:-40}" \
    --out "${OUT:-runs/demo}" "$@"
