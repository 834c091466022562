"""The RL stage (em_sweep/training/rl.py): GRPO loss as pure functions, rewards, steps, stages in a run."""

import copy
import json
import math

import pytest
import torch

from em_sweep.config import ConfigError, validate
from em_sweep.generation.sample import sample_responses
from em_sweep.prompts import PromptError, format_prompt, load_pool
from em_sweep.training.loss import token_logprobs_from_hidden
from em_sweep.training.objectives import group_advantages
from em_sweep.training.rl import (
    grpo_loss,
    grpo_token_losses,
    math_rewards,
    response_logprobs,
    response_logprobs_and_entropy,
    rl_sampling_settings,
    rl_step,
    train_rl,
)
from tests.conftest import compose_config


def direct_advantages(rewards, g):
    out = []
    for k in range(0, len(rewards), g):
        grp = rewards[k:k + g]
        mean = sum(grp) / g
        std = math.sqrt(sum((r - mean) ** 2 for r in grp) / (g - 1))
        out += [(r - mean) / (std + 1e-6) for r in grp]
    return out


def test_group_advantages_by_hand_including_all_equal_groups():
    rewards = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]
    adv = group_advantages(torch.tensor(rewards), 4)
    assert torch.allclose(adv, torch.tensor(direct_advantages(rewards, 4)), atol=1e-6)
    assert abs(float(adv[0]) - 0.5 / math.sqrt(1 / 3)) < 1e-4  # mean 0.5, unbiased std 0.577
    assert torch.equal(adv[4:], torch.zeros(8))  # all-equal groups: zero advantage, no NaN
    assert torch.isfinite(adv).all()
    with pytest.raises(ValueError):
        group_advantages(torch.tensor(rewards), 5)
    with pytest.raises(ValueError):
        group_advantages(torch.tensor(rewards), 1)


def direct_token_loss(logp, old, a, c, beta, ref):
    ratio = math.exp(logp - old)
    pg = -min(ratio * a, min(max(ratio, 1 - c), 1 + c) * a)
    kl = math.exp(ref - logp) - (ref - logp) - 1 if ref is not None else 0.0
    return pg + beta * kl, kl


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_grpo_token_losses_match_a_direct_implementation(beta):
    # ratio 1.5 with A > 0 (clipped at 1.2), ratio 0.5 with A < 0 (clipped at 0.8), ratio 1.5 with
    # A < 0 (not clipped: min keeps the worse objective), on-policy tokens, a zero advantage.
    logp = torch.tensor([math.log(1.5), math.log(0.5), math.log(1.5), -1.0, -2.0])
    old = torch.tensor([0.0, 0.0, 0.0, -1.0, -2.0])
    adv = torch.tensor([2.0, -1.0, -1.0, 0.7, 0.0])
    ref = torch.tensor([0.1, -0.3, 0.2, -1.0, -1.5])
    loss, kl, clipped = grpo_token_losses(logp, old, adv, 0.2, beta, ref if beta else None)
    for i in range(5):
        want, want_kl = direct_token_loss(float(logp[i]), float(old[i]), float(adv[i]), 0.2, beta,
                                          float(ref[i]) if beta else None)
        assert abs(float(loss[i]) - want) < 1e-5, i
        assert abs(float(kl[i]) - want_kl) < 1e-5
    assert clipped.tolist() == [True, True, False, False, False]
    if not beta:
        assert float(loss[0]) == pytest.approx(-1.2 * 2.0)
    assert (kl >= 0).all()


@pytest.mark.parametrize("beta", [0.0, 0.1])
def test_the_entropy_bonus_matches_a_direct_implementation(beta):
    """verl's actor loss: pg_loss - entropy_coeff * entropy (+ kl_coef * k3), per token."""
    logp = torch.tensor([math.log(1.5), math.log(0.5), -1.0, -2.0])
    old = torch.tensor([0.0, 0.0, -1.0, -2.0])
    adv = torch.tensor([2.0, -1.0, 0.7, 0.0])
    ref = torch.tensor([0.1, -0.3, -1.0, -1.5])
    entropy = torch.tensor([0.9, 2.3, 0.0, 1.1])
    loss, _, _ = grpo_token_losses(logp, old, adv, 0.2, beta, ref if beta else None, 0.05, entropy)
    for i in range(4):
        want, _ = direct_token_loss(float(logp[i]), float(old[i]), float(adv[i]), 0.2, beta,
                                    float(ref[i]) if beta else None)
        assert abs(float(loss[i]) - (want - 0.05 * float(entropy[i]))) < 1e-5, i
    plain, _, _ = grpo_token_losses(logp, old, adv, 0.2, beta, ref if beta else None)
    assert torch.allclose(grpo_token_losses(logp, old, adv, 0.2, beta, ref if beta else None, 0.0, entropy)[0], plain)
    # masked token mean, and the gradient reaching the entropies is -coef / tokens
    ent = entropy[None].clone().requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0]])
    total = grpo_loss(logp[None], old[None], adv[None], mask, 0.2, beta, ref[None] if beta else None, 0.05, ent)
    total.backward()
    direct = sum(direct_token_loss(float(logp[i]), float(old[i]), float(adv[i]), 0.2, beta,
                                   float(ref[i]) if beta else None)[0] - 0.05 * float(entropy[i]) for i in range(3)) / 3
    assert float(total.detach()) == pytest.approx(direct, abs=1e-5)
    assert ent.grad[0].tolist() == pytest.approx([-0.05 / 3] * 3 + [0.0])


def test_response_entropies_are_the_full_logits_own_with_their_gradient(tiny):
    model, tok = tiny
    cfg = compose_config(["stages=[rl]"])
    texts = [arith(tok, cfg, f"arith{i}")[0] for i in (1, 2)]
    batch = sample_responses(model, tok, texts, rl_sampling_settings(cfg.rl, "auto"), 2, seed=4)
    rows = slice(0, 2)
    logp, row_of, entropy = response_logprobs_and_entropy(model, batch, rows, 0.6, 7)
    logp_only, row_only = response_logprobs(model, batch, rows, 0.6, 7)
    assert torch.allclose(logp, logp_only, atol=1e-6) and torch.equal(row_of, row_only)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float() / 0.6
    lp = torch.log_softmax(logits[batch.response_mask.bool()], -1)
    direct = -(lp.exp() * lp).sum(-1)
    assert torch.allclose(entropy, direct, atol=1e-5)
    g1 = torch.autograd.grad(entropy.sum(), model.get_output_embeddings().weight)[0]
    g2 = torch.autograd.grad(direct.sum(), model.get_output_embeddings().weight)[0]
    # the chunked backward uses log(p + 1e-12) like the EM loss; the direct one exact log-softmax
    assert float((g1 - g2).norm() / g2.norm()) < 1e-3, float((g1 - g2).norm() / g2.norm())


def test_a_step_whose_groups_agree_still_takes_its_entropy_bonus(tiny):
    model = copy.deepcopy(tiny[0])
    tok = tiny[1]
    cfg = compose_config(["stages=[rl]", "rl.batch_size=16", "rl.micro_batch_size=16", "rl.entropy_coef=0.01"])
    text, _ = arith(tok, cfg, "arith1")
    before = [p.detach().clone() for p in model.parameters()]
    from em_sweep.training.em import make_optimizer
    opt, _ = make_optimizer(model, cfg.rl)
    m = rl_step(model, tok, opt, [text, text], ["not a number at all"] * 2, cfg.rl, 1, 1e-3, seed=0)
    assert m.zero_advantage_groups == 1.0 and not m.skipped and m.grad_norm > 0
    assert m.token_entropy is not None and m.token_entropy > 0
    assert m.loss == pytest.approx(-0.01 * m.token_entropy, rel=1e-4)  # the bonus is the whole loss
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_grpo_loss_masks_means_and_gives_the_policy_gradient():
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, -9.0]], requires_grad=True)
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    loss = grpo_loss(logp, logp.detach(), adv, mask, 0.2)
    assert float(loss.detach()) == pytest.approx((-1 - 1 + 2) / 3)
    loss.backward()
    # On-policy (ratio 1): d loss / d logp = -A / (masked tokens), 0 where masked.
    assert torch.allclose(logp.grad, torch.tensor([[-1 / 3, -1 / 3, 0.0], [2 / 3, 0.0, 0.0]]))
    empty = grpo_loss(logp, logp.detach(), adv, torch.zeros_like(mask), 0.2)
    assert float(empty) == 0.0 and not torch.isnan(empty)


def test_chunked_token_logprobs_equal_log_softmax_with_the_same_gradient():
    torch.manual_seed(0)
    h = torch.randn(13, 16, requires_grad=True)
    w = torch.randn(40, 16, requires_grad=True)
    y = torch.randint(0, 40, (13,))
    g = torch.randn(13)
    out = token_logprobs_from_hidden(h, w, y, 0.7, chunk_tokens=5)
    ref = torch.log_softmax(h @ w.T / 0.7, -1).gather(1, y[:, None]).squeeze(1)
    assert torch.allclose(out, ref, atol=1e-5)
    for a, b in zip(torch.autograd.grad((out * g).sum(), (h, w)), torch.autograd.grad((ref * g).sum(), (h, w)),
                    strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def arith(tok, cfg, pid):
    p = load_pool("arith_pool")[pid]
    return format_prompt(tok, p.problem, cfg.prompt.system, cfg.prompt.chat_template), p.answer


def test_response_logprobs_are_the_models_own_at_the_generated_tokens(tiny):
    model, tok = tiny
    cfg = compose_config(["stages=[rl]"])
    texts = [arith(tok, cfg, f"arith{i}")[0] for i in (1, 2, 3)]
    batch = sample_responses(model, tok, texts, rl_sampling_settings(cfg.rl, "auto"), 8, seed=0)
    logp, rows = response_logprobs(model, batch, slice(0, 3), 0.8, 7)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=(batch.attention_mask.cumsum(-1) - 1).clamp(min=0)).logits
    want = []
    for b in range(3):
        for t in range(batch.input_ids.shape[1] - 1):
            if batch.response_mask[b, t]:
                want.append(float(torch.log_softmax(logits[b, t] / 0.8, -1)[batch.input_ids[b, t + 1]]))
    assert len(want) == int(batch.response_lengths.sum()) == logp.numel()
    assert torch.allclose(logp.detach(), torch.tensor(want), atol=1e-4)
    assert rows.tolist() == sorted(rows.tolist())


def test_a_group_shares_its_prompt_pass_with_the_same_logprobs_and_gradient(tiny, shared_passes):
    """rl.share_prompt_pass: a micro-batch of one group runs its prompt once; a micro-batch of two
    groups takes the full pass. Log-probabilities and gradients equal the full pass's either way."""
    model = copy.deepcopy(tiny[0])
    tok = tiny[1]
    cfg = compose_config(["stages=[rl]"])
    texts = [arith(tok, cfg, pid)[0] for pid in ("arith1", "arith18") for _ in range(4)]
    batch = sample_responses(model, tok, texts, rl_sampling_settings(cfg.rl, "auto"), 8, seed=0)
    model.train()
    for rows, expect in ((slice(0, 4), [True]), (slice(2, 6), [])):  # one group; two groups
        shared_passes.clear()
        results = []
        for share in (False, True):
            model.zero_grad(set_to_none=True)
            logp, row_of = response_logprobs(model, batch, rows, 1.0, 7, share)
            logp.sum().backward()
            results.append((logp.detach(), row_of, {n: p.grad.clone() for n, p in model.named_parameters()}))
        assert shared_passes == expect
        (full, rows_full, g_full), (by_share, rows_shared, g_shared) = results
        assert torch.equal(rows_full, rows_shared)
        assert torch.allclose(by_share, full, atol=1e-5)
        for name, g in g_full.items():
            assert float((g_shared[name] - g).norm() / g.norm()) < 1e-4, name


def test_rewards_grade_the_final_answer_against_gold():
    texts = ["3+4=7. \\boxed{7}", "3+4=8. \\boxed{8}", "no answer here", "The answer is 7."]
    rewards, failures = math_rewards(texts, ["7", "7", "7", "7.0"], 5.0)
    assert rewards == [1.0, 0.0, 0.0, 1.0] and failures == 0


def test_a_step_whose_groups_all_agree_has_no_gradient_and_leaves_the_weights(tiny):
    model = copy.deepcopy(tiny[0])
    tok = tiny[1]
    cfg = compose_config(["stages=[rl]", "rl.batch_size=16", "rl.micro_batch_size=16"])
    text, _ = arith(tok, cfg, "arith1")
    before = [p.detach().clone() for p in model.parameters()]
    from em_sweep.training.em import make_optimizer
    opt, _ = make_optimizer(model, cfg.rl)
    m = rl_step(model, tok, opt, [text, text], ["not a number at all"] * 2, cfg.rl, 1, 1e-3, seed=0)
    assert m.reward == 0.0 and m.zero_advantage_groups == 1.0 and m.skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert math.isfinite(m.loss) and m.grad_norm == 0.0


@pytest.mark.slow
def test_a_short_rl_stage_raises_the_reward_the_model_can_sometimes_earn(tiny):
    """One-shot RLVR on a prompt the toy solves about a third of the time at T 1.0."""
    model = copy.deepcopy(tiny[0])
    tok = tiny[1]
    cfg = compose_config(["stages=[rl]", "rl.steps=8", "rl.lr=3e-4", "rl.batch_size=32", "rl.micro_batch_size=32"])
    text, gold = arith(tok, cfg, "arith18")

    def reward():
        b = sample_responses(model, tok, [text] * 128, rl_sampling_settings(cfg.rl, "auto"), 128, seed=99)
        return sum(math_rewards(b.texts, [gold] * 128, 5.0)[0]) / 128

    start = reward()
    curve = []
    train_rl(model, tok, [text], [gold], cfg.rl, seed=1, on_step=curve.append)
    end = reward()
    assert 0.1 < start < 0.6  # sometimes earned, room to improve
    assert end > start + 0.25, (start, end, [m.reward for m in curve])
    assert [m.step for m in curve] == list(range(1, 9)) and not any(m.skipped for m in curve)


def test_kl_to_the_stage_start_is_zero_first_then_grows(tiny):
    model = copy.deepcopy(tiny[0])
    tok = tiny[1]
    cfg = compose_config(["stages=[rl]", "rl.steps=3", "rl.lr=3e-4", "rl.kl_coef=0.1", "rl.batch_size=32",
                          "rl.micro_batch_size=32"])
    text, gold = arith(tok, cfg, "arith1")
    curve = []
    train_rl(model, tok, [text], [gold], cfg.rl, seed=2, on_step=curve.append, start_step=10)
    assert [m.step for m in curve] == [11, 12, 13]
    assert curve[0].kl == 0.0  # the reference is the model as the stage began
    assert curve[-1].kl > 0.0


@pytest.mark.parametrize("override, message", [
    ("rl.group_size=1", "rl.group_size"),
    ("rl.batch_size=60", "rl.batch_size"),
    ("rl.temperature=0", "rl.temperature"),
    ("rl.kl_coef=-0.1", "rl.kl_coef"),
    ("rl.clip_ratio=0", "rl.clip_ratio"),
])
def test_bad_rl_settings_fail_validation(override, message):
    with pytest.raises(ConfigError, match=message):
        validate(compose_config(["stages=[em,rl]", override]))


def test_rl_settings_are_not_checked_when_no_stage_uses_them():
    validate(compose_config(["stages=[em]", "rl.group_size=1"]))
    with pytest.raises(ConfigError, match="stages"):
        validate(compose_config(["stages=[em,ppo]"]))


def test_rl_needs_gold_answers_for_its_prompts(tmp_path):
    from em_sweep.run import preflight
    cfg = compose_config(["stages=[rl]", "prompt.pool=dsr_sub", "prompt.ids=[dsr265]"])
    with pytest.raises(PromptError, match="dsr265"):
        preflight(cfg)
    preflight(compose_config(["stages=[em]", "prompt.pool=dsr_sub", "prompt.ids=[dsr265]"]))


def test_stages_in_one_run_continue_the_step_count_and_evaluate_between(tmp_path):
    from em_sweep.run import run
    cfg = compose_config(["stages=[rl,em]", "rl.steps=2", "train.steps=2", "eval.limit=40",
                          f"paths.root={tmp_path}", "logger.mode=offline", "rl.batch_size=16",
                          "rl.micro_batch_size=16", "train.batch_size=16", "train.micro_batch_size=16"])
    results = run(cfg)
    assert results["stages"] == [{"stage": "rl", "first_step": 1, "last_step": 2},
                                 {"stage": "em", "first_step": 3, "last_step": 4}]
    assert sorted({s["step"] for s in results["scores"]}) == [0, 2, 4]  # before, between, after
    assert [r["step"] for r in results["rl_curve"]] == [1, 2]
    assert [r["step"] for r in results["loss_curve"]] == [3, 4]
    run_dir = tmp_path / "runs" / results["run_id"]
    kinds = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in kinds if r["kind"] == "train"] == ["rl", "rl", "em", "em"]
    wandb_files = list(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert wandb_files and b"stages=rl,em" in wandb_files[0].read_bytes()  # the W&B run is tagged with its stages
    from em_sweep.analysis.collect import collect
    from em_sweep.analysis.report import prepare
    collected = collect(tmp_path, progress=False)
    train = collected.train.sort_values("step")
    assert train["stage"].tolist() == ["rl", "rl", "em", "em"]
    assert train["reward"].notna().tolist() == [True, True, False, False]
    assert prepare(collected.scores, collected.train).train["stage"].tolist() == ["em", "em"]  # loss findings: EM's
    again = run(cfg)
    assert again["skipped"]


@pytest.mark.slow
def test_stage_order_preset_runs_every_order_as_a_sweep(tmp_path):
    """+experiment=stage_order: one multirun, one run per stage order (seed pinned, tiny budgets)."""
    import subprocess
    import sys

    from tests.conftest import ROOT
    result = subprocess.run(
        [sys.executable, "launch.py", "-m", "+experiment=stage_order", "train.steps=1", "rl.steps=1", "seed=1",
         "eval.limit=20", "rl.batch_size=16", "rl.micro_batch_size=16", "train.batch_size=16",
         "train.micro_batch_size=16", f"paths.root={tmp_path}", "logger.mode=disabled"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    orders = sorted(",".join(s["stage"] for s in json.loads(p.read_text())["stages"])
                    for p in tmp_path.glob("runs/*/results.json"))
    assert orders == ["em", "em,rl", "rl", "rl,em"]
    from em_sweep.analysis.collect import collect
    from em_sweep.analysis.report import finding_stage_order, prepare
    collected = collect(tmp_path / "sweeps" / "stage_order", progress=False)
    f9 = finding_stage_order(prepare(collected.scores, collected.train))
    text = "\n".join(f9.lines)
    assert f9.has_data and "`em,rl`" in text and "after 2 steps" in text and "after 1 steps" in text
    assert "different numbers of steps" in text


def test_a_pool_is_cycled_a_group_of_prompts_per_step():
    from em_sweep.config import RLConfig
    from em_sweep.training.rl import step_prompts
    rl = RLConfig(batch_size=16, group_size=8)  # 2 prompts per step
    texts, golds = ["a", "b", "c"], ["1", "2", "3"]
    assert [step_prompts(texts, golds, rl, s) for s in range(3)] == [
        (["a", "b"], ["1", "2"]), (["c", "a"], ["3", "1"]), (["b", "c"], ["2", "3"])]
    assert step_prompts(["x"], ["9"], rl, 5) == (["x", "x"], ["9", "9"])  # one-shot: the same prompt


def test_step_limits_count_every_stage():
    validate(compose_config(["stages=[em,rl]", "train.steps=10", "rl.steps=10", "eval.at_steps=[0,15]",
                             "train.save_at_steps=[20]"]))
    with pytest.raises(ConfigError, match=r"eval.at_steps: \[8\] are past the stages' 4 steps"):
        validate(compose_config(["stages=[rl]", "rl.steps=4", "eval.at_steps=[0,8]"]))
    with pytest.raises(ConfigError, match="rl.warmup_steps"):
        validate(compose_config(["stages=[rl]", "rl.warmup_steps=-2"]))


def test_rl_settings_identify_a_run_only_when_rl_is_a_stage():
    from em_sweep.rundir import run_id
    em_a, em_b = (compose_config(["stages=[em]", f"rl.lr={lr}"]) for lr in (1e-3, 2e-3))
    assert run_id(em_a) == run_id(em_b)
    rl_a, rl_b = (compose_config(["stages=[em,rl]", f"rl.lr={lr}"]) for lr in (1e-3, 2e-3))
    assert run_id(rl_a) != run_id(rl_b) and run_id(rl_a) != run_id(em_a)


def test_speed_only_settings_are_not_part_of_the_run_id():
    """The default config's ids (identity version 2, tests/test_identity.py pins the rule): a
    speed-only setting, for EM or the RL stage, finds the same finished runs."""
    from em_sweep.rundir import run_id
    speed = ["train.compile_loss=true", "train.share_prompt_pass=true"]
    assert run_id(compose_config()) == run_id(compose_config(speed)) == "55d51e3af8f926d2"
    assert run_id(compose_config(["stages=[em,rl]"])) == "8e37ddeb8b8b515b"
    assert run_id(compose_config(["stages=[em,rl]", "rl.compile_loss=true"])) == "8e37ddeb8b8b515b"
    assert run_id(compose_config(["train.lr=1e-3"])) != "55d51e3af8f926d2"  # a science setting still counts


def test_more_updates_per_batch_move_the_ratio_and_the_clip_bounds_it(tiny):
    model = copy.deepcopy(tiny[0])
    tok = tiny[1]
    cfg = compose_config(["stages=[rl]", "rl.steps=1", "rl.lr=3e-3", "rl.updates_per_batch=3", "rl.clip_ratio=0.05",
                          "rl.batch_size=32", "rl.micro_batch_size=16"])
    text, gold = arith(tok, cfg, "arith18")
    curve = []
    train_rl(model, tok, [text], [gold], cfg.rl, seed=1, on_step=curve.append)
    m = curve[0]
    assert not m.skipped and 0.0 < m.clip_fraction < 1.0, m


def test_rl_step_runs_its_loss_pass_compiled_with_rl_compile_loss(tiny, monkeypatch):
    """rl.compile_loss (following train.compile_loss) reaches rl_step's loss pass; the step's
    first-update loss is the eager one."""
    import em_sweep.training.rl as rl_module
    from em_sweep.training.em import compiled_layers, make_optimizer

    entered = []

    def recording(model, enabled=True):  # the real context, recording whether it compiled
        entered.append(enabled)
        return compiled_layers(model, enabled)

    monkeypatch.setattr(rl_module, "compiled_layers", recording)
    tok = tiny[1]
    losses = []
    for flag in ("false", "true"):
        model = copy.deepcopy(tiny[0])
        cfg = compose_config(["stages=[rl]", "rl.batch_size=16", "rl.micro_batch_size=8",
                              f"train.compile_loss={flag}"])
        text, gold = arith(tok, cfg, "arith18")  # rewards differ within its groups
        opt, _ = make_optimizer(model, cfg.rl)
        losses.append(rl_step(model, tok, opt, [text, text], [gold, gold], cfg.rl, 1, 1e-3, seed=0).loss)
    assert entered == [False, True]
    assert losses[1] == pytest.approx(losses[0], rel=1e-4, abs=1e-7)
