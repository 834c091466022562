"""Variance-based prompt selection (MISSION.md s2): which unlabeled prompt to run EM on.

A candidate prompt is informative when the model is unsure of it: sampled k times, some
answers are right and some wrong. Two inputs give such a history of correctness per prompt:

* sampling: :func:`sample_correctness` draws k responses per pool prompt from a model (the same
  prompt formatting and sampling settings as EM training) and grades each against the pool's
  answer: a list of k zeros and ones per prompt;
* One-Shot RLVR's accuracy history: a JSON object mapping an example index to its list of
  per-epoch training accuracies (:func:`load_history`).

Either way :func:`rank_by_variance` orders the prompts (population variance, as One-Shot RLVR's
``np.std``; std gives the same order), and :func:`prompt_config_yaml` turns the top ones into
``conf/prompt/<name>.yaml`` files usable at once as ``prompt=<name>`` and in a sweep over
prompts. The command line (``em-sweep select-prompts``) is the thin layer at the bottom.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import statistics
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

if TYPE_CHECKING:  # the command line imports this module; torch/transformers load only when used
    from em_sweep.prompts import PoolItem

log = logging.getLogger(__name__)

# Written as the first line of every generated prompt config; only such files are overwritten.
GENERATED_MARKER = "# Written by `em-sweep select-prompts`"


class SelectionError(ValueError):
    """Unusable selection input; the message names the file (or id) and what is wrong with it."""


@dataclass(frozen=True)
class RankedPrompt:
    """One prompt's correctness statistics; ``variance`` and ``std`` are population (ddof=0)."""

    rank: int
    id: str
    n: int
    mean: float
    variance: float
    std: float


# ---------------------------------------------------------------- pure ranking

def _checked_values(prompt_id: str, values: Sequence[float]) -> list[float]:
    if isinstance(values, str | bytes) or not isinstance(values, Sequence):
        raise SelectionError(f"id {prompt_id!r}: expected a list of numbers, got {type(values).__name__}")
    if len(values) == 0:
        raise SelectionError(f"id {prompt_id!r}: empty history (need at least one value)")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise SelectionError(f"id {prompt_id!r}: value {i} is {v!r}, not a finite number")
        out.append(float(v))
    return out


def variance_table(history: Mapping[str, Sequence[float]]) -> list[RankedPrompt]:
    """Per-prompt mean, variance and std of a correctness history, most variable first.

    Variances are exact for the given floats (``statistics.pvariance``), so equal histories
    tie exactly; ties are broken by id (plain string order). Raises SelectionError naming the
    id for an empty history or a value that is not a finite number.
    """
    stats = []
    for prompt_id, values in history.items():
        xs = _checked_values(str(prompt_id), values)
        var = statistics.pvariance(xs)
        stats.append((str(prompt_id), len(xs), statistics.fmean(xs), var))
    stats.sort(key=lambda s: (-s[3], s[0]))
    return [RankedPrompt(rank=r, id=i, n=n, mean=m, variance=v, std=math.sqrt(v))
            for r, (i, n, m, v) in enumerate(stats, 1)]


def rank_by_variance(history: Mapping[str, Sequence[float]]) -> list[str]:
    """Prompt ids, most variable correctness (or accuracy) history first; ties broken by id."""
    return [r.id for r in variance_table(history)]


def usable_candidates(items: Sequence[PoolItem]) -> tuple[list[PoolItem], list[dict[str, str]]]:
    """Pool items that can be graded (a non-empty answer), and ``{"id", "reason"}`` for the rest."""
    usable, skipped = [], []
    for item in items:
        if item.answer is None or not item.answer.strip():
            skipped.append({"id": item.id, "reason": "no answer to grade against"})
        elif not item.problem.strip():
            skipped.append({"id": item.id, "reason": "empty problem"})
        else:
            usable.append(item)
    return usable, skipped


# ---------------------------------------------------------------- One-Shot RLVR history files

def parse_history(data: Any, source: str) -> dict[str, list[float]]:
    """Validate a decoded history: an object mapping id -> non-empty list of finite numbers.

    ``source`` (usually the file name) starts every error message.
    """
    if not isinstance(data, dict):
        raise SelectionError(f"{source}: expected a JSON object mapping an example index to its list of "
                             f"per-epoch accuracies, got a JSON {type(data).__name__}")
    if not data:
        raise SelectionError(f"{source}: the history is empty")
    out = {}
    for key, values in data.items():
        try:
            out[str(key)] = _checked_values(str(key), values)
        except SelectionError as e:
            raise SelectionError(f"{source}: {e}") from None
    return out


def load_history(path: str | Path) -> dict[str, list[float]]:
    """Read One-Shot RLVR's accuracy history (e.g. ``acc_step_500.json``); errors name the file."""
    from em_sweep import inputs

    path = Path(path)

    def fail(line: int | None, message: str) -> NoReturn:
        raise SelectionError(f"{path}{'' if line is None else f':{line}'}: {message}")

    try:
        path.stat()
    except OSError as e:
        raise SelectionError(f"{path}: cannot read history file ({e.strerror or type(e).__name__})") from None
    text = inputs.read_text(path, fail)

    def no_repeats(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:  # json keeps the last silently; name the line of the repeat
                lines = [n for n, t in enumerate(text.splitlines(), 1) if json.dumps(key) in t]
                fail(lines[-1] if len(lines) > 1 else None, f"key {key!r} appears twice"
                     + (f" (also on line {lines[0]})" if len(lines) > 1 else ""))
            seen.add(key)
        return dict(pairs)

    try:
        data = json.loads(text, object_pairs_hook=no_repeats)
    except json.JSONDecodeError as e:
        raise SelectionError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    return parse_history(data, str(path))


def map_history_ids(history: Mapping[str, list[float]], pool_ids: Sequence[str],
                    id_prefix: str | None = None) -> dict[str, list[float]]:
    """Rename history keys to pool ids.

    A key that is already a pool id stays. Otherwise ``<id_prefix><key>`` must be one; when
    ``id_prefix`` is None it is inferred as the letters every pool id starts with before its
    number (``dsr`` for dsr_sub's ``dsr<index>``), so One-Shot RLVR's index ``"124"`` becomes
    ``dsr124``. Keys that match no pool id raise SelectionError listing a few of them.
    """
    known = set(pool_ids)
    if id_prefix is None:
        prefixes = {m.group(1) for i in pool_ids if (m := re.fullmatch(r"(\D*)\d+", i))}
        id_prefix = prefixes.pop() if len(prefixes) == 1 else ""
    out, unknown = {}, []
    for key, values in history.items():
        if key in known:
            out[key] = values
        elif f"{id_prefix}{key}" in known:
            out[f"{id_prefix}{key}"] = values
        else:
            unknown.append(key)
    if unknown:
        raise SelectionError(f"history keys {unknown[:5]}{' ...' if len(unknown) > 5 else ''} "
                             f"({len(unknown)} in all) match no pool id (tried them as-is and with "
                             f"prefix {id_prefix!r}; pool ids look like {list(pool_ids)[:3]})")
    return out


# ---------------------------------------------------------------- sampling-based history

def sample_correctness(model: Any, tokenizer: Any, items: Sequence[PoolItem], k: int, settings: Any,
                       batch_size: int, seed: int, system: str | None = None, chat_template: bool = True,
                       grade_timeout_s: float = 5.0) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Sample ``k`` responses per item, grade each against the item's answer.

    Prompts are formatted exactly as EM training formats them. All ``len(items) * k`` samples
    go through the sampler in batches of ``batch_size`` (shortest prompts first, so a batch pads
    little); batch ``b`` uses seed ``seed + b``. Returns ({id: k floats in {0, 1}}, counters).
    """
    from em_sweep.grading import extract_answer, grade_many
    from em_sweep.prompts import format_prompt
    from em_sweep.sample import sample_responses

    texts = {it.id: format_prompt(tokenizer, it.problem, system, chat_template) for it in items}
    jobs = sorted(((it.id, j) for it in items for j in range(k)), key=lambda job: (len(texts[job[0]]), job))
    responses: dict[tuple[str, int], str] = {}
    t0 = time.perf_counter()
    n_batches = math.ceil(len(jobs) / batch_size)
    for b, start in enumerate(range(0, len(jobs), batch_size)):
        chunk = jobs[start:start + batch_size]
        out = sample_responses(model, tokenizer, [texts[i] for i, _ in chunk], settings,
                               batch_size=batch_size, seed=seed + b)
        responses.update(zip(chunk, out.texts, strict=True))
        if (b + 1) % 10 == 0 or b + 1 == n_batches:
            log.info("sampled batch %d/%d (%.1fs)", b + 1, n_batches, time.perf_counter() - t0)
    by_id = {it.id: it for it in items}
    order = [(it.id, j) for it in items for j in range(k)]
    extracted = [extract_answer(responses[job]) for job in order]
    grades = grade_many(extracted, [[by_id[i].answer] for i, _ in order], timeout_s=grade_timeout_s)
    history: dict[str, list[float]] = {it.id: [] for it in items}
    for (i, _), g in zip(order, grades, strict=True):
        history[i].append(1.0 if g.correct else 0.0)
    counters = {"responses": len(order), "boxed_rate": sum(a is not None for a in extracted) / max(len(order), 1),
                "grader_failures": sum(g.status in ("timeout", "error") for g in grades),
                "seconds": time.perf_counter() - t0}
    return history, counters


# ---------------------------------------------------------------- prompt configs

def config_name(text: str) -> str:
    """A Hydra-safe config name (letters, digits, underscore)."""
    name = re.sub(r"[^A-Za-z0-9_]+", "_", text).strip("_")
    if not name:
        raise SelectionError(f"cannot make a config name from {text!r}")
    return name


def pool_reference(pool: str) -> str:
    """How a config should name the pool: the shipped name, or an absolute path."""
    from em_sweep.prompts import PROMPTS_DIR, resolve_pool_path

    path = resolve_pool_path(pool).resolve()
    return path.stem if path.parent == PROMPTS_DIR.resolve() else str(path)


def prompt_config_yaml(name: str, pool: str, ids: Sequence[str], note: str, system: str | None = None,
                       chat_template: bool = True, header: str = "") -> str:
    """The text of a ``conf/prompt/<name>.yaml`` (fields of PromptConfig), marked as generated."""
    body = {"name": name, "pool": pool, "ids": list(ids), "system": system, "chat_template": chat_template,
            "note": note}
    comment = "".join(f"# {line}\n" for line in header.splitlines() if line.strip())
    return f"{GENERATED_MARKER}; re-running it may overwrite this file.\n{comment}" + yaml.safe_dump(
        body, sort_keys=False, allow_unicode=True, width=100)


def write_prompt_configs(out_dir: Path, configs: Mapping[str, str], force: bool = False) -> list[Path]:
    """Write ``<out_dir>/<name>.yaml`` for each (name, text).

    Refuses (SelectionError, before writing anything) to overwrite a file that select-prompts did
    not write, unless ``force``.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / f"{name}.yaml" for name in configs}
    clash = [str(p) for p in paths.values()
             if p.exists() and not p.read_text().startswith(GENERATED_MARKER)]
    if clash and not force:
        raise SelectionError(f"would overwrite hand-written prompt config(s) {clash}; choose another name= "
                             "prefix or pass --force")
    for name, text in configs.items():
        tmp = paths[name].with_suffix(".yaml.tmp")
        tmp.write_text(text)
        tmp.replace(paths[name])
    return list(paths.values())


def build_prompt_configs(ranked: Sequence[RankedPrompt], top: int, prefix: str, pool: str, how: str,
                         system: str | None, chat_template: bool, command: str) -> dict[str, str]:
    """One config per top prompt (``<prefix>_<id>``) plus a multi-shot one (``<prefix>_top<N>``)."""
    chosen = list(ranked[:top])
    configs = {}
    for r in chosen:
        name = config_name(f"{prefix}_{r.id}")
        note = (f"Chosen by variance-based selection: rank {r.rank} of {len(ranked)} by {how} "
                f"(mean {r.mean:.3f}, variance {r.variance:.4f}, std {r.std:.4f}, n {r.n}).")
        configs[name] = prompt_config_yaml(name, pool, [r.id], note, system, chat_template, header=command)
    if len(chosen) > 1:
        name = config_name(f"{prefix}_top{len(chosen)}")
        note = (f"Multi-shot: the top {len(chosen)} of {len(ranked)} prompts by {how}, "
                f"ids in rank order {[r.id for r in chosen]}.")
        configs[name] = prompt_config_yaml(name, pool, [r.id for r in chosen], note, system, chat_template,
                                           header=command)
    return configs


# ---------------------------------------------------------------- command line

# `key=value` arguments that belong to select-prompts itself; any other key=value is a Hydra
# override of the project config (model=<preset>, model.path=<checkpoint>, train.*, seed=...).
OWN_KEYS = {"pool", "k", "top", "name", "limit", "ids", "id_prefix"}


def split_arguments(tokens: Sequence[str]) -> tuple[dict[str, str], list[str]]:
    """Split ``key=value`` tokens into select-prompts' own settings and Hydra overrides."""
    own: dict[str, str] = {}
    overrides: list[str] = []
    for tok in tokens:
        key, sep, value = tok.partition("=")
        if not sep:
            raise SelectionError(f"argument {tok!r}: expected key=value (e.g. pool=dsr_sub k=16 top=6)")
        if key in OWN_KEYS:
            own[key] = value
        else:
            overrides.append(tok)
    return own, overrides


def _int_arg(own: Mapping[str, str], key: str, default: int | None, minimum: int = 1) -> int | None:
    if key not in own:
        return default
    try:
        value = int(own[key])
    except ValueError:
        raise SelectionError(f"{key}={own[key]!r}: expected an integer") from None
    if value < minimum:
        raise SelectionError(f"{key}={value}: must be >= {minimum}")
    return value


def _list_arg(text: str) -> list[str]:
    return [s.strip() for s in text.strip().strip("[]").split(",") if s.strip()]


def select_prompts_command(args: argparse.Namespace) -> dict[str, Any]:
    """Run select-prompts; returns the ranking record (also written as JSON)."""
    from em_sweep.prompts import load_pool

    own, overrides = split_arguments(args.arguments)
    top = _int_arg(own, "top", 6)
    limit = _int_arg(own, "limit", None)
    if "pool" not in own:
        raise SelectionError("pool=<name or path> is required (e.g. pool=dsr_sub)")
    pool_name = own["pool"]
    items = list(load_pool(pool_name).values())
    if "ids" in own:
        wanted = _list_arg(own["ids"])
        by_id = {it.id: it for it in items}
        missing = [i for i in wanted if i not in by_id]
        if missing:
            raise SelectionError(f"ids: {missing} not in pool {pool_name!r}")
        items = [by_id[i] for i in wanted]
    candidates, skipped = usable_candidates(items)
    if limit is not None:
        candidates = candidates[:limit]
    command = "em-sweep select-prompts " + " ".join([*args.arguments] + ([f"--history {args.history}"]
                                                                           if args.history else []))
    record: dict[str, Any] = {"command": command, "pool": pool_reference(pool_name), "skipped": skipped}
    if args.history:
        if overrides:
            raise SelectionError(f"--history ranks without a model; drop {overrides}")
        history = map_history_ids(load_history(args.history), [it.id for it in items], own.get("id_prefix"))
        kept = {c.id for c in candidates}
        already = {s["id"] for s in skipped}
        skipped.extend({"id": i, "reason": "not among the candidates (ids= / limit=)"}
                       for i in sorted(set(history) - kept - already))
        history = {i: v for i, v in history.items() if i in kept}
        if not history:
            raise SelectionError(f"{args.history}: no history entry is a usable prompt of pool {pool_name!r}")
        prefix = own.get("name", f"sel_{Path(args.history).stem}")
        how = "std of One-Shot RLVR training accuracy over epochs"
        system, chat_template = None, True
        record.update(method="history", history_file=str(args.history))
    else:
        k = _int_arg(own, "k", 16, minimum=2)
        history, settings, cfg, counters = _sample_history(candidates, k, overrides)
        path_override = [o.split("=", 1)[1] for o in overrides if o.startswith("model.path=")]
        model_name = _path_label(path_override[-1]) if path_override else str(cfg.model.name)
        prefix = own.get("name", f"sel_{model_name}")
        how = (f"variance of correctness over k={k} samples of {model_name} at T={settings.temperature:g}")
        system, chat_template = cfg.prompt.system, bool(cfg.prompt.chat_template)
        record.update(method="sampling", model={"name": model_name, "path": cfg.model.path}, k=k,
                      sampling=asdict(settings), seed=int(cfg.seed), prompt_format={
                          "system": system, "chat_template": chat_template}, **counters)
    ranked = variance_table(history)
    configs = build_prompt_configs(ranked, top, config_name(prefix), record["pool"], how, system, chat_template,
                                   command)
    written = write_prompt_configs(Path(args.out_dir), configs, force=args.force)
    record.update(n_candidates=len(ranked), top=top, configs=[str(p) for p in written],
                  ranking=[{**asdict(r), "history": history[r.id]} for r in ranked])
    ranking_path = (Path(args.ranking) if args.ranking
                    else Path("outputs") / "selection" / f"{config_name(prefix)}_ranking.json")
    ranking_path.parent.mkdir(parents=True, exist_ok=True)
    ranking_path.write_text(json.dumps(record, indent=1) + "\n")
    record["ranking_file"] = str(ranking_path)
    return record


def _path_label(path: str) -> str:
    """``<run id>_step_N`` for a run checkpoint, else the last part of the path."""
    parts = Path(path.rstrip("/")).parts
    if len(parts) >= 3 and parts[-2] == "checkpoints":
        return f"{parts[-3][:10]}_{parts[-1]}"
    return parts[-1] if parts else path


def _sample_history(candidates: Sequence[PoolItem], k: int, overrides: list[str]):
    """Compose the project config with ``overrides``, load its model, sample and grade."""
    from em_sweep.cli import compose
    from em_sweep.config import validate
    from em_sweep.em import sampling_settings
    from em_sweep.models import check_model, load_model, load_tokenizer

    cfg = compose(overrides)
    validate(cfg)
    check_model(cfg.model)  # device, attention, config, tokenizer and weight files: before the weights load
    settings = sampling_settings(cfg.train)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    model = load_model(cfg.model)
    history, counters = sample_correctness(
        model, tokenizer, candidates, k, settings, batch_size=int(cfg.train.sample_batch_size), seed=int(cfg.seed),
        system=cfg.prompt.system, chat_template=bool(cfg.prompt.chat_template),
        grade_timeout_s=float(cfg.eval.grade_timeout_s))
    return history, settings, cfg, counters


def format_ranking(record: Mapping[str, Any], show: int = 20) -> str:
    """A short table of the top of a ranking and where the configs went."""
    lines = [f"{'rank':>4}  {'id':<14}{'mean':>7}{'variance':>10}{'std':>8}{'n':>5}"]
    for r in record["ranking"][:show]:
        lines.append(f"{r['rank']:>4}  {r['id']:<14}{r['mean']:>7.3f}{r['variance']:>10.4f}{r['std']:>8.4f}{r['n']:>5}")
    if record["skipped"]:
        lines.append(f"skipped {len(record['skipped'])}: " + ", ".join(
            f"{s['id']} ({s['reason']})" for s in record["skipped"][:5]))
    lines.append("prompt configs: " + ", ".join(Path(p).stem for p in record["configs"]))
    lines.append(f"ranking: {record['ranking_file']}")
    return "\n".join(lines)


def cmd_select_prompts(args: argparse.Namespace) -> int:
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from em_sweep.config import ConfigError
    from em_sweep.models import ModelLoadError
    from em_sweep.prompts import PromptError

    try:
        record = select_prompts_command(args)
    except (SelectionError, PromptError, ModelLoadError, ConfigError, HydraException, OmegaConfBaseException) as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    print(format_ranking(record))
    return 0


def add_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Add ``select-prompts`` to the ``em-sweep`` command's subparsers."""
    from em_sweep.cli import CONF_DIR

    p = subparsers.add_parser(
        "select-prompts", help="rank pool prompts by variance of correctness; write prompt configs",
        description="Rank a pool's prompts by the variance of the model's correctness over k samples "
                    "(or by the std of a One-Shot RLVR accuracy history with --history) and write "
                    "conf/prompt/<name>.yaml for each of the top prompts plus one multi-shot config.")
    p.add_argument("arguments", nargs="*", metavar="key=value",
                   help="pool=<name|path> (required), k=16 samples per prompt, top=6 configs to write, "
                        "name=<config name prefix> (default sel_<model> / sel_<history file>), limit=<first N "
                        "candidates>, ids=[a,b] (candidates), id_prefix=<prefix for history keys>; any other "
                        "key=value is a Hydra override: model=<preset>, model.path=<checkpoint>, "
                        "train.sample_temperature=..., seed=...")
    p.add_argument("--history", help="One-Shot RLVR accuracy history JSON ({index: [accuracy per epoch]}); "
                                     "ranks by std without a model")
    p.add_argument("--out-dir", default=str(CONF_DIR / "prompt"), help="where prompt configs go (default conf/prompt)")
    p.add_argument("--ranking", help="ranking JSON path (default outputs/selection/<name>_ranking.json)")
    p.add_argument("--force", action="store_true", help="overwrite prompt configs not written by select-prompts")
    p.set_defaults(func=cmd_select_prompts)
