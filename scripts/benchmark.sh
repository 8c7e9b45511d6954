#!/usr/bin/env bash
# Produce BENCHMARKS.md: every number in it is measured by the scripts below, in one run on this
# machine. Slow (a few hours on 2 cores); not part of the tests. Each script writes its section
# under runs/bench/; the last step puts them together. SECTIONS=core,mqtt,... runs only those
# and keeps the other sections' files from earlier runs.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
PY=.venv/bin/python
B=runs/bench
mkdir -p "$B"
ROUNDS=${ROUNDS:-15}
SECTIONS=${SECTIONS:-core,mqtt,robust,soak,scale,views,recipe,shift,privacy,export}
want() { [[ ",$SECTIONS," == *",$1,"* ]]; }

want core && $PY scripts/bench_core.py --rounds "$ROUNDS" --out $B/core --section $B/core.md
# Bytes a round when devices sit out their empty parts of a cut round, against every part.
want core && $PY scripts/bench_empty_parts.py > $B/empty_parts.md
# The federation over Mosquitto, and every deployable algorithm against the simulator.
want mqtt && $PY scripts/bench_mqtt.py --out $B/mqtt.md
want mqtt && $PY scripts/bench_split_batch.py --clients 2,5 --rounds 3 > $B/split_batch.md
# One malicious device against mean and the robust rule (issue 8).
want robust && $PY scripts/bench_robust.py --out $B
# The malicious agent over MQTT at the benchmark's size (the test command runs the short one).
want robust && .venv/bin/python -m pytest -q -m soak tests/mqtt/test_poison.py
# Chaos soak: kills, restarts, a broker restart, hostile traffic; each run <= 5 min.
want soak && $PY scripts/soak.py --out runs/soak/soak.json
# Aggregator workers: samples/s and round time by agents and workers, side by side.
want scale && $PY scripts/bench_scale.py --agents 10,50,200 --workers 1,2,4 --rounds 2 --identities 250
# SFLV1 server-half batching (torch.func.vmap over the copies) against the per-copy step.
want scale && $PY scripts/bench_server_batching.py --out $B/batching.md
# PyVertical on several cameras against one.
want views && $PY scripts/bench_views.py --out $B/views
# 5-fold cross-validated: old inputs against the recipe, scratch against pretrained, 2/5/10 clients.
# Averages per round (--syncs-per-round): one, four and sixteen, 5-fold, at the demo's size.
want recipe && for syncs in 1 4 16; do
    .venv/bin/aggregator compare --algos centralized,sflv1,sflv2 --clients "$([ $syncs = 1 ] && echo 2 || echo 2,5,10)" \
        --rounds 20 --synth-identities 40 --batch-size 16 --folds 5 --no-shift --jobs "$(nproc)" \
        --syncs-per-round $syncs --out $B/syncs-$syncs >/dev/null
done
want recipe && $PY scripts/bench_recipe.py --identities 40 --per-emotion 3 --rounds 20 --folds 5 \
    --clients 2,5,10 --old-clients 2 --batch-size 16 --jobs "$(nproc)" --out $B/recipe
# The same matrix's federated cells from scratch with four averages a round (the earlier default).
want recipe && $PY scripts/bench_recipe.py --identities 40 --per-emotion 3 --rounds 20 --folds 5 \
    --clients 2,5,10 --recipes recipe --starts scratch --algos sflv1,sflv2 --syncs 4 \
    --batch-size 16 --jobs "$(nproc)" --out $B/recipe-syncs-4
# Four seeds at two and five clients: each cell's paired difference from centralized over 20 runs,
# with the default warm-up (two rounds) and, for centralized, without it (warmup=0).
want recipe && { echo '```'; $PY scripts/probe_cells.py --seeds 0,1,2,3 --jobs "$(nproc)" \
    centralized:1:16:16,sflv1:2:16:16,sflv2:2:16:16,sflv1:5:16:16,sflv2:5:16:16,centralized:1:16:16:warmup=0 \
    2>/dev/null; echo '```'; } > $B/seeds.md
# Ten clients, seed 0, with the default warm-up.
want recipe && { echo '```'; $PY scripts/probe_cells.py --jobs "$(nproc)" \
    centralized:1:16:16,sflv1:10:16:16,sflv2:10:16:16 2>/dev/null; echo '```'; } > $B/ten.md
# Levers that failed without warm-up, with it: server lr ~sqrt(K), FedAvgM, geometric jitter.
want recipe && { echo '```'; $PY scripts/probe_cells.py --seeds 0,1 --jobs "$(nproc)" \
    centralized:1:16:16,sflv1:2:16:16:-:1.4,sflv1:5:16:16:-:1.5,sflv1:5:16:16:-:2.2,sflv2:5:16:16:-:2.2,sflv1:5:16:16:-:0.5:server=momentum:momentum=0.8,sflv2:5:16:16:-:0.5:server=momentum:momentum=0.8,centralized:1:16:16:geo=0.1/4/0.06,centralized:1:16:16:geo=0.2/8/0.12 \
    2>/dev/null; echo '```'; } > $B/levers.md
# The batch shared by the devices (`--split-batch`, the default since): four seeds at 2 and 5
# clients and two at 10, paired with centralized; the cells above name whole batches.
want recipe && { echo '```'; $PY scripts/probe_cells.py --seeds 0,1,2,3 --jobs "$(nproc)" \
    centralized:1:16:16,sflv1:2:16:16:split=1,sflv2:2:16:16:split=1,sflv1:5:16:16:split=1,sflv2:5:16:16:split=1 \
    2>/dev/null; echo '```'; } > $B/shared.md
want recipe && { echo '```'; $PY scripts/probe_cells.py --seeds 0,1 --jobs "$(nproc)" \
    centralized:1:16:16,sflv1:10:16:16:split=1,sflv2:10:16:16:split=1 2>/dev/null; echo '```'; } > $B/shared_ten.md
# SFLV2's server schedule with the shared batch: lockstep (the default since, in the cells
# above) against interleaving, paired with centralized.
want recipe && { echo '```'; $PY scripts/probe_cells.py --seeds 0,1,2,3 --jobs "$(nproc)" \
    centralized:1:16:16,sflv2:2:16:16:interleaved:split=1,sflv2:5:16:16:interleaved:split=1 \
    2>/dev/null; echo '```'; } > $B/lockstep.md
want recipe && { echo '```'; $PY scripts/probe_cells.py --seeds 0,1 --jobs "$(nproc)" \
    centralized:1:16:16,sflv2:10:16:16:interleaved:split=1 2>/dev/null; echo '```'; } > $B/lockstep_ten.md
# The root of the device count as server lr (`--server-opt sgd --server-lr sqrt`), shared batch.
want recipe && { echo '```'; $PY scripts/probe_cells.py --seeds 0,1 --jobs "$(nproc)" \
    centralized:1:16:16,sflv1:10:16:16:split=1,sflv1:10:16:16:-:sqrt:split=1,sflv2:10:16:16:split=1,sflv2:10:16:16:lockstep:sqrt:split=1 \
    2>/dev/null; echo '```'; } > $B/sqrt_ten.md
want recipe && { echo '```'; $PY scripts/probe_cells.py --seeds 0 --jobs "$(nproc)" \
    centralized:1:16:16,sflv1:2:16:16:split=1,sflv1:2:16:16:-:sqrt:split=1,sflv2:2:16:16:lockstep:sqrt:split=1,sflv1:5:16:16:split=1,sflv1:5:16:16:-:sqrt:split=1,sflv2:5:16:16:lockstep:sqrt:split=1 \
    2>/dev/null; echo '```'; } > $B/sqrt.md
# What limits the domain-shift gap: zoom jitter and anti-aliased downsampling, and what the blur costs.
want shift && { echo '```'; $PY scripts/probe_cells.py --seeds 0,1,2 --jobs "$(nproc)" \
    centralized:1:16:16,centralized:1:16:16:geo=0.2/0/0,centralized:1:16:16:aa=1 \
    2>/dev/null; echo '```'; } > $B/shift_levers.md
want shift && { echo '```'; $PY scripts/probe_cells.py --seeds 0,1 --jobs "$(nproc)" \
    sflv1:2:16:16:split=1,sflv1:2:16:16:split=1:aa=1,sflv2:2:16:16:lockstep:split=1,sflv2:2:16:16:lockstep:split=1:aa=1 \
    2>/dev/null; echo '```'; } > $B/antialias_fed.md
want shift && OMP_NUM_THREADS=1 $PY scripts/bench_antialias.py 2>/dev/null > $B/antialias_cost.md
# Anti-aliasing at ten clients with the root as server lr, paired with centralized with the blur.
want shift && { echo '```'; $PY scripts/probe_cells.py --seeds 0,1 --jobs "$(nproc)" \
    centralized:1:16:16:aa=1,sflv1:10:16:16:-:sqrt:split=1:aa=1,sflv2:10:16:16:lockstep:sqrt:split=1:aa=1 \
    2>/dev/null; echo '```'; } > $B/antialias_ten.md
# Test-time averaging (`evaluate/predict --tta`): every cell prints it; centralized and SFLV1 x2.
want shift && { echo '```'; $PY scripts/probe_cells.py --seeds 0,1,2 --jobs "$(nproc)" \
    centralized:1:16:16,sflv1:2:16:16:split=1 2>/dev/null; echo '```'; } > $B/tta.md
# Epochs: centralized at 40, 80 and 160, the federated cells at 40, and at ten devices at 80.
want shift && { echo '```'; $PY scripts/probe_cells.py --seeds 0,1,2 --jobs "$(nproc)" --curves \
    centralized:1:16:16:rounds=40,sflv1:10:16:16:-:sqrt:split=1:rounds=40,sflv2:10:16:16:lockstep:sqrt:split=1:rounds=40 \
    2>/dev/null; echo '```'; } > $B/epochs_ten.md
want shift && { echo '```'; $PY scripts/probe_cells.py --seeds 0 --jobs "$(nproc)" \
    centralized:1:16:16:rounds=80,centralized:1:16:16:rounds=160 2>/dev/null; echo '```'; } > $B/epochs_80.md
want shift && { echo '```'; $PY scripts/probe_cells.py --seeds 0,1,2 --jobs "$(nproc)" \
    centralized:1:16:16:rounds=40,sflv1:5:16:16:split=1:rounds=40,sflv2:5:16:16:lockstep:split=1:rounds=40,sflv1:2:16:16:split=1:rounds=40,sflv2:2:16:16:lockstep:split=1:rounds=40 \
    2>/dev/null; echo '```'; } > $B/epochs_two_five.md
# The shift levers at 80 epochs: `--recipe other-cameras` (aggregator.options.RECIPES: every
# jitter at once with the blur, 160 epochs), and the same at 80 epochs.
OTHER_CAMERAS=recipe=other-cameras
want shift && { echo '```'; $PY scripts/probe_cells.py --seeds 0 --jobs "$(nproc)" \
    centralized:1:16:16:rounds=80,centralized:1:16:16:$OTHER_CAMERAS:rounds=80,centralized:1:16:16:$OTHER_CAMERAS \
    2>/dev/null; echo '```'; } > $B/shift_80.md
# The recipe's SFLV1 and SFLV2 at two and at five devices on seeds 0 and 1 (paired with
# the centralized recipe cells of shift_80 and recipe_s1 by hand), and seed 1 centralized against
# the default and against the recipe without the blur.
want shift && { echo '```'; $PY scripts/probe_cells.py --seeds 0,1 --jobs "$(nproc)" \
    sflv1:2:16:16:split=1:$OTHER_CAMERAS,sflv2:2:16:16:lockstep:split=1:$OTHER_CAMERAS 2>/dev/null; echo '```'; } \
    > $B/recipe_fed.md
want shift && { echo '```'; $PY scripts/probe_cells.py --seeds 0,1 --jobs "$(nproc)" \
    sflv1:5:16:16:split=1:$OTHER_CAMERAS,sflv2:5:16:16:lockstep:split=1:$OTHER_CAMERAS 2>/dev/null; echo '```'; } \
    > $B/recipe_fed5.md
want shift && { echo '```'; $PY scripts/probe_cells.py --seeds 1 --jobs "$(nproc)" \
    centralized:1:16:16:rounds=80,centralized:1:16:16:$OTHER_CAMERAS,centralized:1:16:16:$OTHER_CAMERAS:aa=0 \
    2>/dev/null; echo '```'; } > $B/recipe_s1.md
# The default of 80 epochs at ten devices.
want shift && { echo '```'; $PY scripts/probe_cells.py --seeds 0 --jobs "$(nproc)" \
    centralized:1:16:16:rounds=80,sflv1:10:16:16:-:sqrt:split=1:rounds=80,sflv2:10:16:16:lockstep:sqrt:split=1:rounds=80 \
    2>/dev/null; echo '```'; } > $B/epochs_ten_80.md
# What test-time averaging costs the device's offline live inference.
want export && OMP_NUM_THREADS=1 $PY scripts/bench_live_tta.py 2>/dev/null > $B/live_tta.md
want shift && $PY scripts/bench_shift.py --identities 70 --epochs 15 > $B/shift.md
# The default input recipe (per-crop norm, camera jitter) against the old inputs, via compare.
want shift && $PY scripts/bench_input_recipe.py --out $B/input_recipe.md
want privacy && $PY scripts/bench_privacy.py --section $B/privacy.md
# The same attack on the anti-aliased network, beside the default one with the same settings.
for aa in "" --antialias; do
    want privacy && $PY scripts/bench_privacy.py --settings none,cut-4-noise-2-int8 $aa \
        --out $B/privacy${aa:+_aa} --section $B/privacy_two${aa:+_aa}.md
done
# Accuracy of the defences, cross-validated: the old and new `recommended` and the cut-4 noises.
want privacy && { echo '```'; $PY scripts/probe_cells.py --seeds 0,1 --jobs "$(nproc)" \
    sflv1:2:16:16,sflv1:2:16:16:defence=cut-3-bottleneck-8-noise-1-int8,sflv1:2:16:16:defence=cut-4-noise-1-int8,sflv1:2:16:16:defence=cut-4-noise-1.5-int8,sflv1:2:16:16:defence=cut-4-noise-2-int8 \
    2>/dev/null; echo '```'; } > $B/defences.md
# What the client half's change between two averages adds to the smashed data, by part size.
want privacy && $PY scripts/bench_update_privacy.py --settings cut-3-bottleneck-8-noise-1-int8,cut-4-noise-2-int8 \
    --parts 1x1,1x2,1x4,1x8,1x32 --samples 1024 --epochs 20 --out $B/update_privacy
want export && $PY scripts/bench_export.py --checkpoint $B/core/centralized-2/checkpoint --out $B/export.md

section() {  # section TITLE FILE: a "## TITLE" header over FILE, without the file's own first heading
    [ -f "$2" ] || return 0
    echo "## $1"
    echo
    sed '1{/^#/d}' "$2"
    echo
}
{
    echo "# Benchmarks"
    echo
    echo "Measured by \`scripts/benchmark.sh\` (which runs the \`scripts/bench_*.py\` below) on $(uname -m), $(nproc) cores, $(date -u +%Y-%m-%d). The machine is shared and noisy: compare ratios within one section, not absolute times across sections. Every accuracy here is on SYNTHETIC eye regions (\`splitfed/data/synth.py\`), not on real faces; KDEF could not be fetched on this machine, so the thesis's KDEF numbers are not compared."
    echo
    for f in $B/core.md $B/mqtt.md; do
        [ -f "$f" ] && { cat "$f"; echo; }
    done
    section "Empty parts of a cut round: bytes a round (\`scripts/bench_empty_parts.py\`)" $B/empty_parts.md
    section "One malicious device against the aggregation rules (\`scripts/bench_robust.py\`)" $B/robust.md
    section "Chaos soak (\`scripts/soak.py\`)" runs/soak/soak.md
    [ -f $B/scale.md ] && { cat $B/scale.md; echo; }
    [ -f $B/batching.md ] && { cat $B/batching.md; echo; }
    section "PyVertical on several cameras against one (\`scripts/bench_views.py\`)" $B/views/results.md
    section "Averages per round: one (\`aggregator compare --syncs-per-round 1 --folds 5\`)" $B/syncs-1/results.md
    section "Averages per round: four (\`aggregator compare --syncs-per-round 4 --folds 5\`)" $B/syncs-4/results.md
    section "Averages per round: sixteen (\`aggregator compare --syncs-per-round 16 --folds 5\`)" $B/syncs-16/results.md
    section "Cross-validated, four averages a round (\`scripts/bench_recipe.py --syncs 4\`)" $B/recipe-syncs-4/results.md
    section "Cross-validated accuracy: from scratch and pretrained (\`scripts/bench_recipe.py\`)" $B/recipe/results.md
    section "Four seeds at two and five clients, paired with centralized (\`scripts/probe_cells.py --seeds 0,1,2,3\`)" $B/seeds.md
    section "Ten clients, seed 0 (\`scripts/probe_cells.py\`)" $B/ten.md
    section "Server lr, FedAvgM and geometric jitter with warm-up, seeds 0 and 1 (\`scripts/probe_cells.py\`)" $B/levers.md
    section "A batch shared by the devices, four seeds (\`scripts/probe_cells.py ... split=1\`)" $B/shared.md
    section "A batch shared by the devices, ten clients, seeds 0 and 1 (\`scripts/probe_cells.py ... split=1\`)" $B/shared_ten.md
    section "SFLV2 interleaved with the shared batch, four seeds (the shared cells above run lockstep, the default)" $B/lockstep.md
    section "SFLV2 interleaved with the shared batch, ten clients, seeds 0 and 1" $B/lockstep_ten.md
    section "The root of the device count as server lr, ten clients, seeds 0 and 1" $B/sqrt_ten.md
    section "The root of the device count as server lr, two and five clients, seed 0" $B/sqrt.md
    section "What sharing the batch costs over MQTT (\`scripts/bench_split_batch.py\`)" $B/split_batch.md
    section "Input recipe: the default against the old inputs (\`scripts/bench_input_recipe.py\`)" $B/input_recipe.md
    section "Domain shift: zoom jitter and anti-aliasing, seeds 0 to 2 (\`scripts/probe_cells.py\`)" $B/shift_levers.md
    section "Anti-aliasing in SFLV1 and SFLV2 at two clients, seeds 0 and 1 (\`scripts/probe_cells.py\`)" $B/antialias_fed.md
    section "What anti-aliasing costs (\`scripts/bench_antialias.py\`)" $B/antialias_cost.md
    section "Anti-aliasing at ten clients, server lr the root, seeds 0 and 1 (\`scripts/probe_cells.py\`)" $B/antialias_ten.md
    section "Test-time averaging, seeds 0 to 2 (\`scripts/probe_cells.py\`)" $B/tta.md
    section "Forty epochs: centralized and ten devices, seeds 0 to 2 (\`scripts/probe_cells.py\`)" $B/epochs_ten.md
    section "Eighty and 160 epochs centralized, seed 0 (\`scripts/probe_cells.py\`)" $B/epochs_80.md
    section "Forty epochs at two and five devices, seeds 0 to 2 (\`scripts/probe_cells.py\`)" $B/epochs_two_five.md
    section "Every jitter with the blur at 80 and 160 epochs, seed 0 (\`scripts/probe_cells.py\`)" $B/shift_80.md
    section "The other-cameras recipe at two devices, seeds 0 and 1 (\`scripts/probe_cells.py\`)" $B/recipe_fed.md
    section "The other-cameras recipe at five devices, seeds 0 and 1 (\`scripts/probe_cells.py\`)" $B/recipe_fed5.md
    section "The other-cameras recipe, with and without the blur, seed 1 (\`scripts/probe_cells.py\`)" $B/recipe_s1.md
    section "Eighty epochs at ten devices, seed 0 (\`scripts/probe_cells.py\`)" $B/epochs_ten_80.md
    section "Test-time averaging in offline live inference: cost per frame (\`scripts/bench_live_tta.py\`)" $B/live_tta.md
    section "Domain shift: input recipes (\`scripts/bench_shift.py\`)" $B/shift.md
    section "Privacy: leakage of the smashed data by defence (\`scripts/bench_privacy.py\`)" $B/privacy.md
    section "Privacy: none and recommended, default network" $B/privacy_two.md
    section "Privacy: none and recommended, anti-aliased network (\`--antialias\`)" $B/privacy_two_aa.md
    section "Privacy: accuracy of the defences, seeds 0 and 1 (\`scripts/probe_cells.py\`)" $B/defences.md
    section "Privacy: the client half's change between averages (\`scripts/bench_update_privacy.py\`)" $B/update_privacy/results.md
    [ -f $B/export.md ] && cat $B/export.md
} > BENCHMARKS.md
echo "wrote BENCHMARKS.md"
