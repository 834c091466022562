"""One EM run across the GPUs of a node, for models whose training state does not fit one card:
PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

One step is still one optimizer update, whatever the number of ranks (MISSION.md s7): the
``train.batch_size`` responses are split evenly over the ranks, each rank samples its share,
the generated-token count is summed over ranks, and each rank backpropagates
``world * (its entropy sum) / (global token count)``; FSDP averages gradients over ranks, so the
sharded gradient is exactly that of the global batch's masked mean entropy (the test runs two
CPU processes with gloo against one process). The update then runs on each rank's shard.

Layout: every decoder layer is one FSDP unit; the root unit is :class:`EntropyObjective`, which
holds the HF model and runs the loss pass (decoder + chunked entropy from hidden states), so
FSDP gathers the embeddings, final norm and head around it. For sampling every unit is gathered
once (the weights alone, replicated, e.g. 15 GB for 7B in bf16) and generation then runs with
no collective per step, so ranks whose responses end at different lengths never wait on each
other; the weights are resharded before the loss pass. Launch with ``torchrun --nproc-per-node N``.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule, fully_shard
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from em_sweep import decode
from em_sweep.em import (
    StepMetrics,
    accumulate_entropy_gradients,
    apply_update,
    micro_batch_entropy_sum,
    sampling_settings,
)
from em_sweep.sample import SampleBatch, SamplingSettings, sample_responses


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; (rank, world size).

    Backend: nccl with CUDA, else gloo. On CUDA each rank uses device LOCAL_RANK."""
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
    return dist.get_rank(), dist.get_world_size()


class EntropyObjective(torch.nn.Module):
    """The HF model and its loss pass as one module, the FSDP root (see the module docstring)."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, batch: SampleBatch, rows: slice, temperature: float, chunk_tokens: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
        return micro_batch_entropy_sum(self.model, batch, rows, temperature, chunk_tokens)


def shard_model(model: PreTrainedModel, mesh: Any = None, mp_policy: Any = None,
                reshard_after_forward: bool = True) -> EntropyObjective:
    """Shard ``model`` in place (each decoder layer, then the rest under the objective root)."""
    kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for layer in model.get_decoder().layers:
        fully_shard(layer, **kw)
    objective = EntropyObjective(model)
    fully_shard(objective, **kw)
    return objective


def _fsdp_units(objective: EntropyObjective) -> list[FSDPModule]:
    return [m for m in objective.modules() if isinstance(m, FSDPModule)]


@contextmanager
def gathered(objective: EntropyObjective) -> Iterator[None]:
    """All weights gathered on every rank, with no collective in forward (for generation)."""
    units = _fsdp_units(objective)
    for unit in units:
        unit.set_reshard_after_forward(False, recurse=False)
        unit.unshard()
    try:
        yield
    finally:
        for unit in units:
            unit.reshard()
            unit.set_reshard_after_forward(True, recurse=False)


def share(n: int, rank: int, world: int) -> slice:
    """This rank's contiguous share of ``n`` rows (``n`` must divide evenly: every rank must run
    the same number of micro-batches, each of which is a collective)."""
    if n % world:
        raise ValueError(f"train.batch_size={n} must be divisible by the number of ranks ({world})")
    k = n // world
    return slice(rank * k, (rank + 1) * k)


def sample_share(objective: EntropyObjective, tokenizer: PreTrainedTokenizerBase, texts: list[str],
                 settings: SamplingSettings, batch_size: int, seed: int) -> SampleBatch:
    """sample_responses on gathered weights. The static decoder's graphs would keep addresses of
    gathered weights that resharding frees, so its cache is released afterwards."""
    model = objective.model
    with gathered(objective):
        batch = sample_responses(model, tokenizer, texts, settings, batch_size=batch_size, seed=seed)
    decode.release(model)
    return batch


def _all_sum(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().clone().float()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def backward_share(objective: EntropyObjective, batch: SampleBatch, train: Any) -> tuple[float, float]:
    """Accumulate this rank's share of the global batch gradient; (global mean entropy, global tokens)."""
    world = dist.get_world_size()
    n_global = _all_sum(batch.response_mask.sum()).clamp(min=1)

    def entropy_fn(model: Any, b: SampleBatch, rows: slice, tau: float, chunk: int
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        return objective(b, rows, tau, chunk)

    local = accumulate_entropy_gradients(objective.model, batch, train, n_global.to(batch.input_ids.device),
                                         scale=float(world), entropy_fn=entropy_fn)
    return float(_all_sum(local) / n_global), float(n_global)


def _total_norm(norm: torch.Tensor) -> float:
    full = getattr(norm, "full_tensor", None)
    return float(full() if callable(full) else norm)


def em_step_distributed(objective: EntropyObjective, tokenizer: PreTrainedTokenizerBase,
                        optimizer: torch.optim.Optimizer, prompt_texts: list[str], train: Any, step: int,
                        lr: float, seed: int) -> StepMetrics:
    """em_sweep.em.em_step across ranks: this rank samples its share of ``prompt_texts`` (all
    ranks pass the same full list), one optimizer update of the sharded weights. ``entropy`` is
    reported at the loss temperature (em_step re-scores at the sampling temperature when they differ)."""
    if getattr(train, "compile_loss", False):
        raise ValueError("train.compile_loss is for single-process runs; FSDP's layers are not compiled here")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = objective.model
    t0 = time.perf_counter()
    settings = sampling_settings(train)
    rows = share(len(prompt_texts), rank, world)
    batch = sample_share(objective, tokenizer, prompt_texts[rows], settings, train.sample_batch_size,
                         seed=seed * 1009 + rank)
    t1 = time.perf_counter()
    model.train()
    optimizer.zero_grad(set_to_none=True)
    loss, _ = backward_share(objective, batch, train)
    grad_norm = _total_norm(torch.nn.utils.clip_grad_norm_(objective.parameters(), train.grad_clip))
    t2 = time.perf_counter()
    apply_update(optimizer, loss, grad_norm, step, lr)
    t3 = time.perf_counter()
    lengths = _all_sum(batch.response_lengths.float().sum()) / len(prompt_texts)
    eos = _all_sum(batch.hit_eos.float().sum()) / len(prompt_texts)
    return StepMetrics(step=step, loss=loss, entropy=loss, response_length=float(lengths), eos_rate=float(eos),
                       grad_norm=grad_norm, lr=lr, seconds_sample=t1 - t0, seconds_loss=t2 - t1,
                       seconds_optim=t3 - t2)
