"""FSDP2 across 2 CPU processes (gloo) against one process: same loss, gradient and update."""

import dataclasses
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from em_sweep.config import TrainConfig
from em_sweep.generation.sample import SampleBatch, SamplingSettings
from em_sweep.training.em import accumulate_entropy_gradients
from tests.tiny_models import PAD, prompts, random_qwen2, word_tokenizer

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
TRAIN = TrainConfig(micro_batch_size=2, lr=1e-3, loss_temperature=0.7, loss_chunk_tokens=5, grad_clip=1.0,
                    sample_batch_size=4, sample_temperature=0.7, top_p=0.95, top_k=0, repetition_penalty=1.0,
                    max_new_tokens=6, generation_backend="auto")


def fixed_batch(rows: int = 8, prompt: int = 5, new: int = 7) -> SampleBatch:
    """A sampled-looking batch with ragged prompts and response lengths (no sampling: deterministic)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 100, (rows, prompt + new), generator=g)
    attn = torch.ones_like(ids)
    resp = torch.zeros_like(ids)
    lengths = torch.randint(1, new + 1, (rows,), generator=g)
    for r in range(rows):
        attn[r, : r % 3] = 0  # left padding
        ids[r, : r % 3] = PAD
        attn[r, prompt + lengths[r]:] = 0
        resp[r, prompt - 1: prompt - 1 + lengths[r]] = 1
    return SampleBatch(input_ids=ids, attention_mask=attn, response_mask=resp, prompt_len=prompt,
                       response_lengths=lengths, texts=[""] * rows, hit_eos=torch.zeros(rows, dtype=torch.bool))


def rows_of(batch: SampleBatch, rows: slice) -> SampleBatch:
    return SampleBatch(batch.input_ids[rows], batch.attention_mask[rows], batch.response_mask[rows], batch.prompt_len,
                       batch.response_lengths[rows], batch.texts[rows], batch.hit_eos[rows])


def adamw(params):
    # eps 1e-6: Adam's first step is ~lr * sign(g), so a gradient of ~1e-9 differing in its last
    # bits between the two summation orders would otherwise move a weight by up to lr.
    return torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01)


def single_process_reference():
    model = random_qwen2(peaky=1.0).train()
    batch = fixed_batch()
    n = batch.response_mask.sum()
    loss = float(accumulate_entropy_gradients(model, batch, TRAIN, n)) / float(n)
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN.grad_clip)
    adamw(model.parameters()).step()
    return loss, grads, {k: p.detach().clone() for k, p in model.named_parameters()}


def worker(rank: int, port: int, out: str) -> None:
    from em_sweep.training.distributed import (
        backward_share,
        em_step_distributed,
        sample_share,
        shard_model,
        share,
    )
    from em_sweep.training.optim import make_adamw

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    try:
        model = random_qwen2(peaky=1.0).train()
        objective = shard_model(model)
        batch = fixed_batch()
        loss, n_tokens = backward_share(objective, rows_of(batch, share(8, rank, WORLD)), TRAIN)
        grads = {k.removeprefix("model."): p.grad.full_tensor() for k, p in objective.named_parameters()}
        torch.nn.utils.clip_grad_norm_(objective.parameters(), TRAIN.grad_clip)
        opt = adamw(objective.parameters())
        opt.step()
        params = {k.removeprefix("model."): p.full_tensor().detach() for k, p in objective.named_parameters()}
        opt.zero_grad(set_to_none=True)
        # Ranks whose generation lengths differ (as EOS makes them) must not wait on each other.
        tok = word_tokenizer()
        sampled = sample_share(objective, tok, prompts(2, seed=rank), SamplingSettings(
            temperature=1.0, max_new_tokens=4 + 8 * rank, backend="hf"), 2, seed=rank)
        # A whole distributed step: one update per parameter on every rank.
        metrics = em_step_distributed(objective, tok, opt, prompts(1) * 8, TRAIN, step=2, lr=1e-3, seed=5)
        steps = {int(s["step"]) for s in opt.state.values()}
        # The bf16 memory strategies update sharded (DTensor) weights too.
        moved = {}
        for name in ("adamw", "adamw_bf16_sr", "adamw_bf16_kahan"):
            bf16 = shard_model(random_qwen2(peaky=1.0, dtype=torch.bfloat16).train())
            before = {k: p.full_tensor().float() for k, p in bf16.named_parameters()}
            backward_share(bf16, rows_of(batch, share(8, rank, WORLD)), TRAIN)
            strategy = make_adamw(bf16.parameters(), name, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
            strategy.step()
            after = {k: p.full_tensor().float() for k, p in bf16.named_parameters()}
            moved[name] = sum(float((after[k] - before[k]).abs().sum()) for k in after) / sum(
                p.numel() for p in after.values())
        if rank == 0:
            torch.save({"loss": loss, "grads": grads, "params": params, "sampled_width": sampled.input_ids.shape[1],
                        "step_loss": metrics.loss, "optimizer_steps": steps, "moved": moved}, out)
    finally:
        dist.destroy_process_group()
    # Leave without finalizing the interpreter. A gloo worker thread can still be releasing its
    # last reference to a finished all-gather (tensors that own Python objects) when Python
    # finalizes; it then cannot take the GIL, pthread_exit unwinds through a noexcept destructor
    # and the rank dies of SIGABRT ("terminate called without an active exception", about 1 run in
    # 15 with two such tests side by side on 2 cores; the core dump shows
    # ProcessGroupGloo::runLoop -> ~AsyncAllgatherCoalescedWork -> gil_scoped_acquire). Everything
    # this test checks is saved above; an exception still propagates to mp.spawn.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_fsdp2_on_two_processes_matches_one_process(tmp_path):
    out = tmp_path / "rank0.pt"
    mp.spawn(worker, args=(free_port(), str(out)), nprocs=WORLD, join=True)
    got = torch.load(out)
    loss, grads, params = single_process_reference()
    assert got["loss"] == pytest.approx(loss, abs=1e-6)
    assert got["grads"].keys() == grads.keys()
    for k in grads:
        assert torch.allclose(got["grads"][k], grads[k], atol=1e-6, rtol=1e-5), k
        assert torch.allclose(got["params"][k], params[k], atol=1e-5, rtol=1e-5), k
    assert got["optimizer_steps"] == {2}  # the fixed-batch update, then exactly one per em_step_distributed
    assert got["step_loss"] > 0
    for name, mean_move in got["moved"].items():  # about lr per weight, finite
        assert 1e-4 < mean_move < 3e-3, (name, mean_move)


def test_distributed_step_refuses_compile_loss_before_any_collective():
    from em_sweep.training.distributed import em_step_distributed

    train = dataclasses.replace(TRAIN, compile_loss=True)
    with pytest.raises(ValueError, match="train.compile_loss is for single-process runs"):
        em_step_distributed(None, None, None, [], train, step=1, lr=1e-3, seed=0)  # type: ignore[arg-type]


# The tiny preset at a size two CPU processes run in seconds. top_k=1 makes every sampled
# response the greedy one whatever the seed, so one process and two ranks (which draw their own
# samples) train on the same batch; temperature 1.5 makes the entropy large enough to compare.
LAUNCH = ["train.steps=3", "train.batch_size=8", "train.micro_batch_size=4", "train.sample_batch_size=4",
          "train.max_new_tokens=16", "train.top_k=1", "temperature=1.5", "eval.max_new_tokens=16", "eval.limit=8",
          "eval.at_steps=[0,1]", "train.save_at_steps=[1]", "logger.mode=disabled", "seed=3"]


def _launch(prefix: list[str], root, *extra: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([*prefix, "launch.py", *LAUNCH, f"paths.root={root}", *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def _only_run(root: Path) -> Path:
    runs = list((root / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


@pytest.mark.slow
@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_launch_py_under_torchrun_with_fsdp_matches_one_process(tmp_path):
    """`torchrun --nproc-per-node 2 launch.py ... train.parallel=fsdp` (gloo on CPU) against plain
    `python launch.py ...`: the same loss at every step (so the same update), the same scores, the
    same checkpoint; rank 0 alone wrote the run directory."""
    import json

    from safetensors.torch import load_file

    one = _launch([sys.executable], tmp_path / "one")
    assert one.returncode == 0, one.stderr[-3000:]
    two = _launch([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2"], tmp_path / "two",
                  "train.parallel=fsdp")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("loss (mean token entropy at tau)") == 1  # only rank 0 prints a summary
    a, b = _only_run(tmp_path / "one"), _only_run(tmp_path / "two")
    assert a.name != b.name  # train.parallel=fsdp is part of the run id

    def steps(run):
        return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                if '"stage": "em"' in line]

    sa, sb = steps(a), steps(b)
    assert [s["step"] for s in sb] == [1, 2, 3]  # written once: rank 1 recorded nothing
    for x, y in zip(sa, sb, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4), (x, y)
        assert y["grad_norm"] == pytest.approx(x["grad_norm"], rel=1e-3), (x, y)
    assert sa[0]["loss"] > 0.05  # a comparison of something, not of zeros
    ra, rb = (json.loads((r / "results.json").read_text()) for r in (a, b))
    assert [(s["step"], s["accuracy"]) for s in rb["scores"]] == [(s["step"], s["accuracy"]) for s in ra["scores"]]
    assert [s["step"] for s in rb["scores"]] == [0, 1, 3]
    wa, wb = (load_file(r / "checkpoints" / "step-1" / "model.safetensors") for r in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4), k
    assert json.loads((b / "status.json").read_text())["state"] == "done"


@pytest.mark.slow
def test_fsdp_without_a_launcher_is_one_line_before_loading(tmp_path):
    result = _launch([sys.executable], tmp_path, "train.parallel=fsdp")
    assert result.returncode == 2
    assert "error: train.parallel: fsdp runs one process per GPU; start them with `torchrun" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.parallel=ddp"], "train.parallel: unknown 'ddp'"),
    (["train.parallel=fsdp", "stages=[em,rl]"], "train.parallel: fsdp runs the EM stage only"),
    (["train.parallel=fsdp", "train.compile_loss=true"], "train.parallel: fsdp does not compile the loss pass"),
    (["train.parallel=fsdp", "train.share_prompt_pass=true"], "train.parallel: fsdp runs the full loss pass"),
])
def test_fsdp_settings_it_cannot_serve_are_one_line_naming_the_key(overrides, message):
    from em_sweep.config import ConfigError, validate
    from tests.conftest import compose_config

    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides))
    assert str(info.value).startswith(message), str(info.value)
