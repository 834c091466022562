#!/usr/bin/env bash
# One GPU session (issue 7 item 5, issue 3 item 9): decoder checks, then the EM-step and
# evaluation-throughput benchmarks for the Qwen2.5-Math-1.5B and -7B shapes, then optional
# variants while time is left. About 8-9 minutes on one H100 (the first two parts alone ~5);
# never more than BUDGET_S.
#
#   bash benchmarks/gpu_session.sh                 # on the GPU machine; results under $OUT
#   SMOKE=1 bash benchmarks/gpu_session.sh         # CPU end-to-end rehearsal: tiny shape, few tokens
#
# Every part runs in its own process under `timeout`, so a failure or a hang in one part
# costs only that part. Each part writes its JSON under $OUT (default outputs/benchmarks) after
# every measurement; logs go there too. The end of the output is a summary in the Markdown
# form benchmarks/RESULTS.md takes (benchmarks/summarize.py).
# Environment: PYTHON (default python3), OUT, BUDGET_S (default 560), SMOKE, PARTS (names of the
# parts to run, space-separated; default all), LIMIT_SCALE (multiplies the per-part limits).
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1  # nothing is downloaded: models are built from their configs
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-outputs/benchmarks}
mkdir -p "$OUT_DIR"
BUDGET=${BUDGET_S:-560}
START=$(date +%s)
SMOKE=${SMOKE:-0}

if [ "$SMOKE" = 1 ]; then
    S15=tiny S7=tiny
    EM="--batch 8 --micro-batch 4 --prompt-tokens 12 --new-tokens 12 --ref-tokens 4 --steps 2"
    EV="--short-prompt 12 --long-prompt 40 --new-tokens 12 --long-new-tokens 6 --b1-new-tokens 6"
    BS15=4 BS7=4,8 CHECK="--new-tokens 8" PROF="--batch 4 --prompt-tokens 12 --steps 3 --reps 5"
    SCALE=${LIMIT_SCALE:-4}  # shared CPUs are slow and noisy: looser part limits
else
    S15=1.5b S7=7b
    EM=""
    EV=""
    BS15=64,128 BS7=64,128,256 CHECK="" PROF=""
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

# name                 limit needed  script and arguments (part names are the real shapes' even in SMOKE)
# Most informative first: the 1.5B EM step (its 3 s target was missed by 0.16 s) with the
# compiled decoder layer (static_compile): as measured before, with the prompt run once per loss
# micro-batch (train.share_prompt_pass), and with the compiled loss pass (train.compile_loss;
# apart: the shared prompt's cached calls stay eager), against the reference style; then 7B (fused bf16 AdamW,
# checkpointing) as measured, with the shared prompt pass (checkpointed by em-sweep, not HF) and
# with the compiled loss pass; then where a decoding step's time goes; then the checks.
part em_step_1.5b       300    90 benchmarks/em_step.py --shape $S15 $EM --backend static_compile --parts project,project+share_prompt,project+compile_loss,reference --json em_step_1.5b.json
part em_step_7b         320   150 benchmarks/em_step.py --shape $S7 $EM --backend static_compile --parts project,project+share_prompt,project+compile_loss,reference --json em_step_7b.json
part profile_1.5b       100    45 benchmarks/profile_decode.py --shape $S15 $PROF --json profile_1.5b.json
part check_decode       150    40 benchmarks/check_decode.py $CHECK --json check_decode.json
part eval_7b_compile    150    60 benchmarks/eval_throughput.py --shape $S7 --paths project --batch-sizes $BS7 $EV --backend static_compile --json eval_7b_compile.json
part eval_1.5b          120    35 benchmarks/eval_throughput.py --shape $S15 --batch-sizes $BS15 $EV --json eval_1.5b.json
part eval_7b            150    50 benchmarks/eval_throughput.py --shape $S7 --batch-sizes $BS7 $EV --json eval_7b.json
part em_step_7b_nockpt  150    70 benchmarks/em_step.py --shape $S7 $EM --parts project --backend static_compile --gradient-checkpointing 0 --micro-batch 2 --json em_step_7b_nockpt.json

echo "== done in $(elapsed)s; results in $OUT_DIR"
echo "== summary (paste into benchmarks/RESULTS.md)"
"$PY" benchmarks/summarize.py "$OUT_DIR"
