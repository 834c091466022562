"""Collect a GPU session's measured figures per model shape into one machine-readable file.

Reads the part JSONs benchmarks/gpu_session.sh leaves in a folder (em_step_<shape>.json,
cb_<shape>.json, parallel_<shape>.json) and merges their figures into ``--to`` (default
benchmarks/results/measured.json; shapes this session did not measure keep their entries).
Schema (version 1), every number MEASURED in the session named by ``card`` and ``date``:

    {"schema": 1,
     "shapes": {
       "1.5b": {
         "em_step_s": 2.9,                 # seconds of one EM step (64 responses x 512 new tokens from
                                           #   a ~100-token prompt, entropy loss, AdamW), median, with
                                           #   the fastest setting measured (em_step_setting)
         "em_step_setting": "project+share_prompt",   # em_step.py part: project = today's preset
         "em_step_s_by_setting": {"project": 3.16, "project+share_prompt": 2.9, ...},
         "eval_tokens_per_s": 9000.0,      # useful generated tokens per second of the greedy
                                           #   four-benchmark pass, continuous batching, 64 slots
                                           #   (eval.generation_backend=continuous)
         "eval_tokens_per_s_static": 4500.0,   # the same pass in static batches (before)
         "eval_mean_response_tokens": 780.0,   # the pass's ASSUMED mean response length
         "parallel_runs_throughput": {"2": 1.5},   # EM steps/s of N runs sharing the GPU / of one
         "card": "NVIDIA H100 80GB HBM3", "date": "2026-12-05 08:00 UTC",
         "source": "benchmarks/gpu_session.sh"},
       "7b": {...}},
     "assumed": {"eval_mean_response_tokens": 825, "source": "..."}}

Shape names are the model presets' ``model.shape`` (em_sweep/sweep/cost.py reads ``em_step_s``,
``eval_tokens_per_s`` and the top-level ``assumed.eval_mean_response_tokens``). A session updates
the keys it measured and keeps the others. ``--smoke``: the figures come from the CPU rehearsal
(tiny models standing in for each shape): the entries say so (``"smoke": true``), and only the
``--to`` files are written (never the shipped file).

    python benchmarks/write_measured.py outputs/benchmarks
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from _common import ROOT
from summarize import is_project

NAMES = {"1.5b": "1.5b", "7b": "7b"}  # benchmarks/_common.py shape -> model.shape
DEFAULT = ROOT / "benchmarks" / "results" / "measured.json"


def figures(folder: Path, smoke: bool) -> dict[str, dict[str, Any]]:
    """Per shape name, the figures found in the folder's part JSONs."""
    shapes: dict[str, dict[str, Any]] = {}
    for f in sorted(folder.glob("*.json")):
        prefix, _, shape = f.stem.rpartition("_")
        if shape not in NAMES or prefix not in ("em_step", "cb", "parallel"):
            continue
        r = json.loads(f.read_text())
        entry = shapes.setdefault(NAMES[shape], {})
        env = r.get("env", {})
        entry.setdefault("card", env.get("gpu", f"cpu ({env.get('cpu_threads')} threads)"))
        entry.setdefault("date", env.get("date"))
        entry["source"] = "benchmarks/gpu_session.sh"
        if smoke:
            entry["smoke"] = True
            entry["measured_shape"] = r.get("shape")
        if r.get("benchmark") == "em_step":
            by = {k: r[k]["step_s"] for k in r if is_project(k) and isinstance(r[k], dict) and "step_s" in r[k]}
            if by:
                best = min(by, key=by.__getitem__)
                entry.update(em_step_s=by[best], em_step_setting=best, em_step_s_by_setting=by)
        elif r.get("benchmark") == "continuous_batching":
            if "continuous" in r:
                entry["eval_tokens_per_s"] = r["continuous"]["tokens_per_s"]
                entry["eval_mean_response_tokens"] = r["workload"]["mean_response"]
            if "static" in r:
                entry["eval_tokens_per_s_static"] = r["static"]["tokens_per_s"]
        elif r.get("benchmark") == "parallel_runs":
            ratios = {k[1:]: v["throughput_ratio"] for k, v in r.items()
                      if k.startswith("n") and isinstance(v, dict) and "throughput_ratio" in v}
            if ratios:
                entry["parallel_runs_throughput"] = ratios
    return shapes


def merge(target: Path, shapes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(target.read_text()) if target.exists() else {}
    data["schema"] = 1
    for name, entry in shapes.items():
        data.setdefault("shapes", {}).setdefault(name, {}).update(entry)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return data


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="the session's output folder (part JSONs)")
    ap.add_argument("--to", type=Path, action="append", default=None,
                    help=f"file(s) to merge into (default {DEFAULT.relative_to(ROOT)})")
    ap.add_argument("--smoke", action="store_true", help="CPU rehearsal figures: marked as such")
    args = ap.parse_args(argv)
    shapes = figures(args.folder, args.smoke)
    targets = args.to or ([] if args.smoke else [DEFAULT])
    for target in targets:
        merge(target, shapes)
        print(f"wrote {target}: {', '.join(sorted(shapes)) or 'no figures'}")
    print(json.dumps(shapes, indent=1))


if __name__ == "__main__":
    main()
