"""Evaluation generation throughput: em-sweep's path vs. plain ``model.generate`` at batch 1.

Random weights in the Qwen2.5-Math-1.5B / -7B architectures, greedy decoding (the paper's
evaluation), lengths forced: random weights never emit EOS, so every row runs its full
token budget (EOS is removed from the model's generation config and the tokenizer).

MEASURED, per path:
- em-sweep: ``em_sweep.generation.sample.sample_responses`` as evaluation calls it (``--backend``, default
  auto: the static-cache CUDA-graph decoder on CUDA), at each ``--batch-sizes``, once from
  short prompts (``--short-prompt`` tokens, ``--new-tokens`` generated) and once from long
  prompts (``--long-prompt``, ``--long-new-tokens``). The decoder reports prefill and
  decoding device time apart (CUDA events); other backends are timed by wall clock with a
  one-token run giving the prefill.
- plain generate: ``model.generate`` at batch 1 with its default (dynamic) KV cache, the same two
  contexts, ``--b1-new-tokens`` tokens each; per-token times from a stopping-criteria clock.

"generated tokens/s" = batch / seconds per decoding step, at the short context.

EXTRAPOLATED: seconds for the paper's four-benchmark greedy pass (MATH500 500, Minerva 272,
OlympiadBench 675, AMC23 40 problems; 3,072 max new tokens). Per-step time is taken linear in
the context length between the two measured contexts (prefill linear in prompt length), and
summed over simulated batches. ASSUMED (not measured; stated with the result): mean prompt and
response lengths per benchmark (BENCH below, typical of Qwen2.5-Math-7B with the
qwen25-math-cot template), response lengths gamma-distributed around that mean with a share
``--capped`` of responses running to the 3,072-token cap (base models that loop), and batches of
``batch`` problems decoded until their longest response ends (HF-style static batching: a row that
finished waits for the batch).

    python benchmarks/eval_throughput.py --shape 7b --batch-sizes 64,128 --json eval_7b.json
    python benchmarks/eval_throughput.py --shape tiny --batch-sizes 4 --new-tokens 8 ...   # CPU smoke
"""

from __future__ import annotations

import argparse
import time
import traceback
from typing import Any

import torch
from _common import (
    IdTokenizer,
    build_model,
    environment,
    fmt,
    pick_device,
    pick_dtype,
    random_prompt,
    sync,
    timed,
    write_json,
)
from em_step import TokenClock
from transformers import StoppingCriteriaList

from em_sweep.generation import decode
from em_sweep.generation.sample import SamplingSettings, resolve_backend, sample_responses

# benchmark: (problems, ASSUMED mean prompt tokens with the template, ASSUMED mean response tokens)
BENCH = {"math500": (500, 110, 650), "minerva_math": (272, 140, 700),
         "olympiadbench": (675, 190, 1000), "amc23": (40, 150, 900)}
MAX_NEW = 3072


def fit_line(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float]:
    """(intercept, slope) through two points. A longer context never costs less: a negative
    slope (timing noise) becomes flat at the mean."""
    if x1 == x0 or y1 < y0:
        return (y0 + y1) / 2, 0.0
    slope = (y1 - y0) / (x1 - x0)
    return y0 - slope * x0, slope


def project_run(model: torch.nn.Module, batch: int, prompt: int, new: int, backend: str,
                device: torch.device) -> dict[str, Any]:
    """One sample_responses call (greedy) of ``batch`` prompts; prefill and per-step seconds."""
    texts = [random_prompt(prompt, model.config.vocab_size, seed=i) for i in range(batch)]
    settings = SamplingSettings(temperature=0.0, max_new_tokens=new, backend=backend)
    out, wall = timed(device, sample_responses, model, IdTokenizer(), texts, settings, batch)
    assert int(out.response_lengths.min()) == new, "lengths were not forced"
    t = decode.last_timing(model) if resolve_backend(model, backend) != "hf" else {}
    if t:
        return {"wall_s": wall, "prefill_s": t["prefill_s"], "step_s": t["decode_s"] / max(t["decode_steps"], 1),
                "timing": "device events"}
    _, wall1 = timed(device, sample_responses, model, IdTokenizer(), texts,
                     SamplingSettings(temperature=0.0, max_new_tokens=1, backend=backend), batch)
    return {"wall_s": wall, "prefill_s": wall1, "step_s": (wall - wall1) / max(new - 1, 1),
            "timing": "wall clock minus a 1-token run"}


def batch1_run(model: torch.nn.Module, prompt: int, new: int, device: torch.device) -> dict[str, Any]:
    """Plain model.generate, batch 1, greedy, default KV cache; per-token clock."""
    ids = torch.tensor([[int(t) for t in random_prompt(prompt, model.config.vocab_size, seed=7).split()]],
                       device=device)
    clock = TokenClock(device)
    with torch.no_grad():
        sync(device)
        clock.times = [time.perf_counter()]
        model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                       min_new_tokens=new, pad_token_id=0, stopping_criteria=StoppingCriteriaList([clock]))
    per = [b - a for a, b in zip(clock.times, clock.times[1:], strict=False)]
    steps = per[1:] or per
    return {"wall_s": clock.times[-1] - clock.times[0], "prefill_s": per[0], "step_s": sum(steps) / len(steps),
            "timing": "per-token clock"}


def model_for(short: dict[str, Any], long: dict[str, Any], p_short: int, p_long: int, n_short: int,
              n_long: int) -> dict[str, list[float]]:
    """Linear models: step seconds vs context (mid-run contexts), prefill seconds vs prompt length."""
    step = fit_line(p_short + n_short / 2, short["step_s"], p_long + n_long / 2, long["step_s"])
    prefill = fit_line(p_short, short["prefill_s"], p_long, long["prefill_s"])
    return {"step_vs_context": [step[0], step[1]], "prefill_vs_prompt": [prefill[0], prefill[1]]}


def response_lengths(n: int, mean: int, capped: float, gen: torch.Generator) -> list[int]:
    """ASSUMED distribution: gamma(shape 2) around ``mean``; a share ``capped`` hits the cap."""
    lengths = torch.distributions.Gamma(2.0, 2.0 / mean).sample((n,)).clamp(min=16, max=MAX_NEW)
    cap = torch.rand(n, generator=gen) < capped
    return [MAX_NEW if c else int(x) for x, c in zip(lengths.tolist(), cap.tolist(), strict=True)]


def pass_seconds(m: dict[str, list[float]], batch: int, capped: float, seed: int = 0) -> dict[str, float]:
    """EXTRAPOLATED seconds and generated tokens for the four-benchmark greedy pass."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    (a, b), (pa, pb) = m["step_vs_context"], m["prefill_vs_prompt"]
    total_s, total_tokens = 0.0, 0
    for n, prompt, mean in BENCH.values():
        lengths = response_lengths(n, mean, capped, gen)
        total_tokens += sum(lengths)
        for s in range(0, n, batch):
            steps = max(lengths[s:s + batch])
            # sum over t = 1 .. steps-1 of a + b (prompt + t), plus the prefill
            total_s += max(pa + pb * prompt, 0.0) + (steps - 1) * a + b * ((steps - 1) * prompt + steps * (steps - 1) / 2)
    return {"seconds": round(total_s, 1), "generated_tokens": total_tokens,
            "useful_tokens_per_s": round(total_tokens / total_s) if total_s > 0 else None}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="tiny", choices=["tiny", "small", "1.5b", "7b"])
    ap.add_argument("--paths", default="project,generate_b1", help="comma list of: project, generate_b1")
    ap.add_argument("--batch-sizes", default="64", help="em-sweep evaluation batch sizes to measure")
    ap.add_argument("--backend", default="auto", help="em-sweep generation backend")
    ap.add_argument("--short-prompt", type=int, default=128)
    ap.add_argument("--long-prompt", type=int, default=1536)
    ap.add_argument("--new-tokens", type=int, default=512, help="tokens generated from the short prompts")
    ap.add_argument("--long-new-tokens", type=int, default=128, help="tokens generated from the long prompts")
    ap.add_argument("--b1-new-tokens", type=int, default=64)
    ap.add_argument("--capped", type=float, default=0.05, help="ASSUMED share of responses hitting 3,072 tokens")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", default=None, help="write results here (a bare name goes under $OUT)")
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    result: dict[str, Any] = {
        "benchmark": "eval_throughput", "shape": args.shape, "dtype": str(dtype).removeprefix("torch."),
        "env": environment(device), "args": vars(args),
        "assumptions": {"benchmarks (problems, mean prompt tokens, mean response tokens)": BENCH,
                        "max_new_tokens": MAX_NEW, "share_capped": args.capped,
                        "lengths": "forced (random weights, no EOS)"}}
    print(f"eval_throughput {args.shape} on {result['env'].get('gpu', device)} ({result['dtype']})", flush=True)
    t0 = time.perf_counter()
    model = build_model(args.shape, device, dtype)
    result["build_s"] = round(time.perf_counter() - t0, 1)
    with torch.no_grad():  # warm-up: kernels, allocator, cuBLAS handles
        sample_responses(model, IdTokenizer(), [random_prompt(8, model.config.vocab_size, 0)] * 2,
                         SamplingSettings(temperature=0.0, max_new_tokens=4, backend=args.backend), 2)
        decode.release(model)
    paths = [p.strip() for p in args.paths.split(",") if p.strip()]
    ps, pl, ns, nl = args.short_prompt, args.long_prompt, args.new_tokens, args.long_new_tokens
    if "project" in paths:
        for bs in [int(b) for b in args.batch_sizes.split(",")]:
            key = f"project_b{bs}"
            t0 = time.perf_counter()
            try:
                short = project_run(model, bs, ps, ns, args.backend, device)
                long = project_run(model, bs, pl, nl, args.backend, device)
                decode.release(model)
                fitted = model_for(short, long, ps, pl, ns, nl)
                result[key] = {"backend": resolve_backend(model, args.backend), "batch": bs, "short": short,
                               "long": long, "fit": fitted,
                               "tokens_per_s": round(bs / short["step_s"]),
                               "tokens_per_s_long": round(bs / long["step_s"]),
                               "four_benchmarks": pass_seconds(fitted, bs, args.capped)}
            except Exception as e:  # keep the other parts' figures
                traceback.print_exc()
                result[key] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
                decode.release(model)
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            result[key]["wall_s"] = round(time.perf_counter() - t0, 1)
            print(f"  {key}: {result[key].get('tokens_per_s', result[key].get('error'))} tokens/s", flush=True)
            write_json(args.json, result)
    if "generate_b1" in paths:
        t0 = time.perf_counter()
        try:
            short = batch1_run(model, ps, args.b1_new_tokens, device)
            long = batch1_run(model, pl, args.b1_new_tokens, device)
            fitted = model_for(short, long, ps, pl, args.b1_new_tokens, args.b1_new_tokens)
            result["generate_b1"] = {"batch": 1, "short": short, "long": long, "fit": fitted,
                                     "tokens_per_s": round(1 / short["step_s"]),
                                     "tokens_per_s_long": round(1 / long["step_s"]),
                                     "four_benchmarks": pass_seconds(fitted, 1, args.capped)}
        except Exception as e:
            traceback.print_exc()
            result["generate_b1"] = {"error": f"{type(e).__name__}: {str(e)[:500]}"}
        result["generate_b1"]["wall_s"] = round(time.perf_counter() - t0, 1)
        write_json(args.json, result)
    print_table(result)
    write_json(args.json, result)
    return result


def print_table(r: dict[str, Any]) -> None:
    print(f"\nEvaluation generation, {r['shape']} ({r['dtype']}) on {r['env'].get('gpu', r['env']['device'])}; "
          f"greedy, lengths forced")
    print(f"{'path':<30}{'tok/s short':>12}{'tok/s long':>12}{'prefill s':>10}{'4-bench pass s (EXTRAP.)':>26}")
    rows = [k for k in r if k.startswith("project_b")] + (["generate_b1"] if "generate_b1" in r else [])
    for k in rows:
        p = r[k]
        name = f"em-sweep {p.get('backend', '')} b{p.get('batch', '?')}" if k.startswith("project") else \
            "model.generate b1"
        if "error" in p:
            print(f"{name:<30}failed: {p['error'][:80]}")
            continue
        print(f"{name:<30}{p['tokens_per_s']:>12}{p['tokens_per_s_long']:>12}{fmt(p['short']['prefill_s'], 3):>10}"
              f"{p['four_benchmarks']['seconds']:>26}")
    print("  tok/s = batch / seconds per decoding step (MEASURED); the pass time is EXTRAPOLATED from ASSUMED "
          "lengths (see the JSON 'assumptions')", flush=True)


if __name__ == "__main__":
    main()
