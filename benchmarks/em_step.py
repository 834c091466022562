"""One EM optimizer step: the reference code's way vs. em-sweep's, in one run.

A step = 64 sampled responses x 512 new tokens from a ~100-token prompt, the entropy loss over
them, one AdamW update (docs/method.md). Random weights in the Qwen2.5-Math-1.5B / -7B
architectures; generation runs to the full token budget (random weights never say EOS).

- reference style (the public one-shot-em train.py): micro-batch 2, HF ``generate`` in train
  mode with gradient checkpointing and without KV cache, then forward/backward of the
  full-vocabulary fp32 entropy. Too slow to run whole (~30 min a step on an H100), so it is
  MEASURED in parts and EXTRAPOLATED: without a cache, generating token k is one forward over
  the prompt and the k tokens before it, so that forward is timed at five lengths and
  interpolated over the 512 tokens, plus generate's own per-token overhead measured on the
  first ``--ref-tokens`` real tokens; one forward/backward of a full-length micro-batch is timed;
  both are multiplied by the 32 micro-batches. Its optimizer (DeepSpeed ZeRO-2 with CPU
  offload) is not reproduced and not counted.
- em-sweep: ``em_sweep.training.em.em_step`` as a run calls it (sampling backend, optimizer strategy and
  checkpointing as chosen); the first step includes one-time costs (graph capture) and is
  reported apart; the figure is the median of the following steps.

    python benchmarks/em_step.py --shape 7b --json em_step_7b.json
    python benchmarks/em_step.py --shape tiny --new-tokens 16 --batch 8 --micro-batch 4   # CPU smoke
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback
from typing import Any

import torch
import torch.nn.functional as F
from _common import (
    IdTokenizer,
    build_model,
    counting_shared_passes,
    environment,
    fmt,
    peak_gib,
    pick_device,
    pick_dtype,
    random_prompt,
    reset_peak,
    sync,
    timed,
    write_json,
)
from summarize import is_project
from transformers import StoppingCriteria, StoppingCriteriaList

from em_sweep.config import Config, ModelConfig, TrainConfig
from em_sweep.models import set_checkpointing
from em_sweep.training.em import em_step, make_optimizer


def train_settings(args: argparse.Namespace) -> TrainConfig:
    """The run's TrainConfig: the schema defaults (the paper's reference values, docs/method.md)
    with this benchmark's batch, token budget and speed settings. The keys the schema fills in by
    interpolation (lr, the temperatures) take the values they resolve to by default."""
    return TrainConfig(
        batch_size=args.batch, micro_batch_size=args.micro_batch, lr=ModelConfig.lr,
        sample_temperature=Config.temperature, loss_temperature=Config.temperature, max_new_tokens=args.new_tokens, sample_batch_size=args.batch,
        loss_chunk_tokens=args.loss_chunk_tokens, optimizer=args.optimizer, generation_backend=args.backend,
        compile_loss=bool(args.compile_loss), share_prompt_pass=bool(args.share_prompt))


def part_args(part: str, args: argparse.Namespace) -> argparse.Namespace:
    """``project[@backend][+compile_loss][+share_prompt][+micro<N>]``: the run's settings with a part's changes."""
    name, *options = part.split("+")
    changes: dict[str, Any] = {}
    if "@" in name:
        changes["backend"] = name.split("@", 1)[1]
    for option in options:
        if option in ("compile_loss", "share_prompt"):
            changes[option] = 1
        elif option.startswith("micro") and option[5:].isdigit():
            changes["micro_batch"] = int(option[5:])
        else:
            raise ValueError(f"unknown option {option!r} in part {part!r} (compile_loss, share_prompt, micro<N>)")
    return argparse.Namespace(**{**vars(args), **changes})


class TokenClock(StoppingCriteria):
    """Records the time at which each generated token is available (device synchronised)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.times = device, [time.perf_counter()]

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        sync(self.device)
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def reference_step(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """The reference code's step on one micro-batch of 2, extrapolated to the batch (see module doc)."""
    micro, n_micro = 2, args.batch // 2
    p, new = args.prompt_tokens, args.new_tokens
    set_checkpointing(model, True)
    model.train()
    hi = min(model.config.vocab_size, 5000)
    ids = torch.randint(100, hi, (micro, p), device=device)
    measured = max(2, min(args.ref_tokens, new))
    kw = dict(do_sample=True, top_p=0.95, temperature=0.5, repetition_penalty=1.15, use_cache=False, pad_token_id=0)
    with torch.no_grad():  # warm-up (kernels, allocator)
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=2, min_new_tokens=2, **kw)
    clock = TokenClock(device)
    with torch.no_grad():
        sync(device)
        clock.times = [time.perf_counter()]
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=measured,
                       min_new_tokens=measured, stopping_criteria=StoppingCriteriaList([clock]), **kw)
    per_token = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    # Without a cache, generating token k is one forward over the prompt and the k tokens before
    # it (plus sampling): measure that forward at a few lengths, add generate's own per-token
    # overhead (measured on the first tokens), and sum over the 512 tokens.
    seq = torch.randint(100, hi, (micro, p + new), device=device)
    lengths = sorted({p + min(measured // 2, new - 1), *(p + round(new * f) for f in (0.25, 0.5, 0.75)), p + new - 1})

    def forward_s(length: int) -> float:
        with torch.no_grad():
            times = [timed(device, model, input_ids=seq[:, :length])[1] for _ in range(3)]
        return sorted(times)[1]

    fwd = {length: forward_s(length) for length in lengths}
    early = sorted(per_token[1:])[len(per_token[1:]) // 2]  # median, tokens k >= 1
    overhead = max(0.0, early - fwd[lengths[0]])
    xs = torch.tensor(lengths, dtype=torch.float64)
    ys = torch.tensor([fwd[x] for x in lengths], dtype=torch.float64)
    ks = torch.arange(p, p + new, dtype=torch.float64)
    idx = torch.searchsorted(xs, ks).clamp(1, len(lengths) - 1)
    x0, x1, y0, y1 = xs[idx - 1], xs[idx], ys[idx - 1], ys[idx]
    interp = y0 + (y1 - y0) * ((ks - x0) / (x1 - x0)).clamp(0, 1)
    gen_micro = float(interp.sum()) + overhead * new

    def fwd_bwd() -> None:  # the reference loss: full-vocabulary fp32 entropy, checkpointed model
        logits = model(input_ids=seq).logits
        probs = F.softmax(logits.float() / 0.5, dim=-1)
        h = -(probs * torch.log(probs + 1e-12)).sum(-1)
        mask = torch.zeros_like(h)
        mask[:, p - 1:] = 1
        ((h * mask).sum() / mask.sum()).backward()

    fwd_bwd()
    model.zero_grad(set_to_none=True)
    reset_peak(device)
    _, fb_micro = timed(device, fwd_bwd)
    peak = peak_gib(device)
    model.zero_grad(set_to_none=True)
    set_checkpointing(model, False)
    model.eval()
    return {
        "label": (f"EXTRAPOLATED: 1 of {n_micro} micro-batches; generation = no-cache forward timed at "
                  f"{len(lengths)} lengths, interpolated over {new} tokens, + generate's overhead from "
                  f"{measured} real tokens"),
        "measured_tokens": measured, "micro_batches": n_micro,
        "forward_s_by_length": {str(k): round(v, 4) for k, v in fwd.items()},
        "generate_overhead_s_per_token": round(overhead, 4), "generate_first_tokens_s": [round(t, 4) for t in per_token],
        "sample_s": round(gen_micro * n_micro, 1), "loss_s": round(fb_micro * n_micro, 1), "optim_s": None,
        "step_s": round((gen_micro + fb_micro) * n_micro, 1), "peak_gib_loss_micro": peak,
        "micro_measured": {"gen_s_extrapolated": round(gen_micro, 3), "fwd_bwd_s": round(fb_micro, 3)},
    }


def project_steps(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """em_sweep's em_step, ``--steps`` times; the first is reported apart (one-time costs)."""
    train = train_settings(args)
    if args.gradient_checkpointing:
        set_checkpointing(model, True)
    optimizer, lr_at = make_optimizer(model, train)
    texts = [random_prompt(args.prompt_tokens, model.config.vocab_size, seed=1)] * args.batch
    tok = IdTokenizer()
    steps, shared = [], []
    reset_peak(device)
    for s in range(args.steps):
        t0 = time.perf_counter()
        with counting_shared_passes(shared):
            m = em_step(model, tok, optimizer, texts, train, step=s + 1, lr=lr_at(s), seed=1000 + s)
        sync(device)
        wall = time.perf_counter() - t0
        steps.append({"sample_s": m.seconds_sample, "loss_s": m.seconds_loss, "optim_s": m.seconds_optim,
                      "step_s": wall, "loss": m.loss, "response_length": m.response_length})
        print(f"  project step {s + 1}: {wall:.2f}s (sample {m.seconds_sample:.2f}, loss {m.seconds_loss:.2f}, "
              f"optim {m.seconds_optim:.3f}) loss {m.loss:.4f} len {m.response_length:.0f}", flush=True)
    peak = peak_gib(device)
    if args.gradient_checkpointing:
        set_checkpointing(model, False)
    from em_sweep.generation import decode  # free the static cache before anything else runs on this model
    decode.release(model)
    timed_steps = steps[1:] or steps
    med = {k: round(statistics.median(x[k] for x in timed_steps), 3) for k in ("sample_s", "loss_s", "optim_s", "step_s")}
    from em_sweep.generation.sample import resolve_backend

    return {"label": f"MEASURED: median of {len(timed_steps)} step(s) after the first", **med,
            "first_step_s": round(steps[0]["step_s"], 3), "peak_gib": peak, "steps": steps,
            "optimizer": getattr(optimizer, "em_name", type(optimizer).__name__),
            "backend": resolve_backend(model, args.backend), "gradient_checkpointing": args.gradient_checkpointing,
            "micro_batch": args.micro_batch, "loss_chunk_tokens": args.loss_chunk_tokens,
            "compile_loss": bool(args.compile_loss), "share_prompt": bool(args.share_prompt),
            "share_prompt_active": bool(shared) and all(shared)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="tiny", choices=["tiny", "small", "1.5b", "7b"])
    ap.add_argument("--parts", default="reference,project",
                    help="comma list of: reference, project[@<backend>][+compile_loss][+share_prompt][+micro<N>] "
                         "(another sampling backend / the compiled loss pass / the prompt run once per "
                         "micro-batch in the loss pass / another loss micro-batch, same model; "
                         "the ratio uses the fastest project part)")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, default=None,
                    help="responses per loss forward/backward; default 16 for 1.5b (fewer launches), else 8")
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--ref-tokens", type=int, default=24, help="reference tokens actually generated")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--backend", default="auto", help="train.generation_backend")
    ap.add_argument("--optimizer", default="auto", help="train.optimizer")
    ap.add_argument("--gradient-checkpointing", type=int, default=None, help="1/0; default: on for 7b only")
    ap.add_argument("--loss-chunk-tokens", type=int, default=2048)
    ap.add_argument("--compile-loss", type=int, default=0, help="1/0: train.compile_loss (compiled loss-pass layers)")
    ap.add_argument("--share-prompt", type=int, default=0, help="1/0: train.share_prompt_pass")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", default=None, help="write results here (a bare name goes under $OUT)")
    args = ap.parse_args(argv)
    if args.micro_batch is None:
        args.micro_batch = 16 if args.shape == "1.5b" else 8
    if args.gradient_checkpointing is None:
        args.gradient_checkpointing = int(args.shape == "7b")
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    result: dict[str, Any] = {"benchmark": "em_step", "shape": args.shape, "dtype": str(dtype).removeprefix("torch."),
                              "env": environment(device), "args": vars(args)}
    print(f"em_step {args.shape} on {result['env'].get('gpu', device)} ({result['dtype']}): "
          f"{args.batch} x {args.new_tokens} tokens, prompt {args.prompt_tokens}", flush=True)
    t0 = time.perf_counter()
    model = build_model(args.shape, device, dtype)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    result["params"] = sum(p.numel() for p in model.parameters())
    result["weights_gib"] = peak_gib(device)
    for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
        t0 = time.perf_counter()
        try:
            if is_project(part):
                result[part] = project_steps(model, part_args(part, args), device)
            else:
                result[part] = {"reference": reference_step}[part](model, args, device)
        except Exception as e:  # one part failing must not lose the others' figures
            traceback.print_exc()
            result[part] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
            model.zero_grad(set_to_none=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
        result[part]["wall_s"] = round(time.perf_counter() - t0, 1)
        if device.type == "cuda":  # the part's optimizer state and caches are gone: start the next clean
            torch.cuda.empty_cache()
        write_json(args.json, result)  # after every part: a later crash keeps what was measured
    ref = result.get("reference", {})
    timed = [k for k in result if is_project(k) and "step_s" in result[k]]
    if "step_s" in ref and timed:  # against the fastest project setting measured in this run
        best = min(timed, key=lambda k: result[k]["step_s"])
        result["ratio_reference_over_project"] = round(ref["step_s"] / result[best]["step_s"], 1)
        result["ratio_project_part"] = best
    print_table(result)
    write_json(args.json, result)
    return result


def print_table(r: dict[str, Any]) -> None:
    print(f"\nEM step, {r['shape']} ({r['params'] / 1e9:.2f}B params, {r['dtype']}) on {r['env'].get('gpu', r['env']['device'])}")
    keys = [("reference", "reference style (EXTRAPOLATED)")] + [
        (k, f"em-sweep {k} (measured)") for k in r if is_project(k)]
    w = max(len(name) for _, name in keys) + 2
    print(f"{'':<{w}}{'sample s':>10}{'loss s':>9}{'optim s':>9}{'step s':>9}{'peak GiB':>10}")
    for key, name in keys:
        p = r.get(key)
        if not p:
            continue
        if "error" in p:
            print(f"{name:<{w}}failed: {p['error'][:80]}")
            continue
        peak = p.get("peak_gib", p.get("peak_gib_loss_micro"))
        print(f"{name:<{w}}{fmt(p['sample_s']):>10}{fmt(p['loss_s']):>9}{fmt(p['optim_s'], 3):>9}"
              f"{fmt(p['step_s']):>9}{fmt(peak):>10}")
    for key, _ in keys[1:]:
        p = r[key]
        if "error" in p:
            continue
        print(f"  {key}: backend {p['backend']}, optimizer {p['optimizer']}, micro-batch {p['micro_batch']}, "
              f"checkpointing {bool(p['gradient_checkpointing'])}, compiled loss pass {p.get('compile_loss', False)}, "
              f"shared prompt pass {p.get('share_prompt', False)} (active {p.get('share_prompt_active', False)}), "
              f"first step {p['first_step_s']} s")
    if "ratio_reference_over_project" in r:
        print(f"  ratio reference / em-sweep: {r['ratio_reference_over_project']}x (against {r['ratio_project_part']})")
    print(flush=True)


if __name__ == "__main__":
    main()
