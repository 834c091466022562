"""Launch speed: em-sweep's sweep launch vs Hydra's stock multirun path, same N jobs, one run.

    python benchmarks/launch_speed.py            # N = 1,000 jobs of the default (tiny) model
    python benchmarks/launch_speed.py --n 2000

Both sides are timed as a user sees them: wall time of one `-m` command, Python start-up included.
- em-sweep: `launch.py -m hydra/launcher=slurm ...`: every run's config validated, run ids and
  manifest written, and the runs submitted to the local SLURM cluster as held job arrays (then
  cancelled); where SLURM is not running, `hydra.launcher.dry_run=true` (validation only) and
  the output says so.
- Hydra's stock path: the same overrides through BasicSweeper + BasicLauncher with a task
  function that returns at once, so only Hydra's own per-job work is timed (composition for
  the sweeper's validation, composition again in the launcher, run_job's directory set-up).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def grid(n: int) -> list[str]:
    """Overrides expanding to exactly ``n`` jobs: seeds x 10 temperatures x 4 learning rates (x remainder seeds)."""
    per_seed = 10 * 4
    if n % per_seed:
        raise SystemExit(f"--n must be a multiple of {per_seed}")
    return [f"seed=range({n // per_seed})", "temperature=" + ",".join(f"{t / 10:g}" for t in range(1, 11)),
            "train.lr=5e-6,1e-5,2e-5,5e-5"]


def slurm_running() -> bool:
    return shutil.which("sinfo") is not None and subprocess.run(
        ["sinfo", "-h"], capture_output=True, timeout=30).returncode == 0


def timed(cmd: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    started = time.perf_counter()
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"failed ({result.returncode}): {' '.join(cmd)}\n{result.stdout}\n{result.stderr}")
    return seconds, result


def time_em_sweep(overrides: list[str], scratch: Path, submit: bool) -> tuple[float, str]:
    cmd = [sys.executable, "launch.py", "-m", "hydra/sweeper=em_sweep", "hydra/launcher=slurm", *overrides,
           f"paths.root={scratch}/em", f"hydra.sweep.dir={scratch}/em/sweep"]
    if submit:
        # Held: the arrays are queued exactly as in production, but no task starts; cancelled below.
        cmd.append("+hydra.launcher.additional_parameters={hold:true}")
    else:
        cmd.append("hydra.launcher.dry_run=true")
    seconds, result = timed(cmd)
    if submit:
        array_ids = re.findall(r"array\(s\) \(([\d, ]+)\)", result.stdout)
        for array_id in ",".join(array_ids).split(","):
            if array_id.strip():
                subprocess.run(["scancel", array_id.strip()], check=False)
    return seconds, result.stdout.strip().splitlines()[0]


def time_hydra_stock(overrides: list[str], scratch: Path) -> float:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--stock-app", "-m", "hydra/sweeper=basic",
           "hydra/launcher=basic", *overrides, f"paths.root={scratch}/stock",
           f"hydra.sweep.dir={scratch}/stock/sweep", "hydra/job_logging=none", "hydra/hydra_logging=none"]
    seconds, _ = timed(cmd)
    return seconds


def stock_app() -> None:
    """Hydra's stock multirun over the project's conf/ with a task that does nothing."""
    import hydra

    sys.path.insert(0, str(ROOT))
    import em_sweep.config  # noqa: F401  (registers the schema)

    @hydra.main(config_path=str(ROOT / "conf"), config_name="config", version_base="1.3")
    def noop(cfg) -> None:  # noqa: ANN001
        return None

    noop()


def main() -> None:
    if "--stock-app" in sys.argv:
        sys.argv.remove("--stock-app")
        stock_app()
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1000, help="jobs in the grid (multiple of 40; default 1000)")
    args = parser.parse_args()
    overrides = grid(args.n)
    submit = slurm_running()
    with tempfile.TemporaryDirectory(prefix="launch_speed_") as tmp:
        scratch = Path(tmp)
        ours, first_line = time_em_sweep(overrides, scratch, submit)
        stock = time_hydra_stock(overrides, scratch)
    how = "validated + manifest + submitted to local SLURM (held, then cancelled)" if submit else \
        "validated only (dry run: SLURM is not running here)"
    print(f"machine: {platform.node()}, {os.cpu_count()} CPUs, Python {platform.python_version()}")
    print(f"N = {args.n} jobs ({' '.join(overrides)})")
    print(f"em-sweep launch:      {ours:7.1f} s  [{how}; {first_line}]")
    print(f"Hydra stock multirun: {stock:7.1f} s  [BasicSweeper validation + BasicLauncher, no-op task]")
    print(f"ratio (stock / em-sweep): {stock / ours:.1f}x")


if __name__ == "__main__":
    main()
