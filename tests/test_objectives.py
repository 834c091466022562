"""The label-free family (em_sweep/training/objectives.py): rewards and advantages against direct
implementations on hand-made numbers, EM-INF against the reference's loop, objectives in runs."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from em_sweep import config as config_module
from em_sweep.config import ConfigError, validate
from em_sweep.generation.sample import SamplingSettings, sample_responses
from em_sweep.prompts import format_prompt, load_pool
from em_sweep.training import objectives
from em_sweep.training.objectives import (
    EMInfProcessor,
    advantages,
    em_inf_logits,
    group_advantages,
    majority_labels,
    majority_share,
    majority_vote_rewards,
    model_reward,
    objective_name,
    rloo_advantages,
    row_means,
    token_statistics,
)
from em_sweep.training.rl import response_token_statistics, rl_step, step_rewards
from tests.conftest import compose_config

OBJECTIVES = ("em", "em_rl_token", "em_rl_sequence", "self_certainty", "majority_vote", "em_inf")


# -- advantages -------------------------------------------------------------------------------

def direct_rloo(rewards, g):
    out = []
    for k in range(0, len(rewards), g):
        grp = rewards[k:k + g]
        out += [r - (sum(grp) - r) / (g - 1) for r in grp]
    return out


def test_rloo_advantages_are_each_reward_minus_the_mean_of_the_others():
    rewards = [1.0, 0.0, 0.0, 1.0, -0.3, -0.3, -0.3, -0.3, 0.2, -1.5, 0.7, 0.1]
    adv = rloo_advantages(torch.tensor(rewards), 4)
    assert torch.allclose(adv, torch.tensor(direct_rloo(rewards, 4)), atol=1e-6)
    assert float(adv[0]) == pytest.approx(1.0 - 1 / 3)  # 1 minus the mean of (0, 0, 1)
    assert torch.equal(adv[4:8], torch.zeros(4))  # an all-equal group: zero advantage
    with pytest.raises(ValueError):
        rloo_advantages(torch.tensor(rewards), 5)


def test_advantage_kinds_dispatch_and_unknown_ones_fail():
    r = torch.tensor([0.5, -0.1, 0.3, 0.3])
    assert torch.equal(advantages(r, 2, "grpo"), group_advantages(r, 2))
    assert torch.equal(advantages(r, 2, "rloo"), rloo_advantages(r, 2))
    with pytest.raises(ValueError, match="rloo"):
        advantages(r, 2, "ppo")


# -- rewards from the model's distribution ------------------------------------------------------

def test_token_statistics_match_the_formulas_by_hand():
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 0.0, 0.0, 0.0], [9.0, -9.0, -9.0, -9.0]])
    targets = torch.tensor([0, 3, 1])
    t = 0.7
    stats = token_statistics(logits, targets, t)
    for i in range(3):
        z = [float(x) / t for x in logits[i]]
        lse = math.log(sum(math.exp(v) for v in z))
        p = [math.exp(v - lse) for v in z]
        h = -sum(q * math.log(q + 1e-12) for q in p)
        kl_uniform = sum(0.25 * math.log(0.25 / q) for q in p)  # KL(U || p)
        assert float(stats["entropy"][i]) == pytest.approx(h, abs=1e-5)
        assert float(stats["logprob"][i]) == pytest.approx(math.log(p[int(targets[i])]), abs=1e-5)
        assert float(stats["self_certainty"][i]) == pytest.approx(kl_uniform, abs=1e-4)
    assert float(stats["self_certainty"][1]) == pytest.approx(0.0, abs=1e-6)  # uniform: no certainty
    # Intuitor's form, logsumexp(z) - mean(z), differs only by log V
    intuitor = torch.logsumexp(logits / t, -1) - (logits / t).mean(-1)
    assert torch.allclose(stats["self_certainty"], intuitor - math.log(4), atol=1e-5)


def test_model_rewards_are_per_response_means():
    stats = {"entropy": torch.tensor([0.5, 1.5, 0.2, 0.4, 0.6]),
             "logprob": torch.tensor([-1.0, -3.0, -0.1, -0.2, -0.3]),
             "self_certainty": torch.tensor([2.0, 4.0, 1.0, 1.0, 4.0])}
    row_of = torch.tensor([0, 0, 2, 2, 2])  # row 1 has no generated token
    assert model_reward("neg_entropy", stats, row_of, 3).tolist() == pytest.approx([-1.0, 0.0, -0.4])
    assert model_reward("mean_logprob", stats, row_of, 3).tolist() == pytest.approx([-2.0, 0.0, -0.2])
    assert model_reward("self_certainty", stats, row_of, 3).tolist() == pytest.approx([3.0, 0.0, 2.0])
    assert row_means(torch.zeros(0), torch.zeros(0, dtype=torch.long), 2).tolist() == [0.0, 0.0]
    with pytest.raises(ValueError):
        model_reward("gold", stats, row_of, 3)


# -- majority vote ----------------------------------------------------------------------------------

def direct_majority(answers):
    """TTRL's vote written out: Counter over extracted answers, ties to the first seen."""
    counts, order = {}, []
    for a in answers:
        if a is None:
            continue
        a = a.replace(" ", "").strip("$").rstrip(".")
        if a not in counts:
            order.append(a)
        counts[a] = counts.get(a, 0) + 1
    if not counts:
        return None
    top = max(counts.values())
    return next(a for a in order if counts[a] == top)


def test_majority_labels_break_ties_by_first_seen_and_skip_unextractable_answers():
    answers = ["3", "4", "4", "3",          # tie 2-2: the first seen (3)
               None, None, "5", None,       # one extracted answer wins alone
               None, None, None, None,      # nothing extracted: no label
               " 7 ", "7.", "$7$", "8"]     # normalised forms of 7 vote together
    labels = majority_labels(answers, 4)
    assert labels == ["3", "5", None, "7"]
    assert labels == [direct_majority(answers[k:k + 4]) for k in range(0, 16, 4)]
    with pytest.raises(ValueError):
        majority_labels(answers, 5)


def test_majority_vote_rewards_by_hand():
    answers = ["3", "4", "4", "3", None, None, "5", None, None, None, None, None, "2", "2", "2", "2"]
    rewards = majority_vote_rewards(answers, 4)
    assert rewards == [1.0, 0.0, 0.0, 1.0,   # the tie's winner earns, the other half does not
                       0.0, 0.0, 1.0, 0.0,   # unextractable answers earn nothing
                       0.0, 0.0, 0.0, 0.0,   # no label: nobody earns (all-equal group, zero advantage)
                       1.0, 1.0, 1.0, 1.0]   # unanimous: all earn (all-equal group, zero advantage)
    adv = group_advantages(torch.tensor(rewards), 4)
    assert torch.equal(adv[8:], torch.zeros(8))
    assert majority_share(["1", "1", None, "2"]) == 0.5
    assert majority_share([None, None]) == 0.0


def test_a_majority_vote_step_uses_no_gold_answer(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    cfg = compose_config(["stages=[rl]", "rl.reward=majority_vote", "rl.batch_size=16", "rl.micro_batch_size=16"])
    p = load_pool("arith_pool")["arith18"]
    text = format_prompt(tok, p.problem, cfg.prompt.system, cfg.prompt.chat_template)
    from em_sweep.training.em import make_optimizer
    opt, _ = make_optimizer(model, cfg.rl)
    m = rl_step(model, tok, opt, [text, text], ["not a number"] * 2, cfg.rl, 1, 1e-3, seed=3)
    # against a nonsense gold the gold reward would be 0; the vote rewards agreement instead
    assert m.reward > 0.0 and m.agreement > 0.0 and m.grader_failures == 0


def test_entropy_and_logprob_rewards_are_the_models_own(tiny):
    """step_rewards' neg_entropy / mean_logprob / self_certainty from the full logits of a forward."""
    model, tok = tiny
    cfg = compose_config(["stages=[rl]", "rl.micro_batch_size=3", "rl.temperature=0.8"])
    p = load_pool("arith_pool")["arith1"]
    text = format_prompt(tok, p.problem, cfg.prompt.system, cfg.prompt.chat_template)
    batch = sample_responses(model, tok, [text] * 6, SamplingSettings(temperature=1.0, max_new_tokens=24), 6, seed=5)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float() / 0.8
    want = {"neg_entropy": [], "mean_logprob": [], "self_certainty": []}
    for i in range(6):
        cols = batch.response_mask[i].bool().nonzero().squeeze(1)
        logp = torch.log_softmax(logits[i, cols], -1)
        h = -(logp.exp() * logp).sum(-1)
        tokens = batch.input_ids[i, cols + 1]
        want["neg_entropy"].append(-float(h.mean()))
        want["mean_logprob"].append(float(logp.gather(1, tokens[:, None]).mean()))
        want["self_certainty"].append(float((-logp.mean(-1) - math.log(logp.shape[-1])).mean()))
    for kind, values in want.items():
        cfg.rl.reward = kind
        got, failures, entropy = step_rewards(model, batch, [""] * 6, cfg.rl, 5.0)
        assert got == pytest.approx(values, abs=1e-4), kind
        assert failures == 0 and entropy == pytest.approx(-sum(want["neg_entropy"][i] * int(batch.response_mask[i].sum())
                                                                for i in range(6)) / int(batch.response_mask.sum()),
                                                          abs=1e-4)
    stats, row_of = response_token_statistics(model, batch, slice(0, 6), 0.8, 0)
    assert row_of.tolist() == sorted(row_of.tolist()) and stats["entropy"].shape == row_of.shape


# -- EM-INF -----------------------------------------------------------------------------------------

def reference_em_inf(logits_row, steps, lr, kl_weight, threshold):
    """The reference's ent_sample loop (chotkrin/EM_PT eval/utils/em_inf_utils.py) for one position."""
    next_token_logits = logits_row[None].clone().float()
    original_probs = F.softmax(next_token_logits, dim=-1).detach()
    param = torch.nn.Parameter(next_token_logits)
    opt = torch.optim.Adam([param], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        probs = F.softmax(param, dim=-1)
        entropy = -torch.sum(probs * torch.log(probs + 1e-12))
        if entropy < threshold:
            break
        kl = F.kl_div(input=probs.log(), target=original_probs, reduction="batchmean")
        (kl_weight * kl + entropy).backward()
        opt.step()
    return param.detach()[0]


def test_em_inf_logits_match_the_reference_loop_row_by_row():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * torch.tensor([[0.5], [2.0], [4.0], [12.0]])  # flat ... peaked (below threshold)
    out = em_inf_logits(logits, steps=3, lr=0.1, kl_weight=0.05, threshold=0.3)
    for i in range(4):
        assert torch.allclose(out[i], reference_em_inf(logits[i], 3, 0.1, 0.05, 0.3), atol=1e-5), i
    h = lambda z: -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)  # noqa: E731
    assert (h(out[:3]) < h(logits[:3])).all()  # the entropy of each adjusted position falls
    assert h(logits[3]) < 0.3 and torch.equal(out[3], logits[3])  # already below the threshold: untouched
    assert torch.equal(em_inf_logits(logits, 0, 0.1, 0.05, 0.3), logits)


def test_em_inf_decoding_leaves_the_weights_and_lowers_the_entropy_it_samples_from(tiny):
    model, tok = tiny
    before = {k: v.detach().clone() for k, v in model.state_dict().items()}
    seen = []

    class Recording(EMInfProcessor):
        def __call__(self, input_ids, scores):
            out = super().__call__(input_ids, scores)
            seen.append((scores.detach().clone(), out.detach().clone()))
            return out

    from transformers import LogitsProcessorList
    p = load_pool("arith_pool")["arith3"]
    text = format_prompt(tok, p.problem, None, True)
    settings = SamplingSettings(temperature=1.0, max_new_tokens=16)
    plain = sample_responses(model, tok, [text] * 4, settings, 4, seed=1)
    adjusted = sample_responses(model, tok, [text] * 4, settings, 4, seed=1,
                                logits_processor=LogitsProcessorList([Recording(3, 0.1, 0.05, 0.3)]))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert seen and len(adjusted.texts) == 4 and plain.texts  # it decoded through the processor
    h = lambda z: -(torch.softmax(z.float(), -1) * torch.log_softmax(z.float(), -1)).sum(-1)  # noqa: E731
    raw, out = torch.cat([s for s, _ in seen]), torch.cat([o for _, o in seen])
    high = h(raw) >= 0.3
    assert high.any() and (h(out)[high] < h(raw)[high]).all()
    assert torch.equal(out[~high], raw[~high].float())


# -- objectives in config, runs and presets ----------------------------------------------------------

def test_known_objective_names_follow_the_module():
    assert config_module.KNOWN_REWARDS == objectives.REWARDS
    assert config_module.KNOWN_ADVANTAGES == objectives.ADVANTAGES
    from em_sweep.training.stopping import RULES
    assert config_module.KNOWN_STOP_RULES == RULES


@pytest.mark.parametrize("objective, name", [
    ("em", "em"), ("em_rl_token", "rl:neg_entropy/rloo"), ("em_rl_sequence", "rl:mean_logprob/rloo"),
    ("self_certainty", "rl:self_certainty"), ("majority_vote", "rl:majority_vote"), ("em_inf", "em_inf")])
def test_each_objective_preset_composes_validates_and_is_named(objective, name):
    for overrides in ([f"+objective={objective}"],  # any model (here the tiny default)
                      ["+experiment=objectives_tiny", f"objective={objective}"],
                      ["+experiment=objectives_paper", f"objective={objective}"]):
        cfg = compose_config(overrides)
        validate(cfg)
        assert objective_name(cfg) == name
        if objective == "em_inf":  # the objective's settings win over the comparison preset's
            assert cfg.train.steps == 0 and list(cfg.eval.at_steps) == [0]


def test_objectives_have_distinct_run_ids_and_the_em_objective_is_the_default_run():
    from em_sweep.rundir import run_id
    ids = {run_id(compose_config([f"+objective={o}"])) for o in OBJECTIVES}
    assert len(ids) == len(OBJECTIVES)
    assert run_id(compose_config(["+objective=em"])) == run_id(compose_config()) == "55d51e3af8f926d2"
    assert run_id(compose_config(["stages=[em]", "rl.reward=majority_vote"])) == "55d51e3af8f926d2"  # rl unused
    assert run_id(compose_config(["stop.probe_samples=8"])) != "55d51e3af8f926d2"


@pytest.mark.parametrize("override, key", [
    ("rl.reward=gold_plus", "rl.reward"), ("rl.advantage=ppo", "rl.advantage"), ("rl.entropy_coef=-1", "rl.entropy_coef"),
    ("eval.em_inf.lr=0", "eval.em_inf.lr"), ("stop.rule=oracle", "stop.rule"), ("stop.agreement=0", "stop.agreement")])
def test_bad_objective_settings_fail_naming_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_config(["stages=[rl]", "eval.em_inf.enabled=true", override]))


def test_label_free_rewards_need_no_gold_answers(tmp_path):
    from em_sweep.prompts import PromptError
    from em_sweep.run import preflight
    base = ["stages=[rl]", "prompt.pool=dsr_sub", "prompt.ids=[dsr265]"]  # dsr265 has no answer
    with pytest.raises(PromptError, match="dsr265"):
        preflight(compose_config(base))
    for reward in ("majority_vote", "self_certainty", "neg_entropy", "mean_logprob"):
        preflight(compose_config([*base, f"rl.reward={reward}"]))


def test_rl_reference_preset_is_the_one_shot_rlvr_recipe():
    cfg = compose_config(["+experiment=rl_reference"])
    validate(cfg)
    r = cfg.rl
    assert (r.batch_size // r.group_size, r.group_size, r.temperature, r.max_new_tokens, r.lr, r.kl_coef,
            r.entropy_coef, r.clip_ratio, r.reward, r.advantage) == (128, 8, 0.6, 3072, 1e-6, 1e-3, 1e-3, 0.2, "gold", "grpo")
    assert list(cfg.stages) == ["rl"] and cfg.prompt.pool == "dsr_sub" and len(cfg.prompt.ids) == 1209
    assert cfg.model.path == "Qwen/Qwen2.5-Math-1.5B"
