"""The label-free post-training family beside token-level EM: rewards, advantages and EM-INF.

Every objective shares em-sweep's sampling, optimizer, recording and evaluation; they differ only
in what a response is worth (the reward of the RL stage, ``rl.reward``), how rewards become
advantages (``rl.advantage``) or, for EM-INF, in how evaluation decodes (``eval.em_inf``).

Rewards of one response ``y`` with generated-token positions ``t = 1..|y|`` (``p_t`` the policy's
distribution at the rollout temperature, as verl computes it: ``softmax(logits / T)``):

- ``gold``           1 if the extracted final answer is equivalent to the gold answer, else 0 (RLVR);
- ``neg_entropy``    ``-(1/|y|) sum_t H(p_t)`` (EM-RL, token-level: Agarwal et al., `chotkrin/EM_PT`
  reward manager ``emrl_token``: minus the mean of the rollout's token entropies);
- ``mean_logprob``   ``(1/|y|) sum_t log p_t(y_t)`` (EM-RL, sequence-level: ``emrl_sequence``, the
  mean of the rollout's old log-probabilities);
- ``self_certainty`` ``(1/|y|) sum_t KL(U || p_t)`` with ``KL(U || p) = -log V - (1/V) sum_v log p[v]``
  (Intuitor, Zhao et al.: ``logsumexp(z) - mean(z)`` per token; the constant ``log V`` they drop
  is kept here so the reward is the KL itself; advantages are unchanged by it);
- ``majority_vote``  1 if the response's extracted answer is the group's most common extracted
  answer, else 0 (TTRL, Zuo et al.; no gold used). See :func:`majority_labels` for ties and
  unextractable answers.

Advantages over groups of ``g`` responses to one prompt: ``grpo`` (the reward minus its group's
mean over the group's std + eps; :func:`em_sweep.training.rl.group_advantages`) or ``rloo``
(:func:`rloo_advantages`: the reward minus the mean of the *other* ``g - 1`` rewards, verl's
``compute_rloo_outcome_advantage`` used by EM-RL).

EM-INF (:func:`em_inf_logits`): at each decoding position, a few Adam steps on that position's
logits lower their entropy (with a KL term to the original distribution) before the usual
temperature / top-p sampling; the weights never change.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from em_sweep.config import KNOWN_ADVANTAGES, KNOWN_REWARDS, Config, EvalConfig
from em_sweep.training.loss import EPS

REWARDS = KNOWN_REWARDS
# Rewards computed from the policy's own distribution at the sampled tokens (no answers needed).
MODEL_REWARDS = ("self_certainty", "neg_entropy", "mean_logprob")
# GRPO's advantage is (reward - group mean) / (group std + ADV_EPS).
ADV_EPS = 1e-6
ADVANTAGES = KNOWN_ADVANTAGES


# -- advantages ------------------------------------------------------------------------------

def rloo_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """REINFORCE leave-one-out advantages for rewards [N] in consecutive groups of ``group_size``:
    ``r_i - mean_{j != i} r_j`` (= ``g / (g - 1) * (r_i - mean(group))``). An all-equal group gets 0."""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size} (group_size >= 2)")
    r = rewards.float().view(-1, group_size)
    return ((r - r.mean(dim=1, keepdim=True)) * (group_size / (group_size - 1))).view(-1)


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = ADV_EPS) -> torch.Tensor:
    """GRPO advantages for rewards [N] laid out as consecutive groups of ``group_size``: each
    reward minus its group's mean, over the group's (unbiased) standard deviation plus ``eps``.
    A group whose rewards are all equal gets advantage 0 (never NaN)."""
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size} (group_size >= 2)")
    r = rewards.float().view(-1, group_size)
    centred = r - r.mean(dim=1, keepdim=True)
    return (centred / (r.std(dim=1, keepdim=True) + eps)).view(-1)


def advantages(rewards: torch.Tensor, group_size: int, kind: str) -> torch.Tensor:
    """``kind`` (one of ADVANTAGES) advantages of grouped rewards."""
    if kind == "grpo":
        return group_advantages(rewards, group_size)
    if kind == "rloo":
        return rloo_advantages(rewards, group_size)
    raise ValueError(f"unknown advantage {kind!r}; choose from {ADVANTAGES}")


# -- rewards from the model's own distribution -----------------------------------------------

def token_statistics(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> dict[str, torch.Tensor]:
    """Per-position statistics of ``softmax(logits / T)`` for logits [n, V] and sampled tokens [n]:
    ``entropy`` H(p), ``logprob`` log p[target], ``self_certainty`` KL(U || p); fp32, no gradient."""
    with torch.no_grad():
        logp = torch.log_softmax(logits.float() / temperature, dim=-1)
        p = logp.exp()
        v = logits.shape[-1]
        return {
            "entropy": -(p * torch.log(p + EPS)).sum(-1),
            "logprob": logp.gather(-1, targets[:, None]).squeeze(-1),
            "self_certainty": -logp.mean(-1) - math.log(v),
        }


def row_means(values: torch.Tensor, row_of: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Mean of ``values`` [n] per row (``row_of`` [n] the row of each); a row without values gets 0."""
    sums = torch.zeros(n_rows, dtype=torch.float32, device=values.device).index_add_(0, row_of, values.float())
    counts = torch.zeros(n_rows, dtype=torch.float32, device=values.device).index_add_(
        0, row_of, torch.ones_like(values, dtype=torch.float32))
    return sums / counts.clamp(min=1.0)


def model_reward(kind: str, stats: dict[str, torch.Tensor], row_of: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Per-response reward [n_rows] of a MODEL_REWARDS ``kind`` from :func:`token_statistics`."""
    if kind == "neg_entropy":
        return -row_means(stats["entropy"], row_of, n_rows)
    if kind == "mean_logprob":
        return row_means(stats["logprob"], row_of, n_rows)
    if kind == "self_certainty":
        return row_means(stats["self_certainty"], row_of, n_rows)
    raise ValueError(f"{kind!r} is not a reward computed from the model; choose from {MODEL_REWARDS}")


# -- majority vote (TTRL) --------------------------------------------------------------------

_SPACES = re.compile(r"\s+")


def normalize_answer(answer: str | None) -> str | None:
    """The form in which extracted answers vote: whitespace removed, surrounding ``$`` and a
    trailing period dropped; None (or nothing left) = unextractable."""
    if answer is None:
        return None
    a = _SPACES.sub("", answer).strip("$").rstrip(".")
    return a or None


def majority_labels(answers: Sequence[str | None], group_size: int) -> list[str | None]:
    """The pseudo-label of each group of ``group_size`` consecutive answers: its most common
    normalised answer. Unextractable answers (None) do not vote; a group without any extracted
    answer has no label (None). A tie goes to the tied answer that appears first in the group
    (``Counter.most_common``'s order, as TTRL's vote)."""
    if group_size < 1 or len(answers) % group_size:
        raise ValueError(f"{len(answers)} answers do not form groups of {group_size}")
    labels: list[str | None] = []
    for k in range(0, len(answers), group_size):
        votes = [a for a in (normalize_answer(x) for x in answers[k:k + group_size]) if a is not None]
        labels.append(Counter(votes).most_common(1)[0][0] if votes else None)
    return labels


def majority_vote_rewards(answers: Sequence[str | None], group_size: int) -> list[float]:
    """1.0 where a response's normalised answer equals its group's majority label, else 0.0
    (an unextractable answer, or a group without a label, earns 0)."""
    labels = majority_labels(answers, group_size)
    out = []
    for i, a in enumerate(answers):
        label = labels[i // group_size]
        out.append(1.0 if label is not None and normalize_answer(a) == label else 0.0)
    return out


def majority_share(answers: Sequence[str | None]) -> float:
    """Share of ``answers`` (unextractable ones included in the count) that give the majority
    answer; 0 when none is extractable. The agreement signal and the vote's confidence."""
    label = majority_labels(list(answers), len(answers))[0] if answers else None
    if label is None:
        return 0.0
    return sum(normalize_answer(a) == label for a in answers) / len(answers)


# -- EM-INF ----------------------------------------------------------------------------------

def em_inf_logits(logits: torch.Tensor, steps: int, lr: float, kl_weight: float, threshold: float,
                  betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> torch.Tensor:
    """EM-INF's adjusted logits for each row of ``logits`` [B, V] (one decoding position each).

    Each row takes up to ``steps`` Adam steps (learning rate ``lr``, torch's Adam defaults) on
    ``H(softmax(z)) + kl_weight * KL(p0 || softmax(z))``, ``p0`` the row's original distribution,
    and stops (for good) at the first step where its entropy is below ``threshold``: the loop of
    the reference's ``ent_sample`` (`chotkrin/EM_PT` eval/utils/em_inf_utils.py), per row. fp32;
    no gradient reaches anything but this copy of the logits.
    """
    z = logits.detach().float().clone()
    if steps <= 0:
        return z
    p0 = torch.softmax(z, dim=-1)
    log_p0 = torch.log_softmax(z, dim=-1)
    m = torch.zeros_like(z)
    v = torch.zeros_like(z)
    active = torch.ones(z.shape[0], dtype=torch.bool, device=z.device)
    b1, b2 = betas
    for t in range(1, steps + 1):
        with torch.enable_grad():
            zg = z.clone().requires_grad_(True)
            p = torch.softmax(zg, dim=-1)
            h = -(p * torch.log(p + 1e-12)).sum(-1)
            active = active & (h.detach() >= threshold)
            if not bool(active.any()):
                break
            kl = (p0 * (log_p0 - torch.log(p))).sum(-1)
            loss = ((h + kl_weight * kl) * active.float()).sum()
            (grad,) = torch.autograd.grad(loss, zg)
        a = active[:, None]
        m = torch.where(a, b1 * m + (1 - b1) * grad, m)
        v = torch.where(a, b2 * v + (1 - b2) * grad * grad, v)
        step = lr * (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
        z = torch.where(a, z - step, z)
    return z


class EMInfProcessor:
    """An HF logits processor applying :func:`em_inf_logits` to each decoding step's scores
    (merged before the temperature / top-p warpers, as the reference applies its processors
    after the adjustment)."""

    def __init__(self, steps: int, lr: float, kl_weight: float, threshold: float):
        self.steps, self.lr, self.kl_weight, self.threshold = steps, lr, kl_weight, threshold

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        return em_inf_logits(scores, self.steps, self.lr, self.kl_weight, self.threshold).to(scores.dtype)


def em_inf_processor(eval_cfg: EvalConfig) -> EMInfProcessor | None:
    """The processor ``eval.em_inf`` asks for, or None when it is off."""
    e = eval_cfg.em_inf
    if not e.enabled:
        return None
    return EMInfProcessor(int(e.steps), float(e.lr), float(e.kl_weight), float(e.threshold))


# -- naming ----------------------------------------------------------------------------------

_SCHEMA = Config()  # the schema's defaults


def objective_name(config: Config | Mapping[str, Any]) -> str:
    """A short name for what a run trains and how it decodes, from its (resolved) config:
    each stage (``em``, ``rl:<reward>[/rloo]`` ...) joined by ``+``, with ``+em_inf`` when
    evaluation decodes with EM-INF; ``none`` for a run without training steps."""
    def lookup(obj: Any, path: str) -> Any:
        for key in path.split("."):
            obj = obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)
            if obj is None:
                return None
        return obj

    def get(path: str) -> Any:  # a recorded config that lacks a key had the schema's default
        value = lookup(config, path)
        return lookup(_SCHEMA, path) if value is None else value

    parts = []
    for stage in list(get("stages")):
        if not get("train.steps" if stage == "em" else "rl.steps"):
            continue
        if stage == "rl":
            name = f"rl:{get('rl.reward')}"
            if get("rl.advantage") != "grpo":
                name += f"/{get('rl.advantage')}"
            parts.append(name)
        else:
            parts.append(stage)
    if get("eval.em_inf.enabled"):
        parts.append("em_inf")
    return "+".join(parts) or "none"
