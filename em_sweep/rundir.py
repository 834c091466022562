"""Run directories: run identity, atomic writes, verified completion, and the status file.

A run is named by its id: the sha256 of a payload holding the identity version
(:data:`ID_VERSION`), the resolved config minus the keys that do not change results
(:data:`NOT_IN_RUN_ID`), and digests of what the run reads (the prompt texts, every benchmark
file, the model's files or hub revision). So re-launching the same sweep finds the same
directories, and any change to what a run trains or scores on gives it a new one
(docs/run-identity.md). A run is complete exactly when ``results.json`` parses and names this
run's id; it is written last, by rename, so a crash can never leave a complete-looking run.
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
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig


# Version of the identity rule, hashed with every run. Bump it when the payload changes meaning
# for the same inputs: a key moves into or out of NOT_IN_RUN_ID, a digest is added or computed
# differently. Adding a config key needs no bump: a key with its default changes every id anyway
# (it is part of the config), and that is the point. tests/test_identity.py pins it.
ID_VERSION = 2

# Config keys (dotted; a key covers its subtree) that do not change what a run computes:
# - where or how it is recorded: name (the W&B group), paths, logger, hydra;
# - documentation: prompt.name, prompt.note, model.name (the prompt texts and the model's
#   digest identify what they name);
# - speed and memory settings documented in em_sweep/config.py to give the same numbers up to
#   floating-point rounding for the same seed: compile_loss, share_prompt_pass,
#   micro_batch_size (gradients accumulate to the batch's), loss_chunk_tokens (the entropy in
#   chunks), model.gradient_checkpointing (the same activations, recomputed).
# Settings that change which random numbers a seed draws stay in the id, even where the
# distribution is the same: sample_batch_size, eval.batch_size, generation_backend.
NOT_IN_RUN_ID: tuple[str, ...] = (
    "name", "paths", "logger", "hydra",
    "prompt.name", "prompt.note", "model.name",
    "train.compile_loss", "train.share_prompt_pass", "train.micro_batch_size", "train.loss_chunk_tokens",
    "rl.compile_loss", "rl.share_prompt_pass", "rl.micro_batch_size", "rl.loss_chunk_tokens",
    "model.gradient_checkpointing",
    # which pass@k are reported, how many test programs run at once, a label for cost estimates
    "eval.pass_k", "eval.code_workers", "model.shape",
)
# The sandbox's limits change results of code benchmarks only: part of the id when one is evaluated.
CODE_ONLY_EVAL_KEYS = ("code_timeout_s", "code_memory_mb")

RESULTS = "results.json"
STATUS = "status.json"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"
# Where a run's files go when its results.json is found corrupt: <run>/.corrupt-<UTC time>/.
CORRUPT_PREFIX = ".corrupt-"


def _exclusion_tree(keys: tuple[str, ...]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted in keys:
        *parents, leaf = dotted.split(".")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = None  # None: the whole subtree
    return tree


_EXCLUDED = _exclusion_tree(NOT_IN_RUN_ID)


def _without(data: Mapping[str, Any], excluded: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in data.items():
        if key in excluded:
            inner = excluded[key]
            if inner is None:
                continue
            if isinstance(value, Mapping):
                value = _without(value, inner)
        out[key] = value
    return out


def science_config(cfg: DictConfig | Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config without :data:`NOT_IN_RUN_ID` (and without ``rl`` unless a stage runs it,
    without the sandbox's limits unless a code benchmark is evaluated)."""
    data = _container(cfg)
    science = _without(data, _EXCLUDED)
    if "rl" not in (data.get("stages") or ()):
        science.pop("rl", None)  # the settings of a stage that does not run change nothing
    evaluation = science.get("eval")
    if isinstance(evaluation, dict) and not _has_code_benchmark(evaluation.get("benchmarks")):
        science["eval"] = {k: v for k, v in evaluation.items() if k not in CODE_ONLY_EVAL_KEYS}
    return science


def _has_code_benchmark(entries: Any) -> bool:
    """Whether an eval.benchmarks list has a benchmark of family code (a shipped one by name, or
    a user's mapping with ``family: code``)."""
    from em_sweep.evaluation.benchmarks import BENCHMARKS  # lazy: the loader table imports the grader

    for entry in entries or ():
        family = entry.get("family") if isinstance(entry, Mapping) else getattr(BENCHMARKS.get(entry), "family", None)
        if family == "code":
            return True
    return False


def _container(cfg: DictConfig | Mapping[str, Any]) -> Mapping[str, Any]:
    from omegaconf import DictConfig, OmegaConf  # here: models.py imports this module on machines without it

    if isinstance(cfg, DictConfig):
        data = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        assert isinstance(data, dict)
        return data
    return cfg


# ---------------------------------------------------------------- digests of a run's inputs

# Files of a local model directory that from_pretrained or the tokenizer can read (top level only).
MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".bin", ".pt", ".pth", ".model", ".txt", ".jinja", ".py",
                       ".tiktoken", ".msgpack", ".h5")
# Where file digests are cached across processes, keyed by path, size, mtime and inode (a 15 GB
# model is hashed once per machine, not at every launch). EM_SWEEP_CACHE_DIR overrides it.
DIGEST_CACHE = "file-digests.jsonl"

_file_digests: dict[tuple[str, int, int, int], str] = {}
_disk_cache_loaded: set[Path] = set()
_digest_lock = threading.Lock()


def cache_dir() -> Path:
    """em-sweep's cache directory: $EM_SWEEP_CACHE_DIR, else $XDG_CACHE_HOME/em-sweep (~/.cache/em-sweep)."""
    if os.environ.get("EM_SWEEP_CACHE_DIR"):
        return Path(os.environ["EM_SWEEP_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "em-sweep"


def _stat_key(path: Path) -> tuple[str, int, int, int]:
    st = path.stat()
    return str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino


def file_digest(path: Path, persist: bool = False) -> str:
    """``sha256:<hex>`` of a file's bytes, memoised by path, size, mtime and inode (an edit in
    place, or another file put at the path, is hashed again). ``persist``: also keep it in the
    on-disk cache (:func:`cache_dir`) for other processes."""
    key = _stat_key(Path(path))
    with _digest_lock:
        if persist:
            _load_disk_cache()
        if key in _file_digests:
            return _file_digests[key]
    with open(path, "rb") as f:
        digest = "sha256:" + hashlib.file_digest(f, "sha256").hexdigest()
    with _digest_lock:
        _file_digests[key] = digest
    if persist:
        record = {"path": key[0], "size": key[1], "mtime_ns": key[2], "ino": key[3], "digest": digest}
        with contextlib.suppress(OSError):  # no writable cache: the digest is recomputed next time
            directory = cache_dir()
            directory.mkdir(parents=True, exist_ok=True)
            append_jsonl(directory / DIGEST_CACHE, record)
    return digest


def _load_disk_cache() -> None:
    path = cache_dir() / DIGEST_CACHE
    if path in _disk_cache_loaded:
        return
    _disk_cache_loaded.add(path)
    for r in read_jsonl(path):
        try:
            _file_digests[(str(r["path"]), int(r["size"]), int(r["mtime_ns"]), int(r["ino"]))] = str(r["digest"])
        except (KeyError, TypeError, ValueError):
            continue


def text_digest(value: Any) -> str:
    """``sha256:<hex>`` of the canonical JSON of ``value``."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()


def model_digest(path: str) -> dict[str, Any]:
    """What identifies ``model.path``: for a local directory (``pkg://`` included) the digest of
    its model files (:data:`MODEL_FILE_SUFFIXES`); for a hub id the commit its local HF cache
    resolves ``main`` to, or ``revision: None`` with a note when the model is not cached."""
    local = local_model_dir(path)
    if local is None:
        return {"hub_id": path, **_hub_revision(path)}
    directory = Path(local)
    if not (directory / "config.json").is_file():
        return {"files": None}  # not a model directory: the run's own check says so, before any compute
    files = sorted(p for p in directory.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix in MODEL_FILE_SUFFIXES)
    per_file = {p.name: file_digest(p, persist=True) for p in files}
    return {"files": text_digest(per_file), "n_files": len(per_file)}


def _hub_revision(repo_id: str) -> dict[str, Any]:
    try:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(repo_id, "config.json")
    except Exception:  # noqa: BLE001 - an invalid id: the run's own check reports it
        cached = None
    if isinstance(cached, str):
        return {"revision": Path(cached).parent.name}  # .../snapshots/<commit>/config.json
    return {"revision": None}  # not in the local HF cache: the id names the hub id only


# The shipped models (``model.path=pkg://<name>``).
ASSETS = Path(__file__).parent / "assets"
PKG_PREFIX = "pkg://"


def local_model_dir(path: str) -> str | None:
    """The local directory ``model.path`` names (``pkg://`` assets, paths, existing folders), or
    None for a hub id. Checks nothing (em_sweep.models.resolve_model_path does)."""
    if path.startswith(PKG_PREFIX):
        return str(ASSETS / path[len(PKG_PREFIX):])
    expanded = os.path.expanduser(path)
    looks_local = path.startswith(("/", ".", "~")) or os.path.exists(expanded) or path.count("/") > 1
    return expanded if looks_local else None


def prompt_digest(prompt: Mapping[str, Any]) -> dict[str, Any]:
    """The digest of the prompt texts (id, problem, answer of each of ``prompt.ids``, in order)."""
    from em_sweep.prompts import select_prompts

    items = select_prompts(_Attrs(prompt))
    return {"texts": text_digest([[p.id, p.problem, p.answer] for p in items])}


def benchmark_digest(entry: Any) -> tuple[str, str]:
    """(name, digest of the file) of one ``eval.benchmarks`` entry, shipped or custom."""
    from em_sweep.evaluation.benchmarks import BenchmarkError, benchmark_path, resolve_spec

    spec = resolve_spec(entry)
    path = benchmark_path(spec)
    try:
        return spec.name, file_digest(path)
    except OSError:
        raise BenchmarkError(f"benchmark {spec.name!r}: file not found: {path}") from None


class _Attrs(dict):
    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class InputDigests:
    """Digests of the inputs of runs, each distinct input read once per instance (a sweep plan
    keeps one for all its runs; a single run makes a fresh one)."""

    def __init__(self) -> None:
        self._memo: dict[tuple[Any, ...], Any] = {}

    def _once(self, key: tuple[Any, ...], compute: Any) -> Any:
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def of(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """{prompts, benchmarks, model} digests of a resolved config (plain data)."""
        prompt = config["prompt"]
        benchmarks = dict(
            self._once(("benchmark", entry if isinstance(entry, str) else json.dumps(entry, sort_keys=True, default=str)),
                       lambda entry=entry: benchmark_digest(entry))
            for entry in config["eval"]["benchmarks"])
        path = str(config["model"]["path"])
        return {"prompts": self._once(("prompt", str(prompt["pool"]), tuple(prompt["ids"])),
                                      lambda: prompt_digest(prompt)),
                "benchmarks": benchmarks,
                "model": self._once(("model", path), lambda: model_digest(path))}


def identity(cfg: DictConfig | Mapping[str, Any], digests: InputDigests | None = None) -> dict[str, Any]:
    """What a run id hashes: the identity version, the config that changes results, the inputs' digests.

    Reads the prompt pool, benchmark files and model files (each file hashed once per process,
    model files once per machine); raises PromptError / BenchmarkError for inputs that cannot be read.
    """
    data = _container(cfg)
    return {"id_version": ID_VERSION, "config": science_config(data),
            "inputs": (digests or InputDigests()).of(data)}


def run_id(cfg: DictConfig | Mapping[str, Any], digests: InputDigests | None = None) -> str:
    """A stable 16-hex-digit id: sha256 of the canonical JSON of :func:`identity`."""
    canonical = json.dumps(identity(cfg, digests), sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def run_dir_for(cfg: DictConfig | Mapping[str, Any], digests: InputDigests | None = None) -> Path:
    """``paths.runs_dir / run_id`` as an absolute path."""
    data = _container(cfg)
    return Path(str(data["paths"]["runs_dir"])).expanduser().absolute() / run_id(data, digests)


# ---------------------------------------------------------------- files (atomic, with the user's umask)

_umask_lock = threading.Lock()


def _umask() -> int:
    try:  # Linux: read without setting it (no window in which another thread's files get a wrong mode)
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    with _umask_lock:  # os.umask can only be read by setting it: no other thread may create files meanwhile
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temp file in the same directory, fsync, then rename over ``path``."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Atomically replace ``path`` with ``text`` (readers see the old or the new file, never half).
    The file gets the permissions an ordinary ``open`` would give (0666 less the umask)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600: collaborators could not read the run
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


def read_jsonl(path: Path, skipped: list[str] | None = None) -> list[dict[str, Any]]:
    """The JSON objects of ``path``, one a line; a line that is not one (a torn last line from a
    crash, binary garbage) is left out, and ``skipped`` gets ``"line N: why"`` for each."""
    return [record for _, record in numbered_jsonl(path, skipped)]


def numbered_jsonl(path: Path, skipped: list[str] | None = None) -> list[tuple[int, dict[str, Any]]]:
    """(line number, object) of each line of ``path`` that is a JSON object (see :func:`read_jsonl`)."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            if skipped is not None:
                skipped.append(f"line {number}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
            continue
        if not isinstance(record, dict):
            if skipped is not None:
                skipped.append(f"line {number}: a JSON {type(record).__name__}, not an object")
            continue
        records.append((number, record))
    return records


def read_json_file(path: Path) -> tuple[Any, str | None]:
    """(value, None) for a file that parses as JSON; (None, None) when there is no file; (None,
    reason) when it cannot be read or parsed (the reason names the file)."""
    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return None, None
    except OSError as e:
        return None, f"{Path(path).name}: cannot be read ({type(e).__name__}: {e.strerror or e})"
    try:
        return json.loads(data.decode("utf-8")), None
    except ValueError as e:
        return None, f"{Path(path).name}: not valid JSON ({type(e).__name__}: {str(e).splitlines()[0][:120]})"


# ---------------------------------------------------------------- completion, status, claims

COMPLETE, ABSENT, CORRUPT, UNREADABLE = "complete", "absent", "corrupt", "unreadable"


def completion(path: Path) -> tuple[str, str | None]:
    """Whether a run is done, verified: (``complete``, None) when ``results.json`` parses as an
    object whose ``run_id`` is this directory's name (the only definition of done);
    (``absent``, None) when there is none; (``corrupt``, why) when there is one but it is torn,
    not JSON or another run's (the run is re-run, its files set aside); (``unreadable``, why)
    when the file or the directory cannot be read (permissions, I/O)."""
    state, why, _ = verified_results(path)
    return state, why


def verified_results(path: Path) -> tuple[str, str | None, dict[str, Any] | None]:
    """:func:`completion` and, for a complete run, its results (one read of the file)."""
    path = Path(path)
    try:
        data = (path / RESULTS).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return ABSENT, None, None
    except OSError as e:
        return UNREADABLE, f"{RESULTS}: cannot be read ({type(e).__name__}: {e.strerror or e})", None
    try:
        results = json.loads(data.decode("utf-8"))
    except ValueError as e:
        return CORRUPT, f"{RESULTS}: not valid JSON ({type(e).__name__}: {str(e).splitlines()[0][:120]})", None
    if not isinstance(results, dict):
        return CORRUPT, f"{RESULTS}: a JSON {type(results).__name__}, not a results record", None
    if results.get("run_id") != path.name:
        return CORRUPT, f"{RESULTS}: records run {results.get('run_id')!r}, not {path.name!r}", None
    return COMPLETE, None, results


def is_complete(path: Path) -> bool:
    """True when the run's results were written and verify (:func:`completion`)."""
    return completion(path)[0] == COMPLETE


def read_status(path: Path) -> dict[str, Any] | None:
    """The run's status record, or None when it has none (never started) or it cannot be read."""
    status, _ = read_json_file(Path(path) / STATUS)
    return status if isinstance(status, dict) else None


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
    """The run's results, or None when it has none that parse."""
    results, _ = read_json_file(Path(path) / RESULTS)
    return results if isinstance(results, dict) else None


def set_aside(path: Path, why: str) -> Path:
    """Move every file of the run directory (not its lock or attempt count) into
    ``<run>/.corrupt-<UTC time>/`` with a note saying why; returns that folder. Nothing is deleted."""
    path = Path(path)
    target = path / f"{CORRUPT_PREFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{os.getpid()}"
    target.mkdir(parents=True)
    for entry in sorted(path.iterdir()):
        if entry.name in (".lock", ATTEMPTS) or entry.name.startswith(CORRUPT_PREFIX):
            continue
        os.replace(entry, target / entry.name)
    (target / "WHY").write_text(why.rstrip() + "\n")
    return target


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
    """Whether the process a record names (``host``, ``pid``) still exists: None where this host
    cannot tell (another host, no pid). Takes no lock, so asking never disturbs a run's claim."""
    pid = status.get("pid")
    if status.get("host") != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    except OverflowError:
        return None
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
