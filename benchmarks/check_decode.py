"""Correctness of the static-cache decoder and the loss-pass options on this machine.

On a small random Qwen2 (seconds): greedy tokens of the static decoder with CUDA graphs and
without, and with continuous batching (fewer slots than prompts, so slots are refilled), against HF generate, in fp32 and bf16; a seed reproduces sampled tokens; a model
whose logits are all equal samples uniformly, step after step (the graphs' random numbers
advance at every replay); and the loss pass with the shared prompt (train.share_prompt_pass) and
compiled (train.compile_loss) gives the full eager pass's entropy and gradient with this
machine's transformers and torch. Prints one PASS/FAIL line per check and exits 1 on a failure.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from _common import IdTokenizer, counting_shared_passes, environment, pick_device, write_json
from transformers import Qwen2Config, Qwen2ForCausalLM

from em_sweep.config import Config, ModelConfig, TrainConfig
from em_sweep.generation import decode
from em_sweep.generation.sample import SamplingSettings, sample_responses
from em_sweep.models import set_checkpointing
from em_sweep.training.em import accumulate_entropy_gradients
from em_sweep.training.loss_pass import compiled_layers


def small_model(device: torch.device, dtype: torch.dtype, vocab: int = 4096, peaky: float = 30.0) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                      eos_token_id=None, pad_token_id=0, attn_implementation="sdpa")
    model = Qwen2ForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(peaky)  # clear greedy choices: kernels' rounding must not flip them
    model.generation_config.eos_token_id = None
    return model.to(device=device, dtype=dtype).eval()


def ragged_prompts(n: int, vocab: int) -> list[str]:
    g = torch.Generator().manual_seed(1)
    return [" ".join(str(int(t)) for t in torch.randint(1, vocab, (int(3 + 11 * i / n),), generator=g))
            for i in range(n)]


def loss_pass_gradients(model: Qwen2ForCausalLM, batch: Any, share: bool, compiled: bool, checkpointing: bool = False
                        ) -> tuple[float, torch.Tensor, int]:
    """(entropy sum, all gradients as one fp32 vector, micro-batches that ran their prompt once)
    of one loss pass over ``batch``."""
    model.train()
    model.zero_grad(set_to_none=True)
    set_checkpointing(model, checkpointing)
    train = TrainConfig(micro_batch_size=4, lr=ModelConfig.lr, sample_temperature=Config.temperature,
                        loss_temperature=Config.temperature, loss_chunk_tokens=64, share_prompt_pass=share)
    shared: list[bool] = []
    try:
        with counting_shared_passes(shared), compiled_layers(model, compiled):
            total = accumulate_entropy_gradients(model, batch, train, batch.response_mask.sum())
    finally:
        set_checkpointing(model, False)
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters()])
    model.eval()
    return float(total), grads, sum(shared)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    device = pick_device(args.device)
    tok = IdTokenizer()
    results: dict[str, Any] = {"env": environment(device), "checks": {}}

    def report(name: str, ok: bool, detail: str) -> None:
        results["checks"][name] = {"ok": ok, "detail": detail}
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)

    backends = (["static", "static_eager", "static_compile", "continuous", "continuous_compile"]
                if device.type == "cuda" else ["static_eager", "continuous"])

    def slots(backend: str, n: int) -> int:  # continuous: fewer slots than prompts, so slots are refilled
        return max(1, n // 3) if backend.startswith("continuous") else n
    # bf16: kernels round differently, so a row may leave HF's path once two tokens come close;
    # a broken decoder (mask, rope, cache) agrees on almost nothing. bf16 runs on CUDA only (slow on CPU).
    dtypes = ((torch.float32, 1.0), (torch.bfloat16, 0.5)) if device.type == "cuda" else ((torch.float32, 1.0),)
    for dtype, need in dtypes:
        model = small_model(device, dtype)
        # Ragged prompts without repetition penalty (masks, positions), equal-length prompts with it:
        # transformers versions differ in whether left padding counts for the penalty.
        cases = (("ragged", ragged_prompts(12, model.config.vocab_size), 1.0),
                 ("penalty 1.15", [ragged_prompts(12, model.config.vocab_size)[-1]] * 4, 1.15))
        for case, texts, penalty in cases:
            greedy = dict(temperature=0.0, max_new_tokens=args.new_tokens, repetition_penalty=penalty)
            ref = sample_responses(model, tok, texts, SamplingSettings(**greedy, backend="hf"), len(texts))
            for backend in backends:
                name = f"greedy {backend} == hf generate ({str(dtype)[6:]}, {case})"
                try:
                    got = sample_responses(model, tok, texts, SamplingSettings(**greedy, backend=backend),
                                           slots(backend, len(texts)))
                    # Integer counts: a float mean of all-equal tokens can come out as 0.99999994 on CUDA.
                    differ = int((got.input_ids != ref.input_ids).sum()) if got.input_ids.shape == ref.input_ids.shape \
                        else ref.input_ids.numel()
                    same = 1 - differ / ref.input_ids.numel()
                    ok = differ == 0 if need >= 1 else same >= need
                    report(name, ok, f"{differ} of {ref.input_ids.numel()} tokens differ ({same:.4f} equal, need "
                                     f"{need}); timing {decode.last_timing(model)}")
                except Exception as e:
                    report(name, False, f"{type(e).__name__}: {e}")
                decode.release(model)

    model = small_model(device, torch.float32, peaky=1.0)
    texts = ragged_prompts(8, model.config.vocab_size)
    for backend in backends:
        sampled = SamplingSettings(temperature=0.7, top_p=0.95, max_new_tokens=args.new_tokens, backend=backend)
        try:
            a = sample_responses(model, tok, texts, sampled, slots(backend, 8), seed=3)
            b = sample_responses(model, tok, texts, sampled, slots(backend, 8), seed=3)
            c = sample_responses(model, tok, texts, sampled, slots(backend, 8), seed=4)
            ok = torch.equal(a.input_ids, b.input_ids) and not torch.equal(a.input_ids, c.input_ids)
            report(f"sampling {backend} is seeded", ok, "same seed same tokens, other seed other tokens")
        except Exception as e:
            report(f"sampling {backend} is seeded", False, f"{type(e).__name__}: {e}")
        decode.release(model)

    flat = small_model(device, torch.float32, vocab=64)
    with torch.no_grad():
        flat.lm_head.weight.zero_()  # every logit 0: each step must draw uniformly, independently
    for backend in backends:
        try:
            out = sample_responses(flat, tok, ["5 6 7"] * 64, SamplingSettings(temperature=1.0, max_new_tokens=64,
                                                                              backend=backend), 64, seed=0)
            gen = out.input_ids[:, out.prompt_len:]
            repeats = float((gen[:, 1:] == gen[:, :-1]).float().mean())  # 1/64 if independent
            counts = torch.bincount(gen.flatten().cpu(), minlength=64).float()
            spread = float(counts.std() / counts.mean())  # ~ sqrt(64/4096) = 0.125 if uniform
            ok = repeats < 0.04 and spread < 0.17 and int((counts[1:] > 0).sum()) >= 60
            report(f"uniform sampling {backend}", ok, f"repeat rate {repeats:.4f} (~0.016), spread {spread:.3f} (~0.125)")
        except Exception as e:
            report(f"uniform sampling {backend}", False, f"{type(e).__name__}: {e}")
        decode.release(flat)

    # The loss pass: shared prompt and compiled layers against the full eager pass, one batch of
    # 8 responses to one prompt (fp32: equal to float rounding; bf16: to bf16 rounding).
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        model = small_model(device, dtype, peaky=1.0)
        batch = sample_responses(model, tok, [ragged_prompts(1, model.config.vocab_size)[0]] * 8,
                                 SamplingSettings(temperature=1.0, max_new_tokens=args.new_tokens, backend="hf"), 8,
                                 seed=0)
        full, g_full, _ = loss_pass_gradients(model, batch, share=False, compiled=False)
        for share, compiled, ckpt in ((True, False, False), (False, True, False), (True, True, False),
                                      (True, False, True)):
            name = f"loss pass{' shared prompt' if share else ''}{' compiled' if compiled else ''}" \
                   f"{' checkpointed' if ckpt else ''} == full eager ({str(dtype)[6:]})"
            try:
                total, g, n_shared = loss_pass_gradients(model, batch, share, compiled, ckpt)
                rel_loss = abs(total - full) / abs(full)
                rel_grad = float((g - g_full).norm() / g_full.norm())
                report(name, rel_loss < tol and rel_grad < tol and n_shared == (2 if share else 0),
                       f"entropy rel. diff {rel_loss:.2e}, gradient rel. diff {rel_grad:.2e} (need < {tol:g}); "
                       f"{n_shared} of 2 micro-batches ran the prompt once")
            except Exception as e:
                report(name, False, f"{type(e).__name__}: {e}")
    write_json(args.json, results)
    return 0 if all(c["ok"] for c in results["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
