"""Variance-based prompt selection (docs/method.md, section 3): which unlabeled prompt to run EM on.

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
prompts. ``em-sweep select-prompts`` (em_sweep/cli.py) runs :func:`select_prompts_command`.
"""

from __future__ import annotations

import json
import logging
import math
import re
import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import yaml

from em_sweep.evaluation.grading import DEFAULT_TIMEOUT_S

if TYPE_CHECKING:  # the command line imports this module; torch/transformers load only when used
    from em_sweep.config import SelectCommandConfig
    from em_sweep.prompts import PoolItem

log = logging.getLogger(__name__)

# Written as the first line of every generated prompt config; only such files are overwritten.
GENERATED_MARKER = "# Written by `em-sweep select-prompts`"
# Where prompt configs go by default: the project's conf/prompt, so `prompt=<name>` finds them.
PROMPT_CONF_DIR = Path(__file__).resolve().parents[2] / "conf" / "prompt"


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
                       grade_timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Sample ``k`` responses per item, grade each against the item's answer.

    Prompts are formatted exactly as EM training formats them. All ``len(items) * k`` samples
    go through the sampler in batches of ``batch_size`` (shortest prompts first, so a batch pads
    little); batch ``b`` uses seed ``seed + b``. Returns ({id: k floats in {0, 1}}, counters).
    """
    from em_sweep.evaluation.grading import extract_answer, grade_many
    from em_sweep.generation.sample import sample_responses
    from em_sweep.prompts import format_prompt

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


# ---------------------------------------------------------------- the command

def select_prompts_command(cfg: SelectCommandConfig, model_overrides: Sequence[str], command: str) -> dict[str, Any]:
    """Run select-prompts with the composed command config (``cfg.select``: :class:`em_sweep.config.SelectConfig`).

    ``model_overrides`` are the command line's overrides outside ``select.*`` (what chooses and
    samples the model); ``command`` is the command line, recorded in the ranking and the configs.
    Returns the ranking record (also written as JSON).
    """
    from omegaconf import OmegaConf

    from em_sweep.config import SelectConfig, validate_select
    from em_sweep.prompts import load_pool

    sel: SelectConfig = OmegaConf.to_object(cfg.select)  # type: ignore[assignment]
    validate_select(sel)
    items = list(load_pool(sel.pool).values())
    if sel.ids:
        by_id = {it.id: it for it in items}
        missing = [i for i in sel.ids if i not in by_id]
        if missing:
            raise SelectionError(f"select.ids: {missing} not in pool {sel.pool!r}")
        items = [by_id[i] for i in sel.ids]
    candidates, skipped = usable_candidates(items)
    if sel.limit is not None:
        candidates = candidates[:sel.limit]
    record: dict[str, Any] = {"command": command, "pool": pool_reference(sel.pool), "skipped": skipped}
    if sel.history:
        if model_overrides:
            raise SelectionError(f"select.history ranks without a model; drop {list(model_overrides)}")
        history = map_history_ids(load_history(sel.history), [it.id for it in items], sel.id_prefix)
        kept = {c.id for c in candidates}
        already = {s["id"] for s in skipped}
        skipped.extend({"id": i, "reason": "not among the candidates (select.ids / select.limit)"}
                       for i in sorted(set(history) - kept - already))
        history = {i: v for i, v in history.items() if i in kept}
        if not history:
            raise SelectionError(f"{sel.history}: no history entry is a usable prompt of pool {sel.pool!r}")
        prefix = sel.name or f"sel_{Path(sel.history).stem}"
        how = "std of One-Shot RLVR training accuracy over epochs"
        system, chat_template = None, True
        record.update(method="history", history_file=str(sel.history))
    else:
        history, settings, counters = _sample_history(cfg, candidates, sel.k)
        path_given = any(o.lstrip("+").startswith("model.path=") for o in model_overrides)
        model_name = _path_label(str(cfg.model.path)) if path_given else str(cfg.model.name)
        prefix = sel.name or f"sel_{model_name}"
        how = (f"variance of correctness over k={sel.k} samples of {model_name} at T={settings.temperature:g}")
        system, chat_template = cfg.prompt.system, bool(cfg.prompt.chat_template)
        record.update(method="sampling", model={"name": model_name, "path": cfg.model.path}, k=sel.k,
                      sampling=asdict(settings), seed=int(cfg.seed), prompt_format={
                          "system": system, "chat_template": chat_template}, **counters)
    ranked = variance_table(history)
    configs = build_prompt_configs(ranked, sel.top, config_name(prefix), record["pool"], how, system,
                                   chat_template, command)
    written = write_prompt_configs(Path(sel.out_dir) if sel.out_dir else PROMPT_CONF_DIR, configs, force=sel.force)
    record.update(n_candidates=len(ranked), top=sel.top, configs=[str(p) for p in written],
                  ranking=[{**asdict(r), "history": history[r.id]} for r in ranked])
    ranking_path = (Path(sel.ranking) if sel.ranking
                    else Path(str(cfg.paths.root)) / "selection" / f"{config_name(prefix)}_ranking.json")
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


def _sample_history(cfg: SelectCommandConfig, candidates: Sequence[PoolItem], k: int):
    """Check the composed config, load its model, sample and grade (``k`` samples per candidate)."""
    from em_sweep.config import validate
    from em_sweep.models import check_model, load_model, load_tokenizer
    from em_sweep.training.em import sampling_settings

    validate(cfg)
    check_model(cfg.model)  # device, attention, config, tokenizer and weight files: before the weights load
    settings = sampling_settings(cfg.train)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    model = load_model(cfg.model)
    history, counters = sample_correctness(
        model, tokenizer, candidates, k, settings, batch_size=int(cfg.train.sample_batch_size), seed=int(cfg.seed),
        system=cfg.prompt.system, chat_template=bool(cfg.prompt.chat_template),
        grade_timeout_s=float(cfg.eval.grade_timeout_s))
    return history, settings, counters


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
