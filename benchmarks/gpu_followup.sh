#!/usr/bin/env bash
# Second, short GPU call of a session (after gpu_session.sh found a failure): the sampling
# tail's cost, then the EM step with the compiled decoder layer against the reference style.
# ~5 minutes on one H100. Results and logs under $OUT.
set -u
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TRANSFORMERS_VERBOSITY=error PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1
PY=${PYTHON:-python3}
O=${OUT:-outputs/benchmarks}
mkdir -p "$O"
run() {  # run NAME LIMIT ARGS...
    local name=$1 limit=$2; shift 2
    echo "== $name"
    timeout --kill-after=10 "$limit" "$PY" "$@" --json "$O/$name.json" > "$O/$name.log" 2>&1
    echo "== $name rc=$?"
    tail -n 13 "$O/$name.log" | grep -v '^wrote '
}
run tail_1.5b 60 benchmarks/profile_decode.py --shape 1.5b --parts tail
run em_step_7b_compile 170 benchmarks/em_step.py --shape 7b --backend static_compile --parts reference,project
run em_step_1.5b_compile 100 benchmarks/em_step.py --shape 1.5b --backend static_compile --parts reference,project
