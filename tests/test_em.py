import copy

import pytest
import torch
from omegaconf import OmegaConf

from em_sweep.generation.sample import SamplingSettings, position_ids_for, sample_responses
from em_sweep.models import checkpointing_modules, set_checkpointing
from em_sweep.prompts import format_prompt
from em_sweep.training.em import (
    NonFiniteLoss,
    em_step,
    make_optimizer,
    micro_batch_entropy_sum,
    sampling_settings,
)
from em_sweep.training.loss import token_entropy
from tests.conftest import compose_config


def train_cfg(**overrides):
    cfg = compose_config([f"train.{k}={v}" for k, v in overrides.items()])
    return cfg.train


@pytest.fixture()
def fresh(tiny):
    model, tok = tiny
    return copy.deepcopy(model), tok


def test_entropy_pass_equals_token_entropy_on_full_logits(fresh):
    model, tok = fresh
    texts = [format_prompt(tok, q) for q in ("What is 3+4?", "What is 12+30-7+45?")] * 2
    batch = sample_responses(model, tok, texts, SamplingSettings(temperature=1.0, max_new_tokens=30), 4, seed=0)
    with torch.no_grad():
        total, _ = micro_batch_entropy_sum(model, batch, slice(0, 4), 0.5, chunk_tokens=7)
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                       position_ids=position_ids_for(batch.attention_mask)).logits
    expected = token_entropy(logits, batch.response_mask, 0.5)
    assert torch.allclose(total / batch.response_mask.sum(), expected, rtol=1e-5)


@pytest.mark.parametrize("micro", [1, 2, 8])
def test_one_step_is_one_update_whatever_the_micro_batch(fresh, micro):
    """Same seed, different micro-batch sizes: one optimizer update each, same new weights."""
    model, tok = fresh
    texts = [format_prompt(tok, "What is 12+30-7+45?")] * 8
    results = []
    for mb in (8, micro):
        m = copy.deepcopy(model)
        train = train_cfg(micro_batch_size=mb, batch_size=8, max_new_tokens=32, lr=1e-3)
        opt, lr_at = make_optimizer(m, train)
        metrics = em_step(m, tok, opt, texts, train, step=1, lr=lr_at(0), seed=3)
        steps_taken = {int(s["step"]) for s in opt.state.values()}
        assert steps_taken == {1}  # AdamW stepped exactly once per parameter
        results.append((metrics.loss, m.state_dict()))
    (loss_a, w_a), (loss_b, w_b) = results
    assert loss_a == pytest.approx(loss_b, rel=1e-5)
    for k in w_a:
        assert torch.allclose(w_a[k], w_b[k], atol=1e-6), k


def test_reported_entropy_at_the_sampling_temperature_is_the_models_before_its_update(fresh):
    """StepMetrics.entropy is the loss's quantity at the sampling temperature: like the loss, of
    the weights that sampled the batch, not of the updated ones."""
    model, tok = fresh
    texts = [format_prompt(tok, "What is 12+30-7+45?")] * 8
    train = train_cfg(batch_size=8, micro_batch_size=4, max_new_tokens=24, sample_temperature=1.0,
                      loss_temperature=0.5, lr=3e-2)
    before = copy.deepcopy(model)
    opt, _ = make_optimizer(model, train)
    metrics = em_step(model, tok, opt, texts, train, step=1, lr=3e-2, seed=4)
    # The same batch again (same seed, same weights), scored at the sampling temperature.
    batch = sample_responses(before, tok, texts, sampling_settings(train), train.sample_batch_size, seed=4)
    n = float(batch.response_mask.sum())

    def entropy_of(m):
        m.train()
        with torch.no_grad():
            return sum(float(micro_batch_entropy_sum(m, batch, slice(s, s + 4), 1.0, 0)[1]) for s in (0, 4)) / n

    assert metrics.entropy == pytest.approx(entropy_of(before), rel=1e-4)
    assert abs(entropy_of(model) - entropy_of(before)) > 1e-3  # the update moved it: the test can tell


@pytest.mark.slow
def test_ten_em_steps_lower_the_entropy_of_sampled_responses(fresh):
    model, tok = fresh
    cfg = compose_config()  # the default run's settings (lr 2e-5, T 0.5), 16 samples per step
    train = OmegaConf.merge(cfg.train, {"batch_size": 16, "micro_batch_size": 16})
    texts = [format_prompt(tok, "What is 12+30-7+45?")] * 16
    opt, lr_at = make_optimizer(model, train)
    losses = [em_step(model, tok, opt, texts, train, step=s + 1, lr=lr_at(s), seed=100 + s).loss for s in range(10)]
    assert sum(losses[-2:]) < 0.7 * sum(losses[:2]), losses


def test_nonfinite_loss_raises(fresh):
    model, tok = fresh
    # A real model whose final norm outputs NaN in train mode only: sampling (eval mode) works,
    # the loss pass produces NaN.
    model.get_decoder().norm.register_forward_hook(lambda mod, inp, out: out * float("nan") if mod.training else out)
    train = train_cfg(batch_size=4, micro_batch_size=4, max_new_tokens=16)
    opt, lr_at = make_optimizer(model, train)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(NonFiniteLoss, match="loss=nan"):
        em_step(model, tok, opt, [format_prompt(tok, "What is 1+2?")] * 4, train, step=1, lr=1e-3, seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no update applied


@pytest.mark.slow
def test_compiled_loss_pass_equals_the_eager_one_and_leaves_the_model_eager(fresh):
    """compiled_layers: the same entropy and the same gradient as eager (to float rounding), also
    for a second batch whose sequence length differs (the dynamic-shape graph); outside the context
    every layer is eager again, and a deep copy made inside it is eager."""
    from em_sweep.training.em import accumulate_entropy_gradients
    from em_sweep.training.loss_pass import compiled_layers, decoder_layers

    model, tok = fresh
    model.train()
    train = train_cfg(batch_size=8, micro_batch_size=4)
    texts = [format_prompt(tok, "What is 12+30-7+45?")] * 8
    for new_tokens in (24, 40):
        batch = sample_responses(model, tok, texts, SamplingSettings(temperature=1.0, max_new_tokens=new_tokens), 8,
                                 seed=new_tokens)
        results = []
        for compile_loss in (False, True):
            model.zero_grad(set_to_none=True)
            with compiled_layers(model, compile_loss):
                total = accumulate_entropy_gradients(model, batch, train, batch.response_mask.sum())
            results.append((float(total), {n: p.grad.clone() for n, p in model.named_parameters()}))
        (eager, g_eager), (compiled, g_compiled) = results
        assert compiled == pytest.approx(eager, rel=1e-5)
        for name, g in g_eager.items():
            assert float((g_compiled[name] - g).norm() / g.norm()) < 1e-4, name
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))
    with compiled_layers(model):
        copy_ = copy.deepcopy(model)
        assert all(layer._compiled_call_impl is not None for layer in decoder_layers(model))
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(model))
    assert all(layer._compiled_call_impl is None for layer in decoder_layers(copy_))


def test_em_step_runs_its_loss_pass_compiled_with_train_compile_loss(fresh, monkeypatch):
    """The setting reaches em_step: the step's loss (measured before its update) is the eager one."""
    from em_sweep.training import em

    model, tok = fresh
    texts = [format_prompt(tok, "What is 12+30-7+45?")] * 8
    entered = []
    real = em.compiled_layers

    def recording(model, enabled=True):  # the real context, recording whether it compiled
        entered.append(enabled)
        return real(model, enabled)

    monkeypatch.setattr(em, "compiled_layers", recording)
    losses = []
    for compile_loss in (False, True):
        m = copy.deepcopy(model)
        train = train_cfg(batch_size=8, micro_batch_size=4, max_new_tokens=24, compile_loss=compile_loss)
        opt, _ = make_optimizer(m, train)
        losses.append(em_step(m, tok, opt, texts, train, step=1, lr=1e-3, seed=24).loss)
    assert entered == [False, True]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)


def test_compile_loss_needs_a_decoder_layer_list():
    from transformers import GPT2Config, GPT2LMHeadModel

    from em_sweep.training.em import compiled_layers

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50, n_positions=32))
    with pytest.raises(ValueError, match="train.compile_loss=false"), compiled_layers(gpt2):
        pass


@pytest.mark.parametrize("case", ["one prompt", "two prompts", "checkpointing"])
def test_shared_prompt_pass_gives_the_full_pass_entropy_and_gradient(fresh, case, shared_passes):
    """train.share_prompt_pass: one-shot rows run their prompt once (keys/values repeated with
    autograd), also under gradient checkpointing (each layer of the rows' pass is recomputed in
    backward); rows with different prompts take the full pass. Either way the entropy and every
    gradient equal the full pass's."""
    from em_sweep.training import em

    model, tok = fresh
    questions = ["What is 12+30-7+45?"] * 8 if case != "two prompts" else ["What is 12+30-7+45?", "What is 3+4?"] * 4
    batch = sample_responses(model, tok, [format_prompt(tok, q) for q in questions],
                             SamplingSettings(temperature=1.0, max_new_tokens=30), 8, seed=0)
    if case == "checkpointing":
        set_checkpointing(model, True)
    model.train()
    layer_calls = []  # the first decoder layer's attention calls, forward and recomputed
    model.get_decoder().layers[0].self_attn.register_forward_pre_hook(lambda *_: layer_calls.append(1))
    results = []
    for share in (False, True):
        model.zero_grad(set_to_none=True)
        layer_calls.clear()
        total = em.accumulate_entropy_gradients(
            model, batch, train_cfg(batch_size=8, micro_batch_size=4, share_prompt_pass=share), batch.response_mask.sum())
        results.append((float(total), {n: p.grad.clone() for n, p in model.named_parameters()}))
        # per micro-batch: the full pass (+ its recomputation); shared: prompt, rows (+ rows recomputed)
        shares = share and case != "two prompts"
        assert len(layer_calls) == 2 * (1 + shares + (case == "checkpointing")), (share, len(layer_calls))
    assert shared_passes == ([] if case == "two prompts" else [True, True])  # both micro-batches shared
    assert bool(checkpointing_modules(model)) == (case == "checkpointing")  # the flags are back as they were
    (full, g_full), (shared, g_shared) = results
    assert shared == pytest.approx(full, rel=1e-5)
    for name, g in g_full.items():
        assert float((g_shared[name] - g).norm() / g.norm()) < 1e-4, name


@pytest.mark.slow
def test_compiled_loss_pass_compiles_per_variant_not_per_length(fresh):
    """Lengths change every step in a real run: they must not each cost a compile (Dynamo keeps 8
    entries per code object by default, then silently runs eager)."""
    import torch._dynamo.utils as dynamo_utils

    from em_sweep.training.em import accumulate_entropy_gradients, compiled_layers

    model, tok = fresh
    model.train()
    train = train_cfg(batch_size=8, micro_batch_size=4)
    one = [format_prompt(tok, "What is 12+30-7+45?")] * 8
    two = [format_prompt(tok, q) for q in ("What is 12+30-7+45?", "What is 3+4?")] * 4  # left padding
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    for i, (texts, new_tokens) in enumerate([(one, 20), (one, 27), (two, 33), (one, 41), (two, 18), (one, 35)]):
        batch = sample_responses(model, tok, texts, SamplingSettings(temperature=1.0, max_new_tokens=new_tokens), 8,
                                 seed=i)
        with compiled_layers(model):
            accumulate_entropy_gradients(model, batch, train, batch.response_mask.sum())
            with torch.no_grad():
                micro_batch_entropy_sum(model, batch, slice(0, 4), 0.5, 0)
    assert dynamo_utils.counters["stats"]["unique_graphs"] - before <= 5  # 4 here (mask or not x grad or not); 8 when lengths recompile


def test_shared_prompt_calls_stay_eager_under_compiled_layers(fresh):
    """With a KV cache argument Dynamo would compile a graph per layer and call, past any recompile
    limit: compiled_layers runs those calls eager, so the combination compiles nothing new."""
    import torch._dynamo.utils as dynamo_utils

    from em_sweep.training.em import accumulate_entropy_gradients, compiled_layers

    model, tok = fresh
    batch = sample_responses(model, tok, [format_prompt(tok, "What is 12+30-7+45?")] * 8,
                             SamplingSettings(temperature=1.0, max_new_tokens=30), 8, seed=5)
    model.train()
    before = dynamo_utils.counters["stats"]["unique_graphs"]
    with compiled_layers(model):
        accumulate_entropy_gradients(model, batch, train_cfg(batch_size=8, micro_batch_size=4, share_prompt_pass=True),
                                     batch.response_mask.sum())
    assert dynamo_utils.counters["stats"]["unique_graphs"] == before
