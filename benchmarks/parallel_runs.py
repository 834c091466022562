"""Throughput of several runs sharing one GPU (hydra.launcher.parallel_runs) against one at a time.

``hydra.launcher.parallel_runs=N`` starts N processes on the task's GPU, each running its share
of the runs with its own model copy. Here each process is ``em_step.py --parts project`` (a
random-weight model of ``--shape``, EM steps as a run makes them); N of them start together and
each reports the median of its steps while the others run. MEASURED: aggregate EM steps per
second = sum over processes of 1 / median step seconds, for N = 1 (alone) and each ``--processes``
value; the ratio to N = 1 is the throughput parallel_runs buys. Not measured: the runs'
evaluation (it shares the GPU the same way) and model loading.

    python benchmarks/parallel_runs.py --shape 1.5b --processes 2,3 --json parallel_1.5b.json
    python benchmarks/parallel_runs.py --shape tiny --processes 2 -- --new-tokens 8 --batch 4 --micro-batch 2  # CPU
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import environment, pick_device, write_json

HERE = Path(__file__).resolve().parent


def concurrent(shape: str, n: int, steps: int, extra: list[str], folder: Path) -> dict[str, Any]:
    """``n`` em_step.py processes started together; their median step seconds."""
    procs = []
    t0 = time.perf_counter()
    for i in range(n):
        out = folder / f"n{n}_{i}.json"
        cmd = [sys.executable, str(HERE / "em_step.py"), "--shape", shape, "--parts", "project", "--steps", str(steps),
               "--json", str(out), *extra]
        procs.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), out))
    steps_s, errors = [], []
    for proc, out in procs:
        log = proc.communicate()[0]
        r = json.loads(out.read_text()) if out.exists() else {}
        step = r.get("project", {}).get("step_s")
        if proc.returncode != 0 or step is None:
            errors.append(f"rc={proc.returncode}: {log[-400:]}")
        else:
            steps_s.append(step)
    result: dict[str, Any] = {"processes": n, "median_step_s": steps_s, "wall_s": round(time.perf_counter() - t0, 1)}
    if errors:
        result["errors"] = errors
    if steps_s:
        result["steps_per_s"] = round(sum(1 / s for s in steps_s), 4)
    return result


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="tiny", choices=["tiny", "small", "1.5b", "7b"])
    ap.add_argument("--processes", default="2", help="comma list of N > 1 to measure against N = 1")
    ap.add_argument("--steps", type=int, default=4, help="EM steps per process (the first, with warm-up, not counted)")
    ap.add_argument("--json", default=None, help="write results here (a bare name goes under $OUT)")
    ap.add_argument("extra", nargs="*", help="after --: arguments for em_step.py (e.g. --backend static_compile)")
    args = ap.parse_args(argv)
    result: dict[str, Any] = {"benchmark": "parallel_runs", "shape": args.shape,
                              "env": environment(pick_device("auto")), "args": vars(args)}
    with tempfile.TemporaryDirectory() as tmp:
        for n in [1] + [int(x) for x in args.processes.split(",") if x.strip()]:
            result[f"n{n}"] = r = concurrent(args.shape, n, args.steps, args.extra, Path(tmp))
            base = result["n1"].get("steps_per_s")
            if base and r.get("steps_per_s"):
                r["throughput_ratio"] = round(r["steps_per_s"] / base, 2)
            print(f"  {n} process(es): median step s {r['median_step_s']}, {r.get('steps_per_s')} steps/s"
                  + (f", {r['throughput_ratio']}x one" if "throughput_ratio" in r else "")
                  + (f"; errors: {r['errors']}" if "errors" in r else ""), flush=True)
            write_json(args.json, result)
    return result


if __name__ == "__main__":
    main()
