"""Where a static decoding step's time goes, for the next round of speed work.

- tail: ``choose_tokens`` alone on [batch, vocab] fp32 logits, greedy vs the EM sampling setting
  (T 0.5, top-p 0.95, repetition penalty 1.15), eager and compiled, each captured as a CUDA
  graph and replayed (ms per call; CPU: plain calls).
- kernels: a few decoding steps of the static decoder without graphs under torch.profiler:
  kernels per step and the ones taking most GPU time (eager and compiled layer).

    python benchmarks/profile_decode.py --shape 1.5b --json profile_decode.json
    python benchmarks/profile_decode.py --shape tiny --steps 4          # CPU smoke
"""

from __future__ import annotations

import argparse
import time
import traceback
from typing import Any

import torch
from _common import build_model, environment, pick_device, pick_dtype, write_json

from em_sweep.generation.decode import choose_tokens, decode_settings, generate_static, release


def top_p_by_bisection(logits: torch.Tensor, seen: torch.Tensor | None, s: Any) -> torch.Tensor:
    """EXPERIMENT (timed only): the top-p cut found by bisection over the fp32 bit pattern of a
    probability threshold (31 masked sums over the vocabulary) instead of a sort + cumsum;
    the same cut as HF's except within exact ties at the threshold."""
    scores = logits / s.temperature
    probs = scores.softmax(dim=-1)
    lo = torch.zeros(probs.shape[0], 1, dtype=torch.int32, device=probs.device)
    hi = torch.full_like(lo, 0x3F800000)  # 1.0f
    for _ in range(31):
        mid = lo + (hi - lo) // 2
        mass = torch.where(probs <= mid.view(torch.float32), probs, 0.0).sum(-1, keepdim=True)
        ok = mass <= 1 - s.top_p
        lo, hi = torch.where(ok, mid, lo), torch.where(ok, hi, mid)
    removed = probs <= lo.view(torch.float32)
    kept = scores.masked_fill(removed & (probs < probs.amax(-1, keepdim=True)), float("-inf")).softmax(-1)
    return (kept / torch.empty_like(kept).exponential_()).argmax(dim=-1)


def time_tail(fn: Any, logits: torch.Tensor, seen: torch.Tensor | None, s: Any, reps: int) -> float:
    """ms per call of fn(logits, seen, s), replayed as a CUDA graph on CUDA."""
    if logits.is_cuda:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn(logits, seen, s)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn(logits, seen, s)
        graph.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / reps * 1000
    fn(logits, seen, s)
    t0 = time.perf_counter()
    for _ in range(reps):
        fn(logits, seen, s)
    return (time.perf_counter() - t0) / reps * 1000


def profile_steps(model: Any, batch: int, prompt: int, steps: int, compile_step: bool) -> dict[str, Any]:
    """Kernels per decoding step and the top kernels by GPU time (static decoder, no graphs)."""
    from torch.profiler import ProfilerActivity, profile

    device = next(model.parameters()).device
    ids = torch.randint(1, model.config.vocab_size, (batch, prompt), device=device)
    mask = torch.ones_like(ids)
    s = decode_settings(True, 1.0, 1.0, 0, 1.0, [], 0)
    generate_static(model, ids, mask, s, steps + 1, use_graphs=False, compile_step=compile_step)  # warm-up
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        generate_static(model, ids, mask, s, steps + 1, use_graphs=False, compile_step=compile_step)
    release(model)
    rows = []
    for e in prof.key_averages():
        dev_us = getattr(e, "device_time_total", None)
        if dev_us is None:
            dev_us = getattr(e, "cuda_time_total", 0)
        if device.type == "cuda" and dev_us <= 0:
            continue
        rows.append((dev_us if device.type == "cuda" else e.self_cpu_time_total, e.count, e.key))
    rows.sort(reverse=True)
    kernels = sum(c for _, c, _ in rows) if device.type == "cuda" else None
    total = sum(t for t, _, _ in rows)
    return {"steps": steps, "compile_step": compile_step, "kernel_launches": kernels,
            "kernels_per_step": None if kernels is None else kernels / (steps + 1),
            "total_ms": total / 1000,
            "top": [{"name": k[:90], "ms_total": t / 1000, "calls": c} for t, c, k in rows[:14]]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=["tiny", "small", "1.5b", "7b"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=100)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--reps", type=int, default=200)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--parts", default="tail,kernels", help="comma list of: tail, kernels")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    device = pick_device(args.device)
    dtype = pick_dtype("auto", device)
    out: dict[str, Any] = {"env": environment(device), "args": vars(args), "tail": {}, "kernels": []}
    model = build_model(args.shape, device, dtype)
    vocab = model.config.vocab_size
    g = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(args.batch, vocab, device=device, generator=g) * 3
    seen = torch.rand(args.batch, vocab, device=device, generator=g) < 0.004  # ~600 tokens seen per row
    greedy = decode_settings(True, 1.0, 1.0, 0, 1.0, [], 0)
    em = decode_settings(False, 0.5, 0.95, 0, 1.15, [], 0)
    no_top_p = decode_settings(False, 0.5, 1.0, 0, 1.15, [], 0)
    em_no_pen = decode_settings(False, 0.5, 0.95, 0, 1.0, [], 0)
    cases = [("T0.5 top-p 0.95 (no penalty)", em_no_pen, None), ("greedy", greedy, None), ("T0.5 top-p 0.95 penalty 1.15", em, seen),
             ("T0.5 penalty 1.15 (no top-p)", no_top_p, seen)]
    print(f"tail: choose_tokens on [{args.batch}, {vocab}] ({device})")
    cases.append(("EXPERIMENT bisection top-p 0.95 (no penalty)", em_no_pen, None))
    parts = args.parts.split(",")
    tail_fns = (("eager", choose_tokens), ("compiled", torch.compile(choose_tokens))) if "tail" in parts else ()
    for label, fn in tail_fns:
        for name, s, sn in cases:
            key = f"{label}: {name}"
            try:
                if name.startswith("EXPERIMENT"):
                    fn_case = top_p_by_bisection if label == "eager" else torch.compile(top_p_by_bisection)
                else:
                    fn_case = fn
                ms = time_tail(fn_case, logits, sn, s, args.reps)
                out["tail"][key] = ms
                print(f"  {key:48s} {ms:8.3f} ms")
            except Exception as e:
                out["tail"][key] = f"{type(e).__name__}: {e}"
                print(f"  {key:48s} FAILED {type(e).__name__}: {e}")
            write_json(args.json, out)
    for compile_step in (False, True) if "kernels" in parts else ():
        try:
            res = profile_steps(model, args.batch, args.prompt_tokens, args.steps, compile_step)
        except Exception:
            traceback.print_exc()
            continue
        out["kernels"].append(res)
        write_json(args.json, out)
        print(f"decode steps ({'compiled layer' if compile_step else 'eager'}, batch {args.batch}, no graphs): "
              f"{res['kernels_per_step']} kernels per step; top by {'GPU' if device.type == 'cuda' else 'CPU'} time:")
        for row in res["top"]:
            print(f"  {row['ms_total']:9.3f} ms  {row['calls']:6d}x  {row['name']}")


if __name__ == "__main__":
    main()
