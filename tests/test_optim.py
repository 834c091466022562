"""Memory strategies for AdamW (em_sweep/training/optim.py) against exact fp32-master AdamW."""

import copy

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from em_sweep.training.loss import entropy_sum_from_hidden
from em_sweep.training.optim import (
    BF16AdamW,
    MasterWeightAdamW,
    make_adamw,
    resolve_optimizer_name,
    stochastic_round_to_bf16,
)

KW = dict(lr=2e-5, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)


def weights_and_grads(n=20_000, steps=10, seed=0):
    """bf16 weights of a typical scale (std 0.02) and bf16-representable gradients per step."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, generator=g) * 0.02).bfloat16()
    grads = [(torch.randn(n, generator=g) * 1e-3).bfloat16() for _ in range(steps)]
    return w, grads


def run(opt_factory, w0, grads):
    p = torch.nn.Parameter(w0.clone())
    opt = opt_factory([p])
    for gr in grads:
        p.grad = gr.to(p.dtype).clone()
        opt.step()
    return p.detach(), opt


def fp32_reference(w0, grads):
    p, _ = run(lambda ps: torch.optim.AdamW(ps, **KW), w0.float(), [gr.float() for gr in grads])
    return p


def rel_err(delta, ref_delta):
    return float((delta - ref_delta).norm() / ref_delta.norm())


def test_master_weight_adamw_is_exactly_fp32_adamw_on_its_masters():
    w0, grads = weights_and_grads()
    ref = fp32_reference(w0, grads)
    p, opt = run(lambda ps: MasterWeightAdamW(ps, **KW), w0, grads)
    master = opt.masters[0][0]
    assert torch.allclose(master, ref, rtol=0, atol=1e-9)
    assert torch.equal(p, master.bfloat16())


def test_lr_2e5_updates_vanish_in_plain_bf16_weights():
    """Why the strategies exist: torch AdamW directly on bf16 weights loses most of the update."""
    w0, grads = weights_and_grads()
    ref_delta = fp32_reference(w0, grads) - w0.float()
    p, _ = run(lambda ps: torch.optim.AdamW(ps, **KW), w0, grads)
    delta = p.float() - w0.float()
    unchanged = float((delta == 0).float().mean())
    assert unchanged > 0.6, unchanged
    assert rel_err(delta, ref_delta) > 0.5


def test_kahan_weights_are_fp32_master_weights_rounded():
    """Kahan compensation carries what bf16 drops: its weights are fp32-master AdamW's, rounded."""
    w0, grads = weights_and_grads()
    ref = fp32_reference(w0, grads)
    p, opt = run(lambda ps: make_adamw(ps, "adamw_bf16_kahan", **KW), w0, grads)
    assert opt.em_name == "adamw_bf16_kahan"
    assert float((p == ref.bfloat16()).float().mean()) > 0.98
    assert rel_err(p.float() - w0.float(), ref.bfloat16().float() - w0.float()) < 0.1


def test_stochastic_rounding_weights_stay_within_a_bf16_step_or_two_of_fp32_master():
    """The rounding noise is a random walk of one bf16 step per rounding that moves a weight."""
    w0, grads = weights_and_grads()
    ref = fp32_reference(w0, grads)
    p, _ = run(lambda ps: make_adamw(ps, "adamw_bf16_sr", **KW), w0, grads)
    steps = (p.float() - ref).abs() / (ref.abs() * 2 ** -7)  # in bf16 steps (8 significant bits)
    assert float(steps.mean()) < 1.0 and float(steps.quantile(0.95)) < 2.0
    delta, ref_delta = p.float() - w0.float(), ref - w0.float()
    assert float(torch.nn.functional.cosine_similarity(delta, ref_delta, dim=0)) > 0.5


def test_stochastic_rounding_is_unbiased_across_seeds():
    """Averaged over rounding seeds the SR update converges to fp32-master AdamW's."""
    w0, grads = weights_and_grads(n=4000)
    ref_delta = fp32_reference(w0, grads) - w0.float()
    deltas = [run(lambda ps, s=s: BF16AdamW(ps, rounding="stochastic", seed=s, **KW), w0, grads)[0].float() - w0.float()
              for s in range(16)]
    single = rel_err(deltas[0], ref_delta)
    mean = rel_err(torch.stack(deltas).mean(0), ref_delta)
    assert mean < single / 2.5  # noise shrinks ~ 1/sqrt(16)


def test_stochastic_round_to_bf16_expectation_and_specials():
    lo = torch.tensor(1.0, dtype=torch.bfloat16)
    x = torch.full((200_000,), 1.0 + 0.3 * 2 ** -7)  # 30% of the way to the next bf16 value
    r = stochastic_round_to_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(r.unique().tolist()) == {1.0, 1.0 + 2 ** -7}
    assert abs(float(r.mean()) - float(x[0])) < 2e-5
    assert float(lo) == 1.0
    specials = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -2.5])
    out = stochastic_round_to_bf16(specials)
    assert out[0] == float("inf") and out[1] == float("-inf") and torch.isnan(out[2])
    assert out[3] == 0 and out[4] == -2.5


def tiny_model(dtype):
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return Qwen2ForCausalLM(cfg).to(dtype)


def em_updates(model, name, steps=10, lr=2e-5):
    """Entropy-minimisation steps on a fixed batch; returns the loss curve."""
    ids = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(1))
    opt = make_adamw(model.parameters(), name, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    losses = []
    for _ in range(steps):
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state.reshape(-1, 32)
        loss = entropy_sum_from_hidden(hidden, model.lm_head.weight, 0.5) / hidden.shape[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses, opt


def plain_bf16_em(model, steps=10):
    """The same EM steps with torch AdamW directly on the bf16 weights (no master copy)."""
    ids = torch.randint(0, 97, (4, 24), generator=torch.Generator().manual_seed(1))
    opt = torch.optim.AdamW(model.parameters(), **KW)
    losses = []
    for _ in range(steps):
        hidden = model.get_decoder()(input_ids=ids).last_hidden_state.reshape(-1, 32)
        loss = entropy_sum_from_hidden(hidden, model.lm_head.weight, 0.5) / hidden.shape[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    return losses


@pytest.mark.parametrize("name, tolerance", [("adamw_bf16_sr", 0.10), ("adamw_bf16_kahan", 0.01)])
def test_em_on_a_small_bf16_model_stays_faithful_to_fp32_master(name, tolerance):
    """Ten EM steps at lr 2e-5 on a bf16 Qwen2: the entropy falls as much as with fp32-master
    AdamW (within ``tolerance`` of its decrease); plain bf16 AdamW loses over half of it."""
    base = tiny_model(torch.bfloat16)
    drops = {}
    for variant in ("adamw", name):
        m = copy.deepcopy(base)
        losses, opt = em_updates(m, variant)
        drops[variant] = losses[0] - losses[-1]
    assert isinstance(opt, BF16AdamW)
    assert drops["adamw"] > 0
    assert abs(drops[name] - drops["adamw"]) < tolerance * drops["adamw"], drops
    plain = plain_bf16_em(copy.deepcopy(base))
    assert plain[0] - plain[-1] < 0.5 * drops["adamw"]


def test_auto_keeps_fp32_models_on_torch_adamw_and_sizes_bf16_by_memory():
    fp32 = [torch.nn.Parameter(torch.zeros(10))]
    assert resolve_optimizer_name("auto", fp32) == "adamw"
    assert type(make_adamw(fp32, "auto", **KW)) is torch.optim.AdamW
    bf16 = [torch.nn.Parameter(torch.zeros(1000, dtype=torch.bfloat16))]
    assert resolve_optimizer_name("auto", bf16) == "adamw"  # CPU: no device limit, exact master
    assert resolve_optimizer_name("auto", bf16, device_memory_bytes=80_000) == "adamw"  # 16 kB <= 48 kB
    assert resolve_optimizer_name("auto", bf16, device_memory_bytes=20_000) == "adamw_bf16_kahan"  # 10 kB <= 12 kB
    assert resolve_optimizer_name("auto", bf16, device_memory_bytes=15_000) == "adamw_bf16_sr"
    assert isinstance(make_adamw(bf16, "adamw", **KW), MasterWeightAdamW)
    with pytest.raises(ValueError, match="train.optimizer"):
        resolve_optimizer_name("sgd", bf16)
    with pytest.raises(ValueError, match="bfloat16"):
        BF16AdamW(fp32, **KW)


def test_adamw_8bit_needs_torchao():
    params = [torch.nn.Parameter(torch.zeros(300, dtype=torch.bfloat16))]
    try:
        import torchao  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="torchao"):
            make_adamw(params, "adamw_8bit", **KW)
    else:
        assert make_adamw(params, "adamw_8bit", **KW).em_name == "adamw_8bit"


def test_config_lists_match_the_implementations():
    from em_sweep.config import KNOWN_GENERATION_BACKENDS, KNOWN_OPTIMIZERS, TrainConfig
    from em_sweep.generation.sample import BACKENDS
    from em_sweep.training.optim import OPTIMIZERS

    assert KNOWN_OPTIMIZERS == OPTIMIZERS and KNOWN_GENERATION_BACKENDS == BACKENDS
    assert TrainConfig.optimizer == "auto" and TrainConfig.generation_backend == "auto"


def test_rounding_noise_is_uniform_and_keys_give_unrelated_streams():
    from em_sweep.training.optim import _noise16
    idx = torch.arange(1 << 20)
    a, b = _noise16(idx, torch.tensor(12345)).double(), _noise16(idx, torch.tensor(12346)).double()
    assert int(a.min()) >= 0 and int(a.max()) < 1 << 16
    counts = torch.bincount(a.long() >> 12, minlength=16).double()  # 16 bins of the 16 bits
    assert float((counts - counts.mean()).abs().max() / counts.mean()) < 0.02
    assert abs(float(a.mean()) / (1 << 16) - 0.5) < 0.002
    def corr(x, y):
        return float(torch.corrcoef(torch.stack([x, y]))[0, 1])
    assert abs(corr(a, b)) < 0.01 and abs(corr(a[1:], a[:-1])) < 0.01


def test_bf16_update_does_not_depend_on_how_it_is_split(monkeypatch):
    """The noise is a hash of the element's index, so pieces of any size give the same weights."""
    import em_sweep.training.optim as optim
    w0, grads = weights_and_grads(n=5000, steps=3)
    whole, _ = run(lambda ps: BF16AdamW(ps, rounding="stochastic", seed=3, **KW), w0, grads)
    monkeypatch.setattr(optim, "CHUNK", 777)
    pieces, _ = run(lambda ps: BF16AdamW(ps, rounding="stochastic", seed=3, **KW), w0, grads)
    other_seed, _ = run(lambda ps: BF16AdamW(ps, rounding="stochastic", seed=4, **KW), w0, grads)
    assert torch.equal(whole, pieces)
    assert not torch.equal(whole, other_seed)


@pytest.mark.parametrize("rounding", ["stochastic", "kahan"])
def test_compiled_bf16_update_matches_the_eager_one(rounding):
    """The fused (torch.compile) update, used on CUDA, computes what the eager pieces do; fp32
    math may differ in the last fp32 bit, which moves a rounding decision only rarely."""
    w0, grads = weights_and_grads(n=3000, steps=3)
    eager, opt_e = run(lambda ps: BF16AdamW(ps, rounding=rounding, compile=False, **KW), w0, grads)
    fused, opt_c = run(lambda ps: BF16AdamW(ps, rounding=rounding, compile=True, **KW), w0, grads)
    assert float((eager == fused).float().mean()) > 0.999
    assert float(((eager.float() - fused.float()).abs() / eager.float().abs().clamp(min=1e-6)).max()) <= 2 ** -7
    for key in ("exp_avg", "exp_avg_sq"):
        se, sc = next(iter(opt_e.state.values()))[key], next(iter(opt_c.state.values()))[key]
        assert float((se == sc).float().mean()) > 0.999


def test_nearest_bf16_bit_arithmetic_equals_torch_rounding():
    from em_sweep.training.optim import _nearest_bf16_as_fp32
    g = torch.Generator().manual_seed(0)
    x = torch.randn(100_000, generator=g) * torch.logspace(-30, 30, 100_000)
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 3.4e38, float("inf"), -float("inf")])])
    assert torch.equal(_nearest_bf16_as_fp32(x), x.bfloat16().float())
    assert torch.isnan(_nearest_bf16_as_fp32(torch.tensor([float("nan")]))).all()
