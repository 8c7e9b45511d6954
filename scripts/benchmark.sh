#!/usr/bin/env bash
# Produce BENCHMARKS.md: every number in it is measured by the scripts below, in one run on this
# machine. Slow (tens of minutes on 2 cores); not part of the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
PY=.venv/bin/python
mkdir -p runs/bench
ROUNDS=${ROUNDS:-15}
$PY scripts/bench_core.py --rounds "$ROUNDS" --out runs/bench/core --section runs/bench/core.md
$PY scripts/bench_mqtt.py --out runs/bench/mqtt.md
$PY scripts/bench_export.py --checkpoint runs/bench/core/centralized-2/checkpoint --out runs/bench/export.md
{
    echo "# Benchmarks"
    echo
    echo "Measured by \`scripts/benchmark.sh\` (which runs the \`scripts/bench_*.py\` below) on $(uname -m), $(nproc) cores, $(date -u +%Y-%m-%d). The machine is shared and noisy: compare ratios within one section, not absolute times across sections. Every accuracy here is on SYNTHETIC eye regions (\`splitfed/data/synth.py\`), not on real faces; KDEF could not be fetched on this machine, so the thesis's KDEF numbers are not compared."
    echo
    for f in runs/bench/core.md runs/bench/mqtt.md runs/bench/export.md; do
        [ -f "$f" ] && { cat "$f"; echo; }
    done
} > BENCHMARKS.md
echo "wrote BENCHMARKS.md"
