"""One-shot entropy minimization: sample from the model, score the entropy, take a step.

One step is one optimizer update: the batch of ``train.batch_size`` responses is split into
micro-batches whose gradients accumulate to exactly the gradient of the batch's masked mean
entropy (each micro-batch's entropy sum is divided by the batch's token count), so the update
does not depend on the micro-batch size.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from em_sweep.config import RLConfig, TrainConfig, accumulation_steps
from em_sweep.generation.sample import SampleBatch, SamplingSettings, sample_responses
from em_sweep.prompts import batch_prompts
from em_sweep.training.loss import entropy_sum_from_hidden, per_token_entropy
from em_sweep.training.loss_pass import compiled_layers, response_outputs
from em_sweep.training.optim import make_adamw
from em_sweep.training.reference import rank_batches, reference_positions, row_weights, weighted_tokens


class NonFiniteLoss(RuntimeError):
    """The loss or gradient norm became NaN/inf; the run must stop and be recorded as failed."""


@dataclass
class StepMetrics:
    step: int
    loss: float  # masked mean entropy of the batch, before the update
    entropy: float  # the same quantity at the sampling temperature (what the model "feels")
    response_length: float
    eos_rate: float
    grad_norm: float
    lr: float
    seconds_sample: float
    seconds_loss: float
    seconds_optim: float
    updated: bool = True  # the weights changed at this step (micro_step mode: only at accumulation boundaries)
    responses: int = 0  # distinct responses sampled (identically seeded ranks share theirs)


def make_optimizer(model: PreTrainedModel, train: TrainConfig | RLConfig) -> tuple[torch.optim.Optimizer, Callable[[int], float]]:
    """AdamW with the configured betas/eps/decay in the memory strategy ``train.optimizer``
    (em_sweep.training.optim; ``auto`` = torch AdamW for fp32 models), and the learning
    rate for each step (linear warm-up). The strategy used is ``optimizer.em_name``."""
    opt = make_adamw(model.parameters(), train.optimizer, lr=train.lr,
                     betas=(train.adam_beta1, train.adam_beta2), eps=train.adam_eps,
                     weight_decay=train.weight_decay)

    def lr_at(step: int) -> float:
        return train.lr * min(1.0, (step + 1) / train.warmup_steps) if train.warmup_steps else train.lr

    return opt, lr_at


def sampling_settings(train: TrainConfig) -> SamplingSettings:
    return SamplingSettings(temperature=train.sample_temperature, top_p=train.top_p, top_k=train.top_k,
                            repetition_penalty=train.repetition_penalty, max_new_tokens=train.max_new_tokens,
                            backend=train.generation_backend,
                            stop_on_tokenizer_eos=train.stop_tokens == "model_and_tokenizer")


def micro_batch_entropy_sum(model: PreTrainedModel, batch: SampleBatch, rows: slice, temperature: float,
                            chunk_tokens: int, share_prompt: bool = False, positions: torch.Tensor | None = None,
                            row_weights: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(sum of entropies at tau, the same detached) over the scored positions of ``rows``
    (``positions``, default the generated-token positions), each row's entropies weighted by
    ``row_weights[row]`` where given."""
    outputs, from_hidden = response_outputs(model, batch, rows, share_prompt, positions)
    token_weights = None
    if row_weights is not None:
        scored = batch.response_mask[rows] if positions is None else positions[rows]
        token_weights = row_weights[rows].to(outputs.device).repeat_interleave(scored.sum(-1))
    if from_hidden:
        head = model.get_output_embeddings()
        total = entropy_sum_from_hidden(outputs, head.weight, temperature, chunk_tokens, head.bias, token_weights)
    else:
        h = per_token_entropy(outputs, temperature)
        total = (h if token_weights is None else h * token_weights).sum()
    return total, total.detach()


def accumulate_entropy_gradients(model: PreTrainedModel, batch: SampleBatch, train: TrainConfig, denominator: torch.Tensor,
                                 scale: float = 1.0,
                                 entropy_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None,
                                 positions: torch.Tensor | None = None, row_weights: torch.Tensor | None = None
                                 ) -> torch.Tensor:
    """Backward ``scale * (entropy sum of each micro-batch) / denominator`` for every micro-batch of
    ``batch``; returns the (detached) entropy sum over the whole batch.

    With ``denominator`` = the batch's generated-token count, the accumulated gradient is
    exactly that of the batch's masked mean entropy whatever ``train.micro_batch_size``; a
    distributed step passes the global count and ``scale`` = world size (FSDP averages ranks).
    ``positions`` and ``row_weights``: the scored positions and per-row weights of
    :func:`micro_batch_entropy_sum` (the sums are then weighted).
    """
    if entropy_fn is None:
        share = bool(train.share_prompt_pass)

        def entropy_fn(model: PreTrainedModel, batch: SampleBatch, rows: slice, tau: float, chunk: int
                       ) -> tuple[torch.Tensor, torch.Tensor]:
            return micro_batch_entropy_sum(model, batch, rows, tau, chunk, share, positions, row_weights)
    loss_sum = torch.zeros((), dtype=torch.float32, device=batch.input_ids.device)
    for start in range(0, batch.input_ids.shape[0], train.micro_batch_size):
        rows = slice(start, start + train.micro_batch_size)
        total, detached = entropy_fn(model, batch, rows, train.loss_temperature, train.loss_chunk_tokens)
        loss = total / denominator  # as a single process always computed it; scaled only when distributed
        (loss * scale if scale != 1.0 else loss).backward()
        loss_sum += detached
    return loss_sum


def apply_update(optimizer: torch.optim.Optimizer, loss: float, grad_norm: float, step: int, lr: float) -> None:
    """One optimizer update at ``lr`` from the accumulated (clipped) gradients; a NaN/inf loss or
    gradient norm drops the gradients and raises NonFiniteLoss instead, leaving the weights as they were."""
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
        optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLoss(f"step {step}: loss={loss} grad_norm={grad_norm}")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@dataclass
class Accumulation:
    """Gradients accumulating over the micro-steps of one update (``train.step_unit=micro_step``)."""

    steps: int  # micro-steps per update
    done: int = 0  # micro-steps accumulated since the last update
    tokens: float = 0.0  # their scored tokens (batch_token_mean divides the gradient by them at the update)


def em_step(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, optimizer: torch.optim.Optimizer,
            prompt_texts: list[str], train: TrainConfig, step: int, lr: float, seed: int,
            accumulation: Accumulation | None = None) -> StepMetrics:
    """Sample responses to ``prompt_texts`` and minimise their mean token entropy.

    Without ``accumulation`` the texts are one update's batch and the step is one update. With it
    (``train.step_unit=micro_step``) they are one micro-step's, the gradient accumulates, and the
    update comes with the last micro-step of the window. How ranks, their samples, the averaging and
    the scored positions map onto the batch: :mod:`em_sweep.training.reference` (defaults: one rank, one
    token mean over the batch, the generated-token positions).
    """
    t0 = time.perf_counter()
    texts, ranks = rank_batches(prompt_texts, train.rank_batch_size, train.data_parallel_ranks,
                                identical=train.rank_sampling == "identical")
    batch = sample_responses(model, tokenizer, texts, sampling_settings(train),
                             batch_size=train.sample_batch_size, seed=seed)
    t1 = time.perf_counter()
    model.train()
    if accumulation is None or accumulation.done == 0:
        optimizer.zero_grad(set_to_none=True)
    positions = None if train.loss_positions == "exact" else reference_positions(batch.input_ids, batch.prompt_len,
                                                                                 tokenizer.pad_token_id)
    scored = batch.response_mask if positions is None else positions
    n_tokens = weighted_tokens(scored, ranks)
    # The step's loss enters the update's gradient times `scale`: a micro-step's token means are
    # averaged over the window's micro-steps; a window token mean divides by its tokens at the update.
    scale = 1.0 if accumulation is None else (
        1.0 / accumulation.steps if train.loss_averaging == "rank_token_mean" else max(n_tokens, 1.0))
    plain = train.loss_averaging == "batch_token_mean" and all(r.copies == 1 for r in ranks)
    # The step's loss: sum over rows of weight x entropy sum (uniform weights: a token count divides).
    weights = None if plain else row_weights(scored, ranks, train.loss_averaging)
    share = bool(train.share_prompt_pass)
    with compiled_layers(model, train.compile_loss):
        if plain:  # uniform weights: the batch's masked mean, as a sum over a token count
            count = scored.sum().clamp(min=1)
            total = accumulate_entropy_gradients(model, batch, train, count if accumulation is None else
                                                 torch.ones((), device=count.device), positions=positions)
            loss = float(total) / float(count)
        else:
            total = accumulate_entropy_gradients(model, batch, train, torch.ones((), device=batch.input_ids.device),
                                                 positions=positions, row_weights=weights * scale)
            loss = float(total) / scale
    t2 = time.perf_counter()
    entropy = loss
    if math.isfinite(loss) and train.sample_temperature != train.loss_temperature:  # before the update, as the loss
        with torch.no_grad():
            entropy = sum(float(micro_batch_entropy_sum(model, batch, slice(s, s + train.micro_batch_size),
                                                        train.sample_temperature, train.loss_chunk_tokens, share,
                                                        positions, weights)[1])
                          for s in range(0, batch.input_ids.shape[0], train.micro_batch_size))
            entropy = entropy / float(scored.sum().clamp(min=1)) if plain else entropy
    updated, grad_norm = True, 0.0
    if accumulation is not None:
        accumulation.done += 1
        accumulation.tokens += n_tokens
        updated = accumulation.done == accumulation.steps
        if not math.isfinite(loss):
            optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLoss(f"step {step}: loss={loss}")
        if updated and train.loss_averaging == "batch_token_mean":
            for p in model.parameters():
                if p.grad is not None:
                    p.grad.div_(max(accumulation.tokens, 1.0))
        if updated:
            accumulation.done, accumulation.tokens = 0, 0.0
    t_update = time.perf_counter()  # the entropy pass above is in neither timing
    if updated:
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip))
        apply_update(optimizer, loss, grad_norm, step, lr)
        if batch.input_ids.is_cuda:  # the update runs asynchronously: let seconds_optim measure it
            torch.cuda.synchronize(batch.input_ids.device)
    t3 = time.perf_counter()
    return StepMetrics(step=step, loss=loss, entropy=entropy,
                       response_length=float(batch.response_lengths.float().mean()),
                       eos_rate=float(batch.hit_eos.float().mean()), grad_norm=grad_norm, lr=lr,
                       seconds_sample=t1 - t0, seconds_loss=t2 - t1, seconds_optim=t3 - t_update,
                       updated=updated, responses=len(texts))


def train_em(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_texts: list[str], train: TrainConfig,
             seed: int, on_step: Callable[[StepMetrics], None],
             on_eval: Callable[[int], None] | None = None, start_step: int = 0) -> None:
    """The EM loop: ``train.steps`` steps, numbered from ``start_step + 1`` (a stage after another
    continues the run's count); ``on_eval(step)`` after each (it decides whether that step is
    evaluated), ``on_step`` with each step's metrics. A step is one update of ``train.batch_size``
    responses, or with ``train.step_unit=micro_step`` one micro-step of the reference's loop
    (``rank_batch_size`` responses per rank; an update every :func:`accumulation_steps`). The
    responses answer ``prompt_texts`` (one prompt: all of them; several: see
    :func:`em_sweep.prompts.batch_prompts`)."""
    optimizer, lr_at = make_optimizer(model, train)
    window = accumulation_steps(train)
    accumulation = Accumulation(window) if train.step_unit == "micro_step" else None
    per_step = train.batch_size // window
    for i in range(train.steps):
        texts = batch_prompts(prompt_texts, per_step, step=i)
        metrics = em_step(model, tokenizer, optimizer, texts, train, start_step + i + 1, lr_at(i // window),
                          seed=seed * 1_000_003 + start_step + i,  # a later stage draws new samples
                          accumulation=accumulation)
        on_step(metrics)
        if on_eval is not None:
            on_eval(start_step + i + 1)
    # An incomplete last window is not applied (as the reference's loop ends); free its gradients.
    optimizer.zero_grad(set_to_none=True)
