"""How long `em-sweep collect` takes on a paper-sized sweep: 13,440 synthetic run directories.

    python benchmarks/collect_speed.py [--runs 13440] [--dir /tmp/em-sweep-collect-bench] [--keep] [--workers N]

Writes the run directories the way em_sweep.run does (results.json with the resolved config,
scores at 4 steps x 5 benchmarks (+avg4) x 3 eval temperatures and a 10-step loss curve; 1% failed
runs with status.json + config.yaml; 1% running), then times collect + writing the parquet
tables (warm page cache: the directories were just written) and prints the time. Reading uses
em_sweep.analysis.collect.default_workers processes unless --workers is given; on a loaded machine extra
workers gain nothing (measure with --workers 1 and 2, and say what else was running).
Target: under 30 s on the 2-core CPU machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
import shutil
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from em_sweep.analysis.collect import collect, default_workers, summary_line, write_tables  # noqa: E402

MODELS = ["qwen25_math_7b", "qwen25_math_1_5b", "qwen25_7b", "qwen25_7b_instruct", "llama31_8b",
          "llama31_8b_instruct", "qwen25_math_7b_simplerl_zoo"]
BENCHMARKS = ["math500", "minerva_math", "olympiadbench", "amc23", "aime24"]


def config_for(model: str, seed: int, temperature: float, lr: float, prompt: str) -> dict:
    """A resolved config shaped like em_sweep's (all groups, ~90 keys)."""
    return {
        "model": {"name": model, "path": f"Qwen/{model}", "lr": lr, "dtype": "auto", "device": "auto",
                  "attn_implementation": None, "trust_remote_code": False, "gradient_checkpointing": True},
        "prompt": {"name": "dsr_one_shot", "pool": "dsr_sub", "ids": [prompt], "system": None,
                   "chat_template": True, "note": "placeholder"},
        "train": {"steps": 10, "batch_size": 64, "micro_batch_size": 2, "lr": lr, "weight_decay": 0.01,
                  "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8, "warmup_steps": 0, "grad_clip": 1.0,
                  "sample_temperature": temperature, "top_p": 0.95, "top_k": 0, "repetition_penalty": 1.15,
                  "max_new_tokens": 512, "sample_batch_size": 64, "loss_temperature": temperature,
                  "loss_chunk_tokens": 4096, "save_at_steps": []},
        "eval": {"benchmarks": BENCHMARKS[:4], "at_steps": [0, 3, 6], "temperatures": [0.0, 0.5, 1.0],
                 "n_samples": 1, "top_p": 1.0, "max_new_tokens": 3072, "batch_size": 64, "limit": None,
                 "template": "qwen25-math-cot", "grade_timeout_s": 5.0, "seed": 1234},
        "logger": {"mode": "offline", "project": "em-sweep", "entity": None, "init_timeout_s": 60.0},
        "paths": {"root": "outputs", "runs_dir": "outputs/runs"},
        "seed": seed, "temperature": temperature, "name": "paper_grid", "stages": ["em"],
    }


def write_runs(root: Path, n_runs: int, rng: random.Random) -> None:
    runs = root / "runs"
    grid = itertools.product(MODELS, range(8), [round(0.1 * i, 1) for i in range(1, 11)],
                             [5e-6, 1e-5, 2e-5, 5e-5], ["dsr124", "dsr0", "dsr1", "dsr2", "dsr3", "dsr4"])
    for i, (model, seed, temperature, lr, prompt) in enumerate(itertools.islice(grid, n_runs)):
        d = runs / f"{i:016x}"
        d.mkdir(parents=True)
        config = config_for(model, seed, temperature, lr, prompt)
        if i % 100 == 1:
            (d / "config.yaml").write_text(yaml.safe_dump(config))
            (d / "status.json").write_text(json.dumps({"state": "failed", "reason": "NonFiniteLoss: step 4"}))
            continue
        if i % 100 == 2:
            (d / "config.yaml").write_text(yaml.safe_dump(config))
            (d / "status.json").write_text(json.dumps({"state": "running"}))
            continue
        scores = []
        for step, t in itertools.product((0, 3, 6, 10), (0.0, 0.5, 1.0)):
            accs = []
            for b in BENCHMARKS:
                acc = rng.random()
                accs.append(acc)
                scores.append({"benchmark": b, "step": step, "temperature": t, "accuracy": acc,
                               "pass_at_n": acc, "n": 1, "n_problems": 500, "boxed_rate": 0.9,
                               "grader_failures": 0, "template": "qwen25-math-cot", "max_new_tokens": 3072,
                               "seconds": 60.0})
            scores.append({"benchmark": "avg4", "step": step, "temperature": t, "accuracy": sum(accs[:4]) / 4})
        curve = [{"step": s, "loss": 1.0 / s, "entropy": 1.0 / s, "response_length": 300.0, "grad_norm": 0.5}
                 for s in range(1, 11)]
        results = {"run_id": d.name, "run_dir": str(d), "config": config, "scores": scores,
                   "initial_scores": [s for s in scores if s["step"] == 0],
                   "final_scores": [s for s in scores if s["step"] == 10], "loss_curve": curve,
                   "prompt": {"name": "dsr_one_shot", "ids": [prompt], "note": ""}, "seconds": 900.0,
                   "versions": {"python": "3.11", "torch": "2.x", "transformers": "5.x"}}
        (d / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True))
        (d / "status.json").write_text(json.dumps({"state": "done"}))
        (d / "config.yaml").write_text("# not read for done runs\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=13_440)
    parser.add_argument("--dir", default="/tmp/em-sweep-collect-bench")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic runs (reused if present)")
    parser.add_argument("--workers", type=int, default=None, help="reader processes (default: collect's choice)")
    args = parser.parse_args()
    root = Path(args.dir)
    marker = root / f".complete-{args.runs}"
    if not marker.exists():
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        write_runs(root, args.runs, random.Random(0))
        marker.touch()
        print(f"wrote {args.runs} synthetic run dirs in {time.perf_counter() - t0:.1f}s ({root})")
    t0 = time.perf_counter()
    workers = default_workers(args.runs) if args.workers is None else args.workers
    collected = collect(root, progress=True, workers=workers)
    t1 = time.perf_counter()
    write_tables(collected, root / "collected")
    t2 = time.perf_counter()
    print(summary_line(collected))
    print(f"collect {args.runs} runs ({workers} reader processes): {t1 - t0:.1f}s read + {t2 - t1:.1f}s parquet "
          f"= {t2 - t0:.1f}s total (target < 30s)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
