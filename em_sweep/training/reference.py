"""The reference implementation's training semantics, as pure functions em.py can switch on.

The paper's numbers come from ``train.py`` of the reference repository (zitian-gao/one-shot-em),
whose semantics differ from em-sweep's defaults (docs/reproducing.md has the full table):

- a loop step is one micro-batch of 2 prompts per rank; gradients accumulate over
  ``64 // (2 * world_size)`` steps, and the weights change only at those boundaries;
- every rank is seeded alike, so ranks given the same prompt draw the same responses;
- the loss is a token mean per rank micro-batch, averaged over ranks and accumulation steps
  (DeepSpeed averages ranks, accelerate divides each micro-step's loss by the accumulation count);
- the scored positions are ``gen_mask = (token_idx >= prompt_len) & (seq != pad)``.

``train.step_unit``, ``train.data_parallel_ranks``, ``train.rank_batch_size``,
``train.rank_sampling``, ``train.loss_averaging`` and ``train.loss_positions`` select them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RankBatch:
    """One rank's micro-batch among a step's distinct sampled rows: ``rows`` of the step's batch,
    standing for ``copies`` ranks (>1 only when identically seeded ranks drew the same responses)."""

    rows: slice
    copies: int


def rank_batches(texts: Sequence[str], rank_batch_size: int, ranks: int, identical: bool
                 ) -> tuple[list[str], list[RankBatch]]:
    """Split a step's prompt texts into rank micro-batches of ``rank_batch_size`` (micro-step
    major, rank minor: ``ranks`` consecutive micro-batches form one micro-step) and return the
    texts to sample (each distinct micro-batch once) with the micro-batches they stand for.

    ``identical``: ranks of one micro-step whose prompts are the same share one sample (the
    reference seeds every rank with the same seed, so they draw the same responses).
    """
    chunks = [tuple(texts[i:i + rank_batch_size]) for i in range(0, len(texts), rank_batch_size)]
    distinct: list[str] = []
    batches: list[RankBatch] = []
    for start in range(0, len(chunks), ranks):
        step: list[list] = []  # [rows, copies] of this micro-step's distinct micro-batches
        seen: dict[tuple[str, ...], int] = {}
        for chunk in chunks[start:start + ranks]:
            if identical and chunk in seen:
                step[seen[chunk]][1] += 1
                continue
            seen[chunk] = len(step)
            step.append([slice(len(distinct), len(distinct) + len(chunk)), 1])
            distinct.extend(chunk)
        batches.extend(RankBatch(rows, copies) for rows, copies in step)
    return distinct, batches


def reference_positions(input_ids: torch.Tensor, prompt_width: int, pad_id: int) -> torch.Tensor:
    """train.py's ``gen_mask`` over ``[left-padded prompt | response | padding]`` rows: position
    t counts when t >= the row's count of non-pad prompt tokens and token t is not the pad token.

    Each counted position's logits predict token t+1, so this scores the positions of the
    generated tokens themselves: it leaves out the position that produced the first generated
    token, leaves out EOS where the pad token is the EOS token, keeps the position after the last
    token of a truncated response, and (for ragged prompts under left padding) counts prompt
    positions of the shorter prompts.
    """
    not_pad = input_ids.ne(pad_id)
    prompt_len = not_pad[:, :prompt_width].sum(-1)
    cols = torch.arange(input_ids.shape[1], device=input_ids.device)
    return (cols[None, :] >= prompt_len[:, None]) & not_pad


def row_weights(positions: torch.Tensor, batches: Sequence[RankBatch], averaging: str) -> torch.Tensor:
    """Per-row weights [B] that make ``sum_rows weight * (row's entropy sum)`` the step's loss:

    - ``batch_token_mean``: one token mean over all rows, each rank micro-batch counted
      ``copies`` times;
    - ``rank_token_mean``: each rank micro-batch's token mean (its token count clamped to >= 1,
      as train.py's ``gen_mask.sum().clamp_min(1)``), averaged over the rank micro-batches.
    """
    counts = _row_counts(positions)
    weights = torch.zeros_like(counts)
    if averaging == "batch_token_mean":
        total = weighted_tokens(positions, batches, counts)
        for b in batches:
            weights[b.rows] = b.copies / max(total, 1.0)
    elif averaging == "rank_token_mean":
        n_batches = sum(b.copies for b in batches)
        for b in batches:
            weights[b.rows] = b.copies / (max(float(counts[b.rows].sum()), 1.0) * n_batches)
    else:
        raise ValueError(f"unknown loss averaging {averaging!r}")
    return weights.to(positions.device)


def weighted_tokens(positions: torch.Tensor, batches: Sequence[RankBatch], counts: torch.Tensor | None = None) -> float:
    """Scored tokens of the step, each rank micro-batch counted ``copies`` times."""
    counts = _row_counts(positions) if counts is None else counts
    return sum(b.copies * float(counts[b.rows].sum()) for b in batches)


def _row_counts(positions: torch.Tensor) -> torch.Tensor:
    """Scored positions per row, on the CPU (one device sync for all the per-batch sums)."""
    return positions.sum(-1).float().cpu()
