"""RL with verifiable rewards (GRPO) as a pipeline stage, to compare and compose with EM.

One RL step: each prompt of the step is sampled ``rl.group_size`` times (the same sampling code
as EM, :func:`em_sweep.generation.sample.sample_responses`), every response is rewarded 1 when its final
answer (:func:`em_sweep.evaluation.grading.extract_answer`) is equivalent to the prompt's gold answer
(:func:`em_sweep.evaluation.grading.grade_many`, math-verify in killable workers) and 0 otherwise, rewards
become group-normalised advantages, and one AdamW update (the same optimizer set-up and update
as EM, :mod:`em_sweep.training.em`) minimises the clipped-ratio GRPO loss

    A_i     = (r_i - mean(r_group)) / (std(r_group) + eps)      (all-equal group: A = 0)
    rho_t   = exp(logp_t - logp_old_t)
    L_t     = -min(rho_t A, clip(rho_t, 1 - c, 1 + c) A) + beta * KL_t - alpha * H_t
    KL_t    = exp(ref_t - logp_t) - (ref_t - logp_t) - 1         (k3 estimator, >= 0)
    H_t     = entropy of the policy at t (the entropy bonus, alpha = rl.entropy_coef; verl's
              entropy_coeff, whose loss subtracts alpha times the token-mean entropy)
    loss    = sum over response tokens of L_t / number of response tokens in the batch

(token-level mean over the batch, as DAPO/verl's "token-mean"; log-probabilities at the rollout
temperature). ``rl.updates_per_batch`` (GRPO's mu) updates reuse each batch: the first is
on-policy (rho = 1, the clip inert), later ones see rho against the sampling policy's
log-probabilities and the clip bounds them. Metrics average over the updates. ``beta = rl.kl_coef``; 0 means no reference model is
kept; otherwise the reference is a frozen copy of the model as the RL stage begins.
``rl.reward`` chooses the reward (gold answers, or a label-free one: majority vote, self-certainty,
EM-RL's negative mean token entropy or mean log-probability; :mod:`em_sweep.training.objectives`) and
``rl.advantage`` GRPO's group normalisation or RLOO's leave-one-out baseline.
A step whose advantages are all zero and whose KL and entropy terms are off has no gradient: it is recorded
(``skipped``) and the weights are not touched (an AdamW step on a zero gradient would still
apply weight decay). With the KL term on such a step is taken (its gradient is the KL's).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from em_sweep.evaluation.grading import DEFAULT_TIMEOUT_S, extract_answer, grade_many
from em_sweep.generation.sample import SampleBatch, SamplingSettings, sample_responses
from em_sweep.training import objectives
from em_sweep.training.em import apply_update, compiled_layers, make_optimizer, response_outputs
from em_sweep.training.loss import token_entropies_from_hidden, token_logprobs_from_hidden

if TYPE_CHECKING:  # annotations only
    from em_sweep.config import RLConfig

# -- the loss, as pure functions --------------------------------------------------------------

def grpo_token_losses(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, clip_ratio: float,
                      kl_coef: float = 0.0, ref_logp: torch.Tensor | None = None,
                      entropy_coef: float = 0.0, entropy: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token GRPO loss for tokens with log-probabilities ``logp`` (current policy, with
    gradient), ``old_logp`` (the policy that sampled them), per-token ``advantages``, an
    optional reference ``ref_logp`` and an optional entropy bonus (``entropy``: the policy's
    entropy at each token's position, with gradient; ``entropy_coef * entropy`` is subtracted).
    Returns (loss, kl, clipped), each shaped like ``logp``; ``clipped`` marks tokens whose ratio
    the clip took out of the gradient."""
    ratio = torch.exp(logp - old_logp)
    unclipped = ratio * advantages
    clipped_obj = ratio.clamp(1.0 - clip_ratio, 1.0 + clip_ratio) * advantages
    loss = -torch.minimum(unclipped, clipped_obj)
    if kl_coef and ref_logp is not None:
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1.0
        loss = loss + kl_coef * kl
    else:
        kl = torch.zeros_like(logp)
    if entropy_coef and entropy is not None:
        loss = loss - entropy_coef * entropy
    return loss, kl.detach(), (clipped_obj < unclipped).detach()


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              clip_ratio: float, kl_coef: float = 0.0, ref_logp: torch.Tensor | None = None,
              entropy_coef: float = 0.0, entropy: torch.Tensor | None = None) -> torch.Tensor:
    """Masked token-mean of :func:`grpo_token_losses` over [B, T] inputs (``advantages`` [B] or
    [B, T]); an all-zero mask gives 0."""
    if advantages.dim() == 1:
        advantages = advantages[:, None].expand_as(logp)
    loss, _, _ = grpo_token_losses(logp, old_logp, advantages, clip_ratio, kl_coef, ref_logp, entropy_coef, entropy)
    m = mask.to(loss.dtype)
    return (loss * m).sum() / m.sum().clamp(min=1.0)


# -- rewards -------------------------------------------------------------------------------

def math_rewards(texts: Sequence[str], golds: Sequence[str], timeout_s: float) -> tuple[list[float], int]:
    """1.0 where a response's extracted final answer is equivalent to its gold answer, else 0.0
    (no answer, wrong, grader timeout or error); also the number of grader failures."""
    predictions = [extract_answer(t) for t in texts]
    grades = grade_many(predictions, [[g] for g in golds], timeout_s=timeout_s)
    failures = sum(1 for g in grades if g.status in ("timeout", "error"))
    return [1.0 if g.correct else 0.0 for g in grades], failures


# -- one step ------------------------------------------------------------------------------

@dataclass
class RLStepMetrics:
    step: int  # the run's global step (stages continue the count)
    reward: float  # mean reward of the step's samples, before the update
    reward_std: float
    zero_advantage_groups: float  # share of groups whose rewards were all equal
    loss: float
    kl: float  # mean k3 KL to the reference over response tokens (0 when kl_coef = 0)
    clip_fraction: float
    response_length: float
    grad_norm: float
    lr: float
    skipped: bool  # no gradient (all advantages 0, no KL): weights untouched
    grader_failures: int
    agreement: float  # mean over groups of the majority answer's share (label-free; objectives.majority_share)
    token_entropy: float | None  # mean token entropy of the responses at the rollout temperature, where computed
    seconds_sample: float
    seconds_grade: float
    seconds_loss: float
    seconds_optim: float


def rl_sampling_settings(rl: RLConfig, generation_backend: str) -> SamplingSettings:
    return SamplingSettings(temperature=rl.temperature, top_p=rl.top_p, top_k=rl.top_k,
                            repetition_penalty=rl.repetition_penalty, max_new_tokens=rl.max_new_tokens,
                            backend=generation_backend)


def response_logprobs(model: PreTrainedModel, batch: SampleBatch, rows: slice, temperature: float,
                      chunk_tokens: int, share_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities at ``temperature`` of the generated tokens of ``rows``: (values [n]
    in row-major order of the response mask, the row index of each). ``share_prompt``: rows of one
    prompt (a GRPO group) run it once (em.response_outputs)."""
    logp, row_of, _ = _policy_at_generated_tokens(model, batch, rows, temperature, chunk_tokens, share_prompt,
                                                  entropy=False)
    return logp, row_of


def response_logprobs_and_entropy(model: PreTrainedModel, batch: SampleBatch, rows: slice, temperature: float,
                                  chunk_tokens: int, share_prompt: bool = False
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`response_logprobs` and, from the same forward, the policy's entropy at each of those
    positions (with gradient, for the entropy bonus): (logp [n], row index [n], entropy [n])."""
    logp, row_of, entropy = _policy_at_generated_tokens(model, batch, rows, temperature, chunk_tokens, share_prompt,
                                                        entropy=True)
    assert entropy is not None
    return logp, row_of, entropy


def _policy_at_generated_tokens(model: PreTrainedModel, batch: SampleBatch, rows: slice, temperature: float,
                                chunk_tokens: int, share_prompt: bool, entropy: bool
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """One forward of ``rows``: the generated tokens' log-probabilities, their row indices and (with
    ``entropy``) the policy's entropy at those positions."""
    first = batch.prompt_len - 1
    mask = batch.response_mask[rows, first:-1].bool()  # position t predicts token t + 1
    ids = batch.input_ids[rows]
    targets = ids[:, first + 1:][mask]
    row_of = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(mask)[mask]
    outputs, from_hidden = response_outputs(model, batch, rows, share_prompt)
    if from_hidden:
        head = model.get_output_embeddings()
        logp = token_logprobs_from_hidden(outputs, head.weight, targets, temperature, chunk_tokens, head.bias)
        h = token_entropies_from_hidden(outputs, head.weight, temperature, chunk_tokens, head.bias) if entropy else None
        return logp, row_of, h
    log_probs = torch.log_softmax(outputs.float() / temperature, dim=-1)
    logp = log_probs.gather(1, targets[:, None]).squeeze(1)
    return logp, row_of, -(log_probs.exp() * log_probs).sum(-1) if entropy else None


@torch.no_grad()
def response_token_statistics(model: PreTrainedModel, batch: SampleBatch, rows: slice, temperature: float,
                              chunk_tokens: int, share_prompt: bool = False
                              ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """:func:`em_sweep.training.objectives.token_statistics` at the generated-token positions of ``rows``
    (no gradient; chunked over positions like the loss), and the row index of each position."""
    first = batch.prompt_len - 1
    mask = batch.response_mask[rows, first:-1].bool()
    ids = batch.input_ids[rows]
    targets = ids[:, first + 1:][mask]
    row_of = torch.arange(ids.shape[0], device=ids.device)[:, None].expand_as(mask)[mask]
    outputs, from_hidden = response_outputs(model, batch, rows, share_prompt)
    n = outputs.shape[0]
    step = max(n, 1) if chunk_tokens <= 0 else chunk_tokens
    parts = []
    for s in range(0, n, step):
        chunk = outputs[s:s + step]
        if from_hidden:
            head = model.get_output_embeddings()
            chunk = torch.nn.functional.linear(chunk, head.weight, head.bias)
        parts.append(objectives.token_statistics(chunk, targets[s:s + step], temperature))
    if not parts:
        empty = torch.zeros(0, device=ids.device)
        return {"entropy": empty, "logprob": empty, "self_certainty": empty}, row_of
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, row_of


def step_rewards(model: PreTrainedModel, batch: SampleBatch, golds: list[str], rl: RLConfig, timeout_s: float
                 ) -> tuple[list[float], int, float | None]:
    """The rewards ``rl.reward`` gives the batch's responses (objectives.REWARDS), the number of
    grader failures, and the responses' mean token entropy where it was computed on the way."""
    kind = rl.reward
    if kind == "gold":
        rewards, failures = math_rewards(batch.texts, golds, timeout_s)
        return rewards, failures, None
    if kind == "majority_vote":
        answers = [extract_answer(t) for t in batch.texts]
        return objectives.majority_vote_rewards(answers, rl.group_size), 0, None
    share = bool(rl.share_prompt_pass)
    n_rows = batch.input_ids.shape[0]
    values, ent_sum, ent_n = [], 0.0, 0
    for s in range(0, n_rows, rl.micro_batch_size):
        rows = slice(s, s + rl.micro_batch_size)
        stats, row_of = response_token_statistics(model, batch, rows, rl.temperature, rl.loss_chunk_tokens, share)
        values.append(objectives.model_reward(kind, stats, row_of, min(rl.micro_batch_size, n_rows - s)))
        ent_sum += float(stats["entropy"].sum())
        ent_n += int(stats["entropy"].numel())
    return torch.cat(values).tolist(), 0, ent_sum / max(ent_n, 1)


def rl_step(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, optimizer: torch.optim.Optimizer,
            prompt_texts: list[str], golds: list[str], rl: RLConfig, step: int, lr: float, seed: int,
            reference: PreTrainedModel | None = None, generation_backend: str = "auto",
            grade_timeout_s: float = DEFAULT_TIMEOUT_S) -> RLStepMetrics:
    """One GRPO update from ``len(prompt_texts) * rl.group_size`` fresh samples."""
    g = rl.group_size
    texts = [t for t in prompt_texts for _ in range(g)]
    gold_per_sample = [a for a in golds for _ in range(g)]
    t0 = time.perf_counter()
    batch = sample_responses(model, tokenizer, texts, rl_sampling_settings(rl, generation_backend),
                             batch_size=rl.sample_batch_size, seed=seed)
    t1 = time.perf_counter()
    reward_list, failures, token_entropy = step_rewards(model, batch, gold_per_sample, rl, grade_timeout_s)
    answers = [extract_answer(t) for t in batch.texts]
    agreement = sum(objectives.majority_share(answers[k:k + g]) for k in range(0, len(answers), g)) / (len(answers) // g)
    device = batch.input_ids.device
    rewards = torch.tensor(reward_list, dtype=torch.float32, device=device)
    adv = objectives.advantages(rewards, g, rl.advantage)
    zero_groups = float((rewards.view(-1, g).std(dim=1) == 0).float().mean())
    t2 = time.perf_counter()
    first = batch.prompt_len - 1
    n_tokens = batch.response_mask[:, first:-1].sum().clamp(min=1).float()
    entropy_coef = float(rl.entropy_coef)
    skipped = bool((adv == 0).all()) and not rl.kl_coef and not entropy_coef
    slices = [slice(s, s + rl.micro_batch_size) for s in range(0, batch.input_ids.shape[0], rl.micro_batch_size)]
    mu = int(rl.updates_per_batch)
    share = bool(rl.share_prompt_pass)
    loss_sum = kl_sum = clip_sum = ent_sum = 0.0
    grad_norm = 0.0
    seconds_loss = seconds_optim = 0.0
    if not skipped:
        model.train()
        with compiled_layers(model, rl.compile_loss):
            old: list[torch.Tensor] | None = None
            if mu > 1:  # the sampling policy's log-probabilities, for the later updates' ratios
                with torch.no_grad():
                    old = [response_logprobs(model, batch, rows, rl.temperature, rl.loss_chunk_tokens, share)[0] for rows in slices]
            for _update in range(mu):
                ta = time.perf_counter()
                optimizer.zero_grad(set_to_none=True)
                update_loss = 0.0
                for j, rows in enumerate(slices):
                    entropy = None
                    if entropy_coef:
                        logp, row_of, entropy = response_logprobs_and_entropy(model, batch, rows, rl.temperature,
                                                                              rl.loss_chunk_tokens, share)
                    else:
                        logp, row_of = response_logprobs(model, batch, rows, rl.temperature, rl.loss_chunk_tokens,
                                                         share)
                    ref_logp = None
                    if reference is not None and rl.kl_coef:
                        with torch.no_grad():
                            ref_logp, _ = response_logprobs(reference, batch, rows, rl.temperature, rl.loss_chunk_tokens,
                                                           share)
                    old_logp = logp.detach() if old is None else old[j]  # first update: on-policy, ratio 1
                    losses, kl, clipped = grpo_token_losses(logp, old_logp, adv[rows][row_of], rl.clip_ratio,
                                                            rl.kl_coef, ref_logp, entropy_coef, entropy)
                    if entropy is not None and _update == 0 and token_entropy is None:
                        ent_sum += float(entropy.detach().sum())
                    (losses.sum() / n_tokens).backward()
                    total = float(losses.detach().sum())  # one device sync for both sums
                    update_loss += total / float(n_tokens)
                    loss_sum += total / mu
                    kl_sum += float(kl.sum()) / mu
                    clip_sum += float(clipped.float().sum()) / mu
                norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), rl.grad_clip))
                grad_norm = grad_norm or norm  # the first update's: the gradient of the fresh batch
                tb = time.perf_counter()
                apply_update(optimizer, update_loss, norm, step, lr)
                seconds_loss += tb - ta
                seconds_optim += time.perf_counter() - tb
        model.eval()
    n = float(n_tokens)
    if token_entropy is None and entropy_coef and not skipped:
        token_entropy = ent_sum / n
    return RLStepMetrics(step=step, reward=float(rewards.mean()), reward_std=float(rewards.std()) if len(rewards) > 1 else 0.0,
                         zero_advantage_groups=zero_groups, loss=loss_sum / n, kl=kl_sum / n,
                         clip_fraction=clip_sum / n, response_length=float(batch.response_lengths.float().mean()),
                         grad_norm=grad_norm, lr=lr, skipped=skipped, grader_failures=failures,
                         agreement=agreement, token_entropy=token_entropy,
                         seconds_sample=t1 - t0, seconds_grade=t2 - t1, seconds_loss=seconds_loss,
                         seconds_optim=seconds_optim)


def step_prompts(prompt_texts: Sequence[str], golds: Sequence[str], rl: RLConfig, step: int) -> tuple[list[str], list[str]]:
    """The ``rl.batch_size // rl.group_size`` prompts of a step, cycling through the prompt set
    (one prompt: the same every step, as in one-shot RLVR)."""
    k = rl.batch_size // rl.group_size
    idx = [(step * k + i) % len(prompt_texts) for i in range(k)]
    return [prompt_texts[i] for i in idx], [golds[i] for i in idx]


def train_rl(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompt_texts: list[str], golds: list[str],
             rl: RLConfig, seed: int, on_step: Callable[[RLStepMetrics], None],
             on_eval: Callable[[int], None] | None = None, start_step: int = 0,
             generation_backend: str = "auto", grade_timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """The RL stage: ``rl.steps`` GRPO updates numbered from ``start_step + 1``; ``on_eval``
    after each (it decides whether that step is evaluated)."""
    optimizer, lr_at = make_optimizer(model, rl)
    reference = None
    if rl.kl_coef:
        reference = copy.deepcopy(model).eval()
        for p in reference.parameters():
            p.requires_grad_(False)
    for i in range(rl.steps):
        texts, answers = step_prompts(prompt_texts, golds, rl, i)
        metrics = rl_step(model, tokenizer, optimizer, texts, answers, rl, start_step + i + 1, lr_at(i),
                          seed=seed * 1_000_033 + 7919 * (start_step + i), reference=reference,
                          generation_backend=generation_backend, grade_timeout_s=grade_timeout_s)
        on_step(metrics)
        if on_eval is not None:
            on_eval(start_step + i + 1)
    del reference
