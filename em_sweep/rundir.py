"""Run directories: content-addressed ids, atomic writes, and the status file.

A run is named by a hash of its resolved config (minus keys that do not change
the science), so re-launching the same sweep finds the same directories. A run
is complete exactly when ``results.json`` exists; it is written last, by
rename, so a crash can never leave a complete-looking run behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

# Top-level keys that say where or how a run is recorded, not what it computes.
NON_SCIENCE_KEYS = ("paths", "logger", "name", "hydra")

# Settings that change only speed, never results beyond float rounding, added after runs were
# recorded: they are not part of a run's id, so turning them on (or upgrading em-sweep) finds the
# finished runs again. (Older speed settings, e.g. the sampling backend or micro-batch size, stay
# in the id so that recorded runs keep theirs.)
NOT_IN_RUN_ID: dict[str, tuple[str, ...]] = {
    "train": ("compile_loss", "share_prompt_pass"),
    "rl": ("compile_loss", "share_prompt_pass"),
    # Which pass@k are reported and how many programs run at once change no result; greedy
    # evaluation is identical token for token across generation backends (sampled evaluation draws
    # other samples of the same distribution).
    "eval": ("pass_k", "code_workers", "generation_backend"),
    "model": ("shape",),  # a label for cost estimates, not a setting
}
# The sandbox's limits change results of code benchmarks only: part of the id when one is evaluated.
CODE_ONLY_EVAL_KEYS = ("code_timeout_s", "code_memory_mb")

# Settings added after runs were recorded, at the value that does what runs did before they
# existed: a run at that value keeps its earlier id; any other value enters the id.
ADDED_AT_NEUTRAL: dict[str, dict[str, Any]] = {
    "rl": {"entropy_coef": 0.0, "reward": "gold", "advantage": "grpo"},
}


def _neutral_sections_dropped(science: dict[str, Any]) -> dict[str, Any]:
    """``science`` without the later-added settings that are at their neutral value: the keys of
    ADDED_AT_NEUTRAL, ``eval.em_inf`` while it is off, and ``stop`` while it probes nothing."""
    for section, neutral in ADDED_AT_NEUTRAL.items():
        values = science.get(section)
        if isinstance(values, dict):
            science[section] = {k: v for k, v in values.items() if k not in neutral or v != neutral[k]}
    evaluation = science.get("eval")
    if isinstance(evaluation, dict) and not (evaluation.get("em_inf") or {}).get("enabled", False):
        science["eval"] = {k: v for k, v in evaluation.items() if k != "em_inf"}
    stop = science.get("stop")
    if isinstance(stop, dict) and not stop.get("probe_samples") and not stop.get("heldout_prompts"):
        science.pop("stop")
    return science


RESULTS = "results.json"
STATUS = "status.json"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"


def science_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config without the non-science keys: the part that identifies a run."""
    if isinstance(cfg, DictConfig):
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    else:
        data = dict(cfg)
    assert isinstance(data, dict)
    # The RL stage's settings identify a run only when a stage uses them: an EM-only run keeps
    # the id it had before the RL stage existed, whatever rl.* says.
    unused = () if "rl" in (data.get("stages") or ()) else ("rl",)
    science = {k: v for k, v in data.items() if k not in NON_SCIENCE_KEYS and k not in unused}
    for section, keys in NOT_IN_RUN_ID.items():
        values = science.get(section)
        if isinstance(values, dict):
            science[section] = {k: v for k, v in values.items() if k not in keys}
    evaluation = science.get("eval")
    if isinstance(evaluation, dict) and not _has_code_benchmark(evaluation.get("benchmarks")):
        science["eval"] = {k: v for k, v in evaluation.items() if k not in CODE_ONLY_EVAL_KEYS}
    # train.parallel changes the samples (each rank draws its own), so a sharded run has an id of
    # its own; the single-process default keeps the ids runs had before the setting existed.
    if isinstance(science.get("train"), dict) and science["train"].get("parallel") == "none":
        science["train"] = {k: v for k, v in science["train"].items() if k != "parallel"}
    return _neutral_sections_dropped(science)


def _has_code_benchmark(entries: Any) -> bool:
    """Whether an eval.benchmarks list has a benchmark of family code (a shipped one by name, or
    a user's mapping with ``family: code``)."""
    from em_sweep.benchmarks import BENCHMARKS  # lazy: the loader table imports the grader

    for entry in entries or ():
        family = entry.get("family") if isinstance(entry, Mapping) else getattr(BENCHMARKS.get(entry), "family", None)
        if family == "code":
            return True
    return False


def run_id(cfg: DictConfig | Mapping[str, Any]) -> str:
    """A stable 16-hex-digit id: sha256 of the canonical JSON of the science config."""
    canonical = json.dumps(science_config(cfg), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def run_dir_for(cfg: DictConfig) -> Path:
    """``paths.runs_dir / run_id`` as an absolute path."""
    return Path(str(cfg.paths.runs_dir)).expanduser().absolute() / run_id(cfg)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file in the same directory, fsync, then rename over ``path``."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text`` (readers see the old or the new file, never half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def json_line(record: Mapping[str, Any]) -> str:
    """One canonical JSON line (sorted keys, newline-terminated)."""
    return json.dumps(record, sort_keys=True, default=str) + "\n"


def append_jsonl(path: Path, record: Mapping[str, Any]) -> None:
    """Append one JSON line and flush it (metrics survive a crash up to the last full line)."""
    with open(path, "a") as f:
        f.write(json_line(record))
        f.flush()


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """All complete JSON lines of ``path`` (a torn last line from a crash is skipped)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def is_complete(path: Path) -> bool:
    """True when the run's results were written (the only definition of done)."""
    return (Path(path) / RESULTS).is_file()


def read_status(path: Path) -> dict[str, Any] | None:
    """The run's status record, or None when it has none (never started)."""
    try:
        return json.loads((Path(path) / STATUS).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_status(path: Path, state: str, **fields: Any) -> None:
    """Record ``state`` (pending | running | done | failed) with who/when, atomically."""
    record = {
        "state": state,
        "time": time.time(),
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        **fields,
    }
    write_json_atomic(Path(path) / STATUS, record)


def read_results(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(path) / RESULTS).read_text())
    except FileNotFoundError:
        return None


@contextlib.contextmanager
def claimed(path: Path) -> Iterator[bool]:
    """Hold an exclusive lock on the run directory; yields False if another process holds it.

    The lock is released when the holder exits or dies, so a crash never leaves a stale claim.
    """
    path.mkdir(parents=True, exist_ok=True)
    with open(path / ".lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def process_alive(status: Mapping[str, Any]) -> bool | None:
    """Whether the process a status record names (``host``, ``pid``) still exists: None where
    this host cannot tell (another host, no pid). Takes no lock, so asking never disturbs a
    run's claim."""
    pid = status.get("pid")
    if status.get("host") != socket.gethostname() or not isinstance(pid, int) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


ATTEMPTS = ".attempts"


def reset_partial(path: Path) -> int:
    """Clear what an interrupted attempt left (metrics, eval records, checkpoints, W&B files) so
    a restart is clean; the number of the attempt now starting (1 for the first)."""
    path = Path(path)
    leftovers = [path / name for name in (METRICS, "eval_records.jsonl", "checkpoints", "wandb")]
    try:
        attempt = int((path / ATTEMPTS).read_text()) + 1
    except (FileNotFoundError, ValueError):  # none counted yet: a run directory from before the count
        attempt = 2 if any(p.exists() for p in leftovers) else 1
    for p in leftovers:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    write_text_atomic(path / ATTEMPTS, f"{attempt}\n")
    return attempt
