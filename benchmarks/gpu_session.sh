#!/usr/bin/env bash
# One GPU session: one prepared run on one H100/H200, ~9 minutes, never more
# than BUDGET_S. Models are random weights built from Qwen2Config with the real
# Qwen2.5-Math-1.5B / -7B shapes (no hub on the GPU machine). Measured side by side:
#   check_decode    the decoders' correctness on this card (static, compiled, continuous batching)
#   cb_<shape>      the four-benchmark greedy pass, realistic (ASSUMED) ragged response lengths:
#                   static batches vs continuous batching, tokens/s (continuous_batching.py)
#   em_step_<shape> the EM step: today's preset (static_compile sampling) against it with
#                   train.share_prompt_pass, train.compile_loss, and both (em_step.py)
#   parallel_1.5b   hydra.launcher.parallel_runs: 2 runs' EM steps sharing the card vs 1 (parallel_runs.py)
# then benchmarks/write_measured.py collects the figures per shape into a machine-readable file,
# benchmarks/results/measured.json (and $OUT/measured.json, which the device call brings back):
#
#   {"schema": 1, "shapes": {"1.5b": {"em_step_s": <s, fastest setting>,
#     "em_step_setting": "project+share_prompt", "em_step_s_by_setting": {...},
#     "eval_tokens_per_s": <continuous batching, greedy pass>, "eval_tokens_per_s_static": ..,
#     "eval_mean_response_tokens": .., "parallel_runs_throughput": {"2": ..},
#     "card": "NVIDIA H100 80GB HBM3", "date": "2026-12-05 08:00 UTC", "source": ..}, "7b": {...}}}
#
# (write_measured.py's docstring and docs/generation.md describe each key; the dry-run cost
# estimate reads this file.)
#
#   bash benchmarks/gpu_session.sh                 # on the GPU machine; results under $OUT
#   SMOKE=1 bash benchmarks/gpu_session.sh         # CPU end-to-end rehearsal: tiny shapes, few tokens;
#                                                  # writes $OUT/measured.json only, marked "smoke"
#
# Every part runs in its own process under `timeout`, so a failure or a hang in one part
# costs only that part. Each part writes its JSON under $OUT (default outputs/benchmarks) after
# every measurement; logs go there too. The end of the output is a summary in the Markdown
# form benchmarks/RESULTS.md takes (benchmarks/summarize.py) and the measured figures.
# Environment: PYTHON (default python3), OUT, BUDGET_S (default 540; SMOKE 3600), SMOKE, PARTS (names of the
# parts to run, space-separated; default all), LIMIT_SCALE (multiplies the per-part limits).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1  # nothing is downloaded: models are built from their configs
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-outputs/benchmarks}
mkdir -p "$OUT_DIR"
SMOKE=${SMOKE:-0}
BUDGET=${BUDGET_S:-$([ "$SMOKE" = 1 ] && echo 3600 || echo 540)}  # the rehearsal runs on slow shared CPUs
START=$(date +%s)

if [ "$SMOKE" = 1 ]; then
    S15=tiny S7=tiny
    EM="--batch 8 --micro-batch 4 --prompt-tokens 12 --new-tokens 12 --ref-tokens 4 --steps 2"
    EM7="$EM"
    CB15="--batch 4 --problem-scale 0.02 --length-scale 0.02" CB7="$CB15"
    PAR="--steps 2 -- --batch 4 --micro-batch 2 --prompt-tokens 8 --new-tokens 6"
    CHECK="--new-tokens 8" MEASURED="--smoke --to $OUT_DIR/measured.json"
    SCALE=${LIMIT_SCALE:-6}  # shared CPUs are slow and noisy: looser part limits
else
    S15=1.5b S7=7b
    EM="--steps 3" EM7="--steps 2"  # the first step (graph capture, compilation) is not counted
    # ~300 / ~220 of the 1,487 problems at full (ASSUMED) lengths, 64 slots / rows per batch: the
    # two large benchmarks (MATH500, OlympiadBench) still fill 2-3 batches, so slots are refilled
    CB15="--problem-scale 0.2" CB7="--problem-scale 0.15"
    PAR="--steps 4 -- --backend static_compile --micro-batch 4"  # 2 copies must fit one card
    CHECK="" MEASURED="--to benchmarks/results/measured.json --to $OUT_DIR/measured.json"
    SCALE=${LIMIT_SCALE:-1}
fi

elapsed() { echo $(( $(date +%s) - START )); }

# part NAME TIMEOUT_S NEEDED_S ARGS... : run `python ARGS` unless fewer than NEEDED_S seconds are left.
part() {
    local name=$1 limit=$2 needed=$3; shift 3
    if [ -n "${PARTS:-}" ] && [[ " $PARTS " != *" $name "* ]]; then
        return
    fi
    limit=$(( limit * SCALE ))
    local left=$(( BUDGET - $(elapsed) ))
    if [ "$left" -lt "$needed" ]; then
        echo "== skip $name: ${left}s left of ${BUDGET}s, it needs ~${needed}s"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (limit ${limit}s, at $(elapsed)s)"
    local t0=$(date +%s)
    if command -v timeout > /dev/null; then
        timeout --kill-after=15 "$limit" "$PY" "$@" > "$OUT_DIR/$name.log" 2>&1
    else  # no coreutils timeout: the part runs unbounded (the budget still skips later parts)
        "$PY" "$@" > "$OUT_DIR/$name.log" 2>&1
    fi
    local rc=$?
    # The part's own table (or its error) is the end of its log.
    tail -n 14 "$OUT_DIR/$name.log" | grep -v '^wrote ' | sed 's/^/   /'
    echo "== $name: rc=$rc in $(( $(date +%s) - t0 ))s$([ $rc = 124 ] && echo ' (TIMED OUT)')"
}

echo "== environment"
"$PY" - <<'EOF' 2>&1 | sed 's/^/   /'
import platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
try:
    import torchao; print("torchao", torchao.__version__)
except ImportError:
    print("torchao: not installed (train.optimizer=adamw_8bit unavailable; not needed)")
EOF
command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.used,memory.total,clocks.sm --format=csv | sed 's/^/   /'

# name             limit needed  script and arguments (part names are the real shapes' even in SMOKE)
# The decoders' checks first (continuous batching's CUDA-graph path is new), then what the
# dry-run cost estimate needs per shape (evaluation tokens/s, EM step s), 7B's evaluation first
# (evaluation is most of a run's cost), then runs sharing the card.
EMP=project,project+share_prompt,project+compile_loss,project+share_prompt+compile_loss
part check_decode   100    40 benchmarks/check_decode.py $CHECK --json check_decode.json
part cb_7b          130    60 benchmarks/continuous_batching.py --shape $S7 $CB7 --json cb_7b.json
part em_step_1.5b   150    70 benchmarks/em_step.py --shape $S15 $EM --backend static_compile --parts $EMP --json em_step_1.5b.json
part em_step_7b     170    90 benchmarks/em_step.py --shape $S7 $EM7 --backend static_compile --parts $EMP --json em_step_7b.json
part cb_1.5b        100    45 benchmarks/continuous_batching.py --shape $S15 $CB15 --json cb_1.5b.json
part parallel_1.5b  110    60 benchmarks/parallel_runs.py --shape $S15 --processes 2 --json parallel_1.5b.json $PAR

echo "== done in $(elapsed)s; results in $OUT_DIR"
echo "== summary (paste into benchmarks/RESULTS.md)"
"$PY" benchmarks/summarize.py "$OUT_DIR"
echo "== measured figures per shape"
"$PY" benchmarks/write_measured.py "$OUT_DIR" $MEASURED
