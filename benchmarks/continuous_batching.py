"""Evaluation generation: static batches vs continuous batching, side by side in one run.

The workload is the paper's four-benchmark greedy pass: per benchmark its problems (MATH500 500,
Minerva 272, OlympiadBench 675, AMC23 40; ``--problem-scale`` takes a share of them) with
ragged prompts and ragged response lengths. ASSUMED, not measured: the mean prompt and response
lengths per benchmark (``eval_throughput.BENCH``), prompts uniform within +-40% of the mean,
responses gamma(shape 2) around the mean with a share ``--capped`` running to the cap (3,072 new
tokens; ``--length-scale`` scales all lengths, for CPU). The models never emit EOS (random
weights; the shipped tiny model with its EOS removed), so the lengths are FORCED: a row of a
static batch runs until the batch's longest response ends (what HF-style batches cost when rows
end by EOS), a continuous-batching row ends at its own length (its budget).

MEASURED, per path, benchmark after benchmark as evaluation runs them, after a warm-up (graph
capture) that is not counted:
- static: today's evaluation before continuous batching: prompts sorted by length, batches of
  ``--batch``, each decoded until its longest response ends. ``--static auto`` is what
  eval.generation_backend=auto runs: HF generate off CUDA, the static-cache decoder (CUDA
  graphs) on CUDA (one decoder for the whole pass; a short last batch is filled with copies,
  counted as not useful).
- continuous: ``em_sweep.generation.decode.generate_continuous`` (eval.generation_backend=continuous):
  ``--batch`` slots, longest prompts first.

tokens/s = useful generated tokens (the forced lengths' sum) / wall seconds of the pass.
slot use = tokens that decoding steps produced for a request / (decoding steps x rows): the
share of row-steps not spent on rows that already ended (or empty slots).

    python benchmarks/continuous_batching.py --shape tiny-arith --length-scale 0.25 --problem-scale 0.25  # CPU
    python benchmarks/continuous_batching.py --shape 7b --problem-scale 0.15 --json cb_7b.json           # GPU
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
from _common import ROOT, build_model, environment, pick_device, pick_dtype, sync, write_json
from eval_throughput import BENCH, MAX_NEW

from em_sweep.generation import decode

TINY_ARITH = ROOT / "em_sweep" / "assets" / "tiny-arith"


def load(shape: str, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The shipped tiny model (EOS removed: lengths are forced) or a random-weight shape."""
    if shape != "tiny-arith":
        return build_model(shape, device, dtype)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(TINY_ARITH, dtype=dtype).to(device).eval()
    model.generation_config.eos_token_id = None
    return model


def workload(vocab: int, problem_scale: float, length_scale: float, capped: float, seed: int
             ) -> dict[str, list[tuple[torch.Tensor, int]]]:
    """Per benchmark: (prompt ids, forced response length) of each problem (ASSUMED lengths)."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # Gamma.sample draws from torch's generator
    cap = max(2, int(MAX_NEW * length_scale))
    out = {}
    for name, (n, prompt_mean, response_mean) in BENCH.items():
        n = max(1, round(n * problem_scale))
        plen = (torch.rand(n, generator=gen) * 0.8 + 0.6) * prompt_mean * length_scale
        lengths = torch.distributions.Gamma(2.0, 2.0 / (response_mean * length_scale)).sample((n,))
        lengths = lengths.clamp(min=2, max=cap).long()
        lengths[torch.rand(n, generator=gen) < capped] = cap
        prompts = [torch.randint(3, vocab - 3, (max(2, int(p)),), generator=gen) for p in plen.tolist()]
        out[name] = list(zip(prompts, lengths.tolist(), strict=True))
    return out


def static_pass(model: torch.nn.Module, bench: dict[str, list[tuple[torch.Tensor, int]]], batch: int, backend: str,
                cap: int, device: torch.device) -> dict[str, Any]:
    """Today's evaluation: length-sorted static batches, each until its longest response ends."""
    pad = 0
    settings = decode.decode_settings(True, 1, 1, 0, 1.0, [], pad)
    width_max = max(len(p) for jobs in bench.values() for p, _ in jobs)
    dec = None
    if backend != "hf":
        dec = decode.StaticDecoder(model, batch, decode._round_up(width_max + cap, decode.ALIGN), settings,
                                   use_graphs=backend != "static_eager", compile_step=backend == "static_compile")
        warm = torch.randint(3, 50, (batch, 4), device=device)
        dec.generate(warm, torch.ones_like(warm), 3)  # capture outside the clock
    useful = steps = first = 0
    sync(device)
    t0 = time.perf_counter()
    for jobs in bench.values():
        jobs = sorted(jobs, key=lambda j: len(j[0]))
        for s in range(0, len(jobs), batch):
            chunk = jobs[s:s + batch]
            if dec is not None and len(chunk) < batch:  # the decoder's fixed batch: fill with copies
                chunk = chunk + [chunk[0]] * (batch - len(chunk))
                real = len(jobs) - s
            else:
                real = len(chunk)
            width = max(len(p) for p, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (p, _) in enumerate(chunk):
                ids[r, width - len(p):], mask[r, width - len(p):] = p, 1
            ids, mask = ids.to(device), mask.to(device)
            new = max(n for _, n in chunk)
            if dec is None:
                with torch.no_grad():
                    model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=new,
                                   min_new_tokens=new, pad_token_id=pad, eos_token_id=None)
            else:
                dec.generate(ids, mask, new)
            useful += sum(n for _, n in chunk[:real])
            first += real  # each row's first token comes from the prefill, not a decoding step
            steps += new - 1
    sync(device)
    seconds = time.perf_counter() - t0
    return {"backend": backend, "seconds": round(seconds, 3), "useful_tokens": useful, "decode_steps": steps,
            "tokens_per_s": round(useful / seconds, 1),
            "slot_use": round((useful - first) / max(steps * batch, 1), 3)}


def continuous_pass(model: torch.nn.Module, bench: dict[str, list[tuple[torch.Tensor, int]]], batch: int,
                    backend: str, cap: int, device: torch.device) -> dict[str, Any]:
    """eval.generation_backend=continuous: one call per benchmark, longest prompts first."""
    settings = decode.decode_settings(True, 1, 1, 0, 1.0, [], 0)
    use_graphs, compile_step = device.type == "cuda", backend == "continuous_compile"
    width_max = max(len(p) for jobs in bench.values() for p, _ in jobs)
    # One decoder for the whole pass, as the static path has (a benchmark with fewer problems than
    # slots leaves slots empty, as a short static batch is filled); warmed up (graphs captured)
    # outside the clock.
    dec = decode.ContinuousDecoder(model, batch, decode._round_up(width_max + cap, decode.ALIGN), settings,
                                   use_graphs, compile_step)
    dec.run([torch.randint(3, 50, (4,), device=device) for _ in range(batch)], list(range(batch)), 3)
    useful = steps = first = 0
    sync(device)
    t0 = time.perf_counter()
    for jobs in bench.values():
        jobs = sorted(jobs, key=lambda j: -len(j[0]))
        prompts = [p.to(device) for p, _ in jobs]
        out = dec.run(prompts, list(range(len(jobs))), cap, budgets=[n for _, n in jobs])
        assert [len(t) for t in out] == [n for _, n in jobs], "lengths were not forced"
        t = dec.last_timing
        useful += t["generated_tokens"]
        first += t["requests"]
        steps += t["decode_steps"]
    sync(device)
    seconds = time.perf_counter() - t0
    return {"backend": backend, "seconds": round(seconds, 3), "useful_tokens": useful, "decode_steps": steps,
            "tokens_per_s": round(useful / seconds, 1),
            "slot_use": round((useful - first) / max(steps * batch, 1), 3)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="tiny-arith", choices=["tiny-arith", "tiny", "small", "1.5b", "7b"])
    ap.add_argument("--batch", type=int, default=64, help="eval.batch_size: rows of a static batch / slots")
    ap.add_argument("--problem-scale", type=float, default=1.0, help="share of each benchmark's problems")
    ap.add_argument("--length-scale", type=float, default=1.0, help="scales prompt and response lengths and the cap")
    ap.add_argument("--capped", type=float, default=0.05, help="ASSUMED share of responses running to the cap")
    ap.add_argument("--static", default="auto",
                    help="static path(s), comma list of: auto | hf | static | static_eager | static_compile")
    ap.add_argument("--continuous", default="continuous", help="continuous | continuous_compile")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=1,
                    help="passes per path, the paths alternating; the fastest pass of each counts "
                         "(on a shared machine, load that comes and goes then hits every path alike)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--json", default=None, help="write results here (a bare name goes under $OUT)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    dtype = pick_dtype(args.dtype, device)
    statics = [b if b != "auto" else ("static" if device.type == "cuda" else "hf") for b in args.static.split(",")]
    model = load(args.shape, device, dtype)
    cap = max(2, int(MAX_NEW * args.length_scale))
    bench = workload(model.config.vocab_size, args.problem_scale, args.length_scale, args.capped, args.seed)
    lengths = [n for jobs in bench.values() for _, n in jobs]
    result: dict[str, Any] = {
        "benchmark": "continuous_batching", "shape": args.shape, "dtype": str(dtype).removeprefix("torch."),
        "env": environment(device), "args": vars(args),
        "workload": {"problems": {k: len(v) for k, v in bench.items()}, "cap": cap,
                     "mean_response": round(sum(lengths) / len(lengths), 1), "max_response": max(lengths),
                     "lengths": "ASSUMED distribution, FORCED (no EOS)"}}
    print(f"continuous_batching {args.shape} on {result['env'].get('gpu', device)} ({result['dtype']}), "
          f"batch {args.batch}: {len(lengths)} problems, mean response {result['workload']['mean_response']} "
          f"tokens, cap {cap}", flush=True)
    # "static": the first static path (what the ratio and measured.json use); others "static_<backend>".
    keys = ["static"] + [f"static_{b}" for b in statics[1:]]
    paths = [(key, lambda b=backend: static_pass(model, bench, args.batch, b, cap, device))
             for key, backend in zip(keys, statics, strict=True)]
    paths.append(("continuous", lambda: continuous_pass(model, bench, args.batch, args.continuous, cap, device)))
    for repeat in range(args.repeats):
        for key, run in paths:
            r = run()
            r["passes_s"] = [*result.get(key, {}).get("passes_s", []), r["seconds"]]
            if key not in result or r["seconds"] < result[key]["seconds"]:
                result[key] = r
            else:
                result[key]["passes_s"] = r["passes_s"]
            print(f"  pass {repeat + 1} {key} ({r['backend']}): {r['tokens_per_s']} tokens/s", flush=True)
            write_json(args.json, result)
    for key in keys:
        ratio = round(result["continuous"]["tokens_per_s"] / result[key]["tokens_per_s"], 2)
        result["ratio_continuous_over_" + key] = ratio
    write_json(args.json, result)
    print(f"\n{'path':<34}{'seconds':>9}{'useful tokens':>15}{'tokens/s':>10}{'slot use':>10}")
    for key in [*keys, "continuous"]:
        r = result[key]
        print(f"{key.split('_')[0] + ' (' + r['backend'] + ')':<34}{r['seconds']:>9}{r['useful_tokens']:>15}"
              f"{r['tokens_per_s']:>10}{r['slot_use']:>10}")
    for key in keys:
        print(f"continuous / static ({result[key]['backend']}) tokens/s: {result['ratio_continuous_over_' + key]}x"
              "  (same run, same workload)")
    return result


if __name__ == "__main__":
    main()
