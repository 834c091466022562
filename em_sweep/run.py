"""One run: config -> run directory -> (skip if done) -> evaluate / train / evaluate -> results.json.

Everything that can be checked without compute (config values, prompt ids, benchmark names,
model path) is checked by :func:`preflight` before a directory is created or a model loaded.
"""

from __future__ import annotations

import logging
import platform
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import transformers
from omegaconf import DictConfig, OmegaConf

from em_sweep import rundir
from em_sweep.config import ConfigError, eval_steps, stage_plan, to_container, validate
from em_sweep.evaluation.benchmarks import BenchmarkError, resolve_spec
from em_sweep.evaluation.evaluate import evaluate, evaluation_backend
from em_sweep.limits import check_run
from em_sweep.models import (
    ModelCache,
    ModelLoadError,
    check_model,
    checkpointing_modules,
    load_tokenizer,
    resolve_model_path,
    set_checkpointing,
)
from em_sweep.prompts import PoolItem, PromptError, format_prompt, load_pool, select_prompts
from em_sweep.record import RunRecorder, WandbMirror
from em_sweep.training.em import StepMetrics, train_em
from em_sweep.training.loss_pass import decoder_layers
from em_sweep.training.objectives import objective_name
from em_sweep.training.rl import RLStepMetrics, train_rl
from em_sweep.training.stopping import choose_step, probe_signals

log = logging.getLogger("em_sweep")

# Errors that mean "the input is wrong": reported as one line, before any compute.
INPUT_ERRORS = (ConfigError, PromptError, BenchmarkError, ModelLoadError)


class RunFailed(RuntimeError):
    """The run started but did not finish; its status.json says why."""


def check_config(cfg: DictConfig) -> None:
    """Resolve and validate the config (no files read but custom benchmarks'). Raises ConfigError."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except Exception as e:  # omegaconf's MissingMandatoryValue / InterpolationResolutionError
        raise ConfigError(f"{type(e).__name__}: {str(e).splitlines()[0]}") from None
    validate(cfg)


def preflight(cfg: DictConfig) -> list[PoolItem]:
    """Check everything checkable without compute; returns the prompt set. Raises INPUT_ERRORS."""
    check_config(cfg)
    return check_inputs(cfg)


def check_inputs(cfg: DictConfig) -> list[PoolItem]:
    """:func:`preflight` after the config's own check: benchmarks, model, prompts, limits."""
    for name in cfg.eval.benchmarks:
        resolve_spec(name)
    resolve_model_path(cfg.model.path)
    prompts = select_prompts(cfg.prompt)
    if "rl" in cfg.stages and cfg.rl.reward == "gold":  # the label-free rewards read no answers
        missing = [p.id for p in prompts if not (p.answer or "").strip()]
        if missing:
            raise PromptError(f"stages has rl with rl.reward=gold, which needs gold answers, but prompt(s) {missing} of "
                              f"pool {cfg.prompt.pool!r} have none")
    # The model without its weights (device, dtype, attention, config, tokenizer, weight files),
    # then context and memory limits: before a directory is created or the weights loaded.
    check_run(cfg, check_model(cfg.model), prompts)
    return prompts


def run(cfg: DictConfig, cache: ModelCache | None = None) -> dict[str, Any]:
    """Run one experiment to completion and return its results (stored results if already done).

    Raises one of INPUT_ERRORS for bad input (nothing written), RunFailed if the run started and
    failed (status.json records the reason; no results.json).
    """
    check_config(cfg)
    digests = rundir.InputDigests()
    # The id before preflight's model check, which may fetch a hub model's config into the HF
    # cache: a sweep's planner computed it without fetching anything.
    path = rundir.run_dir_for(cfg, digests)
    prompts = check_inputs(cfg)
    decided: Any = lambda go: None  # noqa: E731
    if cfg.train.parallel != "none":  # one run across the ranks torchrun/srun started (em_sweep.training.distributed)
        from em_sweep.training import distributed

        if not distributed.join(cfg):  # ranks > 0 take part in rank 0's run and write nothing
            return distributed.follow(cfg, prompts, eval_steps(cfg))
        decided, cache = distributed.announce, ModelCache()  # the run shards its model: not one to keep
    if rundir.is_complete(path):
        decided(False)
        log.info("run %s is already complete: %s", path.name, path)
        return {**(rundir.read_results(path) or {}), "skipped": True}
    with rundir.claimed(path) as ours:
        state, why = rundir.completion(path) if ours else (None, "")
        decided(ours and state != rundir.COMPLETE)
        if not ours:
            raise RunFailed(f"run {path.name} is being run by another process ({path})")
        if state == rundir.COMPLETE:  # finished while we waited for the claim
            return {**(rundir.read_results(path) or {}), "skipped": True}
        if state == rundir.UNREADABLE:  # a run cannot be written where its results cannot be read
            raise RunFailed(f"run {path.name}: {why}; fix the permissions or move it away ({path})")
        if state == rundir.CORRUPT:  # kept for inspection, never deleted
            aside = rundir.set_aside(path, f"{why}")
            log.warning("run %s: %s; its files were moved to %s and it runs again", path.name, why, aside)
        return _run_claimed(cfg, path, prompts, cache or ModelCache(), rundir.identity(cfg, digests))


def _run_claimed(cfg: DictConfig, path: Path, prompts: list[PoolItem], cache: ModelCache,
                 identity: dict[str, Any]) -> dict[str, Any]:
    config = to_container(cfg)
    attempt = rundir.reset_partial(path)
    rundir.write_text_atomic(path / rundir.CONFIG, OmegaConf.to_yaml(config))
    rundir.write_status(path, "running", attempt=attempt)
    tags = [cfg.model.name, cfg.prompt.name, "stages=" + ",".join(cfg.stages), "objective=" + objective_name(cfg)]
    texts = [{"id": p.id, "problem": p.problem, "answer": p.answer} for p in prompts]
    recorded_identity = identity_record(identity)
    mirror = WandbMirror(cfg.logger, path, path.name, cfg.name,
                         {**config, "identity": recorded_identity, "prompt_texts": texts},
                         tags=tags, attempt=attempt)
    recorder = RunRecorder(path, mirror)
    t_start = time.perf_counter()
    try:
        results = _execute(cfg, path, prompts, cache, recorder)
    except BaseException as e:
        reason = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".strip()
        rundir.write_status(path, "failed", reason=reason, traceback=traceback.format_exc(limit=20), attempt=attempt)
        mirror.finish(exit_code=1)
        if isinstance(e, KeyboardInterrupt | SystemExit):
            raise
        raise RunFailed(f"run {path.name} failed: {reason}") from e
    results.update(run_id=path.name, run_dir=str(path), config=config, seconds=time.perf_counter() - t_start,
                   identity=recorded_identity, versions=results["resolved"]["versions"])
    mirror.summary({**{f"final/{s['benchmark']}": s["accuracy"] for s in results["final_scores"]},
                    **{f"resolved/{k}": v for k, v in results["resolved"].items()}})
    mirror.finish()
    rundir.write_json_atomic(path / rundir.RESULTS, results)  # last: its presence means "done"
    rundir.write_status(path, "done", attempt=attempt)
    return results


def _execute(cfg: DictConfig, path: Path, prompts: list[PoolItem], cache: ModelCache,
             recorder: RunRecorder) -> dict[str, Any]:
    torch.manual_seed(cfg.seed)
    if cfg.eval.backend == "vllm":  # nothing trains (validated): vLLM loads the weights, no HF copy takes the GPU
        from em_sweep.generation.vllm_backend import saved_model

        cache.clear()  # a packed task's earlier hf run may hold one
        model, tokenizer = saved_model(cfg.model), load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    else:
        if "em_sweep.generation.vllm_backend" in sys.modules:  # an earlier vllm run of this task: free its engine
            sys.modules["em_sweep.generation.vllm_backend"].release()
        model, tokenizer = cache.get(cfg.model)
        if cfg.train.compile_loss or ("rl" in cfg.stages and cfg.rl.compile_loss):
            decoder_layers(model)  # a model the setting cannot serve fails here, before the step-0 evaluation
        # Also off where an earlier run of a packed task turned it on (the cache restores weights only).
        if cfg.model.gradient_checkpointing or checkpointing_modules(model):
            set_checkpointing(model, bool(cfg.model.gradient_checkpointing))
    formatted = {p.id: format_prompt(tokenizer, p.problem, cfg.prompt.system, cfg.prompt.chat_template)
                 for p in prompts}
    texts = [formatted[p.id] for p in prompts]  # train_em batches them per step (prompts.batch_prompts)
    at = set(eval_steps(cfg))
    primary_t = float(cfg.eval.temperatures[0])
    scores: list[dict[str, Any]] = []
    curve: list[dict[str, Any]] = []
    updates = 0  # optimizer updates so far (train.step_unit=micro_step: fewer than steps)

    heldout = heldout_prompt_texts(cfg, tokenizer, prompts)
    signals: list[dict[str, Any]] = []

    def on_eval(step: int) -> None:
        if cfg.stop.probe_samples or heldout:  # label-free stopping signals, every step
            base = signals[0].get("heldout_entropy") if signals else None
            signals.append(probe_signals(model, tokenizer, texts, heldout, cfg.train, cfg.stop, step, base))
            recorder.step({"stage": "probe", **signals[-1]})
        if step in cfg.train.save_at_steps:
            save_checkpoint(model, tokenizer, path / "checkpoints" / f"step-{step}")
        if step not in at:
            return
        t0 = time.perf_counter()
        step_scores, records = evaluate(model, tokenizer, cfg.eval, step)
        for s in step_scores:  # micro_step mode: a step is not an update
            s["updates"] = updates
        scores.extend(step_scores)
        recorder.eval(step, step_scores, records, primary_t)
        summary = "  ".join(f"{s['benchmark']}@T{s['temperature']:g}={100 * s['accuracy']:.1f}%" for s in step_scores)
        log.info("eval  step %3d  %s  (%.1fs)", step, summary, time.perf_counter() - t0)

    def on_step(m: StepMetrics) -> None:
        nonlocal updates
        updates += int(m.updated)
        record = {"stage": "em", **vars(m), "updates": updates}
        curve.append(record)
        recorder.step(record)
        log.info("em   step %3d/%d  loss %.4f  entropy %.4f  len %.1f  grad %.3f  sample %.1fs  loss %.1fs",
                 m.step, total, m.loss, m.entropy, m.response_length, m.grad_norm,
                 m.seconds_sample, m.seconds_loss)

    def on_rl_step(m: RLStepMetrics) -> None:
        nonlocal updates
        updates += 0 if m.skipped else int(cfg.rl.updates_per_batch)
        record = {"stage": "rl", **vars(m), "updates": updates}
        rl_curve.append(record)
        recorder.step(record)
        log.info("rl   step %3d/%d  reward %.3f  zero-adv groups %.2f  loss %.4f  kl %.4f  len %.1f  grad %.3f%s",
                 m.step, total, m.reward, m.zero_advantage_groups, m.loss, m.kl, m.response_length, m.grad_norm,
                 "  (no gradient: skipped)" if m.skipped else "")

    plan = stage_plan(cfg)
    total = plan[-1][2]
    rl_curve: list[dict[str, Any]] = []
    on_eval(0)
    for name, first, last in plan:
        if last < first:  # a stage without steps: nothing to set up (no optimizer, no reference copy)
            continue
        if name == "em":
            train = train_em
            if cfg.train.parallel != "none":
                from em_sweep.training.distributed import sharded_trainer

                train = sharded_trainer(at, set(cfg.train.save_at_steps))
            train(model, tokenizer, texts, cfg.train, cfg.seed, on_step=on_step, on_eval=on_eval,
                  start_step=first - 1)
        else:  # each prompt once: rl.* decides how often it is sampled
            train_rl(model, tokenizer, [formatted[p.id] for p in prompts], [str(p.answer) for p in prompts], cfg.rl,
                     cfg.seed, on_step=on_rl_step, on_eval=on_eval, start_step=first - 1,
                     generation_backend=cfg.train.generation_backend, grade_timeout_s=cfg.eval.grade_timeout_s)
    return {
        "objective": objective_name(cfg),
        "stop": {**choose_step(signals, cfg.stop, sorted(at)), "signals": signals} if signals else None,
        "prompt": {"name": cfg.prompt.name, "ids": list(cfg.prompt.ids), "note": cfg.prompt.note,
                   "texts": [{"id": p.id, "problem": p.problem, "answer": p.answer} for p in prompts]},
        "resolved": resolved_settings(cfg, model),
        "stages": [{"stage": n, "first_step": f, "last_step": la} for n, f, la in plan],
        # What the step axis counts: "update" (one optimizer update a step) or "micro_step" (the
        # reference's loop step; "updates" in scores and curves counts the optimizer updates).
        "step_unit": cfg.train.step_unit,
        "updates": updates,
        "scores": scores,
        "initial_scores": [s for s in scores if s["step"] == 0],
        "final_scores": [s for s in scores if s["step"] == total],
        "loss_curve": [{k: r[k] for k in ("step", "updates", "loss", "entropy", "response_length", "grad_norm")}
                       for r in curve],
        "rl_curve": [{k: r[k] for k in ("step", "reward", "reward_std", "zero_advantage_groups", "loss", "kl",
                                        "clip_fraction", "response_length", "grad_norm", "skipped", "agreement",
                                        "token_entropy")} for r in rl_curve],
    }


def heldout_prompt_texts(cfg: DictConfig, tokenizer: Any, prompts: list[PoolItem]) -> list[str]:
    """The first ``stop.heldout_prompts`` problems of ``prompt.pool`` that the run does not train on,
    formatted like the training prompts (their answers are never read)."""
    k = int(cfg.stop.heldout_prompts)
    if not k:
        return []
    trained = {p.id for p in prompts}
    pool = [p for p in load_pool(cfg.prompt.pool).values() if p.id not in trained][:k]
    return [format_prompt(tokenizer, p.problem, cfg.prompt.system, cfg.prompt.chat_template) for p in pool]


def identity_record(identity: dict[str, Any]) -> dict[str, Any]:
    """What results.json and W&B record of the run's identity: the version, the inputs' digests,
    and the keys left out of the id (the config itself is recorded whole beside it)."""
    record = {"id_version": identity["id_version"], "inputs": identity["inputs"],
              "not_in_run_id": list(rundir.NOT_IN_RUN_ID)}
    model = identity["inputs"]["model"]
    if "hub_id" in model and model.get("revision") is None:
        record["note"] = (f"model {model['hub_id']!r} was not in the local HF cache when the id was computed: "
                          "the id names the hub id, not a revision")
    return record


def resolved_settings(cfg: DictConfig, model: Any) -> dict[str, Any]:
    """What the run's ``auto`` settings resolved to here (the same resolution the run's code makes:
    models.pick_device/pick_dtype, optim.resolve_optimizer_name, sample.resolve_backend,
    evaluate.evaluation_backend), the
    GPU's name (None on CPU) and the software versions."""
    from em_sweep.generation.sample import resolve_backend
    from em_sweep.models import pick_device, pick_dtype
    from em_sweep.training.optim import resolve_optimizer_name

    params = [p for p in model.parameters() if p.requires_grad] if isinstance(model, torch.nn.Module) else []
    device = params[0].device if params else pick_device(cfg.model.device)
    dtype = params[0].dtype if params else pick_dtype(cfg.model.dtype, device)
    trained = {name for name, first, last in stage_plan(cfg) if last >= first}
    return {
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "gpu_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "optimizer": resolve_optimizer_name(cfg.train.optimizer, params) if "em" in trained and params else None,
        "rl_optimizer": resolve_optimizer_name(cfg.rl.optimizer, params) if "rl" in trained and params else None,
        # After training: a static decoder that failed under auto has fallen back to hf by now.
        "generation_backend": resolve_backend(model, cfg.train.generation_backend) if trained and params else None,
        "eval_generation_backend": evaluation_backend(model, cfg.eval),
        "model_revision": getattr(getattr(model, "config", None), "_commit_hash", None),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "em_sweep": _em_sweep_version()},
    }


def _em_sweep_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("em-sweep")
    except PackageNotFoundError:
        return "unknown (not installed)"


def save_checkpoint(model: Any, tokenizer: Any, out: Path) -> None:
    """An HF-format checkpoint any tool (evaluation, analysis) accepts as ``model.path``; written
    beside it and renamed into place, so ``out`` is never half-written."""
    tmp = out.with_name(out.name + ".tmp")
    from em_sweep.training.distributed import (
        checkpoint_state,  # a sharded model's gathered state (train.parallel)
    )

    shutil.rmtree(tmp, ignore_errors=True)  # a save cut short
    model.save_pretrained(tmp, state_dict=checkpoint_state(model))
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def format_summary(results: dict[str, Any]) -> str:
    """The before/after table and loss-curve summary printed at the end of a run."""
    lines = [f"run {results['run_id']}  ({results['seconds']:.1f}s)  {results['run_dir']}"
             + (f"  objective {results['objective']}" if results.get("objective") else "")]
    before = {(s["benchmark"], s["temperature"]): s for s in results["initial_scores"]}
    final = results["final_scores"]
    steps = final[0]["step"] if final else 0
    lines.append(f"{'benchmark':<14}{'eval T':>7}{'step 0':>9}{f'step {steps}':>10}{'change':>9}{'n':>6}")
    for s in final:
        b = before.get((s["benchmark"], s["temperature"]))
        b_acc = f"{100 * b['accuracy']:.1f}%" if b else "-"
        delta = f"{100 * (s['accuracy'] - b['accuracy']):+.1f}pp" if b else "-"
        n = s.get("n_problems", "")
        lines.append(f"{s['benchmark']:<14}{s['temperature']:>7g}{b_acc:>9}{100 * s['accuracy']:>9.1f}%{delta:>9}{n:>6}")
    curve = results["loss_curve"]
    if curve:  # EM steps
        losses = [r["loss"] for r in curve]
        lines.append(f"loss (mean token entropy at tau): step 1 {losses[0]:.4f} -> step {curve[-1]['step']} "
                     f"{losses[-1]:.4f} (min {min(losses):.4f}); mean response length "
                     f"{curve[0]['response_length']:.1f} -> {curve[-1]['response_length']:.1f} tokens")
    rl_curve = results.get("rl_curve") or []
    if rl_curve:
        rewards = [r["reward"] for r in rl_curve]
        skipped = sum(1 for r in rl_curve if r["skipped"])
        lines.append(f"rl reward (mean over each step's samples): step {rl_curve[0]['step']} {rewards[0]:.3f} -> "
                     f"step {rl_curve[-1]['step']} {rewards[-1]:.3f} (mean {sum(rewards) / len(rewards):.3f}; "
                     f"{skipped} step(s) without gradient)")
    stages = results.get("stages") or []
    if len(stages) > 1 or (stages and stages[0]["stage"] != "em"):
        lines.append("stages: " + ", ".join(
            f"{s['stage']} (steps {s['first_step']}-{s['last_step']})" if s["last_step"] >= s["first_step"]
            else f"{s['stage']} (0 steps)" for s in stages))
    stop = results.get("stop")
    if stop:
        lines.append(f"label-free stopping rule {stop['rule']}: would keep step {stop['chosen_step']} "
                     f"(all rules: {stop['by_rule']})")
    prompt = results["prompt"]
    lines.append(f"prompt {prompt['name']} {prompt['ids']}")
    if prompt["note"]:
        lines.append(f"  {prompt['note'].strip()}")
    return "\n".join(lines)


def main(cfg: DictConfig) -> None:
    """Entry for launch.py: one run, a summary on stdout, exit status 1 on failure, 2 on bad input."""
    try:
        results = run(cfg)
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RunFailed as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    if "run_id" not in results:  # a rank > 0 of a train.parallel run has no results of its own
        return
    if results.get("skipped"):
        print(f"skipped: already complete (run {results.get('run_id')})")
    print(format_summary(results))
