"""One EM run across the GPUs of a node, for models whose training state does not fit one card:
PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

One step is still one optimizer update, whatever the number of ranks (docs/reproducing.md): the
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
other; the weights are resharded before the loss pass.

From the entry point (``train.parallel=fsdp``, docs/cluster.md): ``torchrun --nproc-per-node N
launch.py model=... train.parallel=fsdp``, or a SLURM task of N processes (``hydra/launcher=slurm``
with ``gpus_per_task=N``: srun starts one process per GPU). Every rank composes the same config
and runs :func:`em_sweep.run.run`; rank 0 decides whether the run goes ahead (complete, claimed)
and tells the others (:func:`announce`), and only rank 0 writes the run directory and W&B. The
others (:func:`follow`) take part in every collective: sampling and updates, the full state dict
gathered for a checkpoint (rank 0 writes it), and evaluation, which every rank runs identically on
gathered weights (rank 0 records it; the step-0 evaluation, before sharding, runs on rank 0 only).
A failing rank ends the run on every rank: torchrun stops the others, srun runs with
``--kill-on-bad-exit``.
"""

from __future__ import annotations

import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import FSDPModule, fully_shard
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from em_sweep.config import Config, ConfigError, TrainConfig
from em_sweep.generation import decode
from em_sweep.generation.sample import SampleBatch, SamplingSettings, sample_responses
from em_sweep.prompts import batch_prompts
from em_sweep.training.em import (
    StepMetrics,
    accumulate_entropy_gradients,
    apply_update,
    make_optimizer,
    micro_batch_entropy_sum,
    sampling_settings,
)

# How long a collective waits for a rank busy on its own (rank 0's step-0 evaluation, its
# checkpoint writes) before the run fails: longer than one evaluation of the paper's benchmarks.
COLLECTIVE_TIMEOUT = timedelta(hours=2)


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Join the process group torchrun (or :func:`export_slurm_env`) describes in the environment;
    (rank, world size). Backend: nccl with CUDA, else gloo. On CUDA each rank uses device LOCAL_RANK."""
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend or ("nccl" if cuda else "gloo"), timeout=COLLECTIVE_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def export_slurm_env() -> None:
    """RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from the SLURM step this process is a
    task of (one task per GPU), as torchrun would set them; a no-op outside SLURM or when set."""
    env = os.environ
    if "SLURM_PROCID" not in env or "RANK" in env or int(env.get("SLURM_NTASKS", "1")) < 2:
        return
    if int(env.get("SLURM_NNODES", "1")) == 1:
        master = "127.0.0.1"
    else:  # the step's first node
        import subprocess

        master = subprocess.run(["scontrol", "show", "hostnames", env["SLURM_STEP_NODELIST"]], capture_output=True,
                                text=True, check=True).stdout.split()[0]
    # A port per job step, so that steps sharing a node do not collide.
    port = 20000 + (int(env.get("SLURM_JOB_ID", "0")) * 16 + int(env.get("SLURM_STEP_ID", "0") or 0)) % 20000
    env.update(RANK=env["SLURM_PROCID"], LOCAL_RANK=env.get("SLURM_LOCALID", "0"), WORLD_SIZE=env["SLURM_NTASKS"],
               MASTER_ADDR=master, MASTER_PORT=str(port))


def join(cfg: Config) -> bool:
    """Join the run's process group (before any model is loaded); True on the rank that writes.

    ConfigError when the ranks cannot share the batch evenly (every rank runs the same number of
    micro-batches, each a collective)."""
    export_slurm_env()
    if "WORLD_SIZE" not in os.environ:
        raise ConfigError("train.parallel: fsdp runs one process per GPU; start them with "
                          "`torchrun --nproc-per-node N launch.py ...` or hydra/launcher=slurm (no RANK/WORLD_SIZE set)")
    _, world = init_from_env()
    if cfg.train.batch_size % world:
        raise ConfigError(f"train.batch_size: {cfg.train.batch_size} is not divisible by the {world} ranks of "
                          "train.parallel=fsdp")
    return dist.get_rank() == 0


def announce(go: bool) -> bool:
    """Rank 0's decision whether the run goes ahead, received by every rank (rank 0 passes it)."""
    flag = torch.tensor([int(go)], dtype=torch.int64)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


# Full state dicts gathered for a checkpoint, by id of the model, for em_sweep.run.save_checkpoint.
_gathered_states: dict[int, dict[str, torch.Tensor]] = {}


def checkpoint_state(model: torch.nn.Module) -> dict[str, torch.Tensor] | None:
    """The full state dict :func:`sharded_trainer` gathered for this step's checkpoint (None for
    a model that is not sharded: save it as it is)."""
    return _gathered_states.get(id(model))


def sharded_trainer(eval_at: set[int], save_at: set[int]) -> Callable[..., None]:
    """em_sweep.training.em.train_em's counterpart across ranks, with the same signature: shards the model,
    then one :func:`em_step_distributed` per step. At a step of ``save_at`` every rank gathers the
    full state dict (rank 0 keeps it, on the CPU, for :func:`checkpoint_state`); at a step of
    ``eval_at`` or ``save_at``, ``on_eval(step)`` runs on every rank with the weights gathered."""

    def train(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_texts: list[str], train: TrainConfig,
              seed: int, on_step: Callable[[StepMetrics], None], on_eval: Callable[[int], None] | None = None,
              start_step: int = 0) -> None:
        objective = shard_model(model)
        optimizer, lr_at = make_optimizer(objective, train)
        for i in range(train.steps):
            step = start_step + i + 1
            texts = batch_prompts(prompt_texts, train.batch_size, step=i)
            metrics = em_step_distributed(objective, tokenizer, optimizer, texts, train, step, lr_at(i),
                                          seed=seed * 1_000_003 + start_step + i)
            on_step(metrics)
            if on_eval is None or step not in eval_at | save_at:
                continue
            if step in save_at:
                state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
                # A tied weight (lm_head = embed_tokens) comes back as two copies: keep its first
                # name only, as an unsharded model's checkpoint does.
                aliases: dict[int, list[str]] = {}
                for name, param in model.named_parameters(remove_duplicate=False):
                    aliases.setdefault(id(param), []).append(name)
                for names in aliases.values():
                    for name in names[1:]:
                        state.pop(name, None)
                _gathered_states[id(model)] = state
            try:
                with gathered(objective):
                    on_eval(step)
                decode.release(model)  # the static decoder's graphs keep addresses of the gathered weights
            finally:
                _gathered_states.pop(id(model), None)

    return train


def follow(cfg: Config, prompts: list[Any], eval_at: list[int]) -> dict[str, Any]:
    """A rank > 0 of a ``train.parallel=fsdp`` run: learns from rank 0 whether the run goes ahead,
    then takes part in it exactly as rank 0 does (same model, prompts, steps, evaluations), writing
    nothing. Returns a marker result (rank 0 has the real one)."""
    from em_sweep.evaluation.evaluate import evaluate
    from em_sweep.models import load_model, load_tokenizer, set_checkpointing
    from em_sweep.prompts import format_prompt

    rank = dist.get_rank()
    if not announce(False):
        return {"skipped": True, "rank": rank}
    torch.manual_seed(cfg.seed)
    tokenizer = load_tokenizer(cfg.model.path, cfg.model.trust_remote_code)
    model = load_model(cfg.model)
    if cfg.model.gradient_checkpointing:
        set_checkpointing(model, True)
    texts = [format_prompt(tokenizer, p.problem, cfg.prompt.system, cfg.prompt.chat_template) for p in prompts]

    def on_eval(step: int) -> None:
        if step in eval_at:
            evaluate(model, tokenizer, cfg.eval, step)  # rank 0 records its identical result

    save_at = set(cfg.train.save_at_steps)
    sharded_trainer(set(eval_at), save_at)(model, tokenizer, texts, cfg.train, cfg.seed, on_step=lambda m: None,
                                           on_eval=on_eval, start_step=0)
    return {"skipped": False, "rank": rank}


def exit_after(main: Callable[[Any], None], cfg: Config) -> None:
    """Run ``main(cfg)`` on this rank, then leave the process with its exit status without
    finalizing the interpreter.

    A gloo worker thread can still be releasing its last reference to a finished collective when
    Python finalizes; it then cannot take the GIL and the rank dies of SIGABRT ("terminate called
    without an active exception"; see tests/test_distributed.py). Everything the run writes is
    written (and flushed) before this returns, so the exit skips nothing of the run's."""
    code = 0
    try:
        main(cfg)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, int | None):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reported here: os._exit below skips Python's own report
        traceback.print_exc()
        code = 1
    if code == 0 and dist.is_initialized():
        dist.barrier()  # no rank leaves while another still needs it
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
    # FSDP makes the first module run forward its root. Sampling calls the inner model, which
    # would make a decoder layer the root and the loss pass fail: run the objective once first
    # (one token, no gradient; every rank, as any forward).
    ids = torch.ones((1, 2), dtype=torch.long, device=model.device)
    probe = SampleBatch(input_ids=ids, attention_mask=torch.ones_like(ids), response_mask=torch.tensor(
        [[1, 0]], device=ids.device), prompt_len=1, response_lengths=torch.ones(1, dtype=torch.long),
        texts=[""], hit_eos=torch.zeros(1, dtype=torch.bool))
    with torch.no_grad():
        objective(probe, slice(0, 1), 1.0, 0)
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


def backward_share(objective: EntropyObjective, batch: SampleBatch, train: TrainConfig) -> tuple[float, float]:
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
                        optimizer: torch.optim.Optimizer, prompt_texts: list[str], train: TrainConfig, step: int,
                        lr: float, seed: int) -> StepMetrics:
    """em_sweep.training.em.em_step across ranks: this rank samples its share of ``prompt_texts`` (all
    ranks pass the same full list), one optimizer update of the sharded weights. ``entropy`` is
    reported at the loss temperature (em_step re-scores at the sampling temperature when they differ)."""
    if train.compile_loss:
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
