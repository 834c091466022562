"""Reference-compatible EM (em_sweep.training.reference; train.step_unit=micro_step and friends) against a
direct transcription of the reference train.py loop."""

import copy

import pytest
import torch

from em_sweep.config import ConfigError, accumulation_steps, validate
from em_sweep.generation.sample import (
    SampleBatch,
    _eos_ids,
    position_ids_for,
    response_masks,
    sample_responses,
)
from em_sweep.prompts import format_prompt
from em_sweep.training import em
from em_sweep.training.em import Accumulation, em_step, make_optimizer, sampling_settings
from em_sweep.training.reference import RankBatch, rank_batches, reference_positions, row_weights
from tests.conftest import compose_config

PROMPT = "What is 12+30-7+45?"


def train_cfg(**overrides):
    return compose_config([f"train.{k}={v}" for k, v in overrides.items()]).train


def test_reference_positions_are_train_py_gen_mask():
    pad = 0
    # [left-padded prompt (width 3) | response | padding]; row 1 has a 2-token prompt.
    ids = torch.tensor([[5, 6, 7, 8, 9, 3, 0],    # full prompt, 3 generated then pad
                        [0, 6, 7, 8, 9, 9, 9]])   # ragged prompt, truncated response
    got = reference_positions(ids, prompt_width=3, pad_id=pad)
    # train.py: prompt_len = non-pad count of the prompt columns; gen_mask = (t >= prompt_len) & (seq != pad)
    expected = torch.tensor([[0, 0, 0, 1, 1, 1, 0],
                             [0, 0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(got, expected)  # row 1: a prompt position leaks in, the last (truncated) logit counts


def test_rank_batches_share_identically_seeded_ranks_within_a_micro_step():
    texts = ["a", "a", "a", "a", "b", "b", "a", "a"]  # 4 rank micro-batches of 2, 2 ranks per micro-step
    distinct, batches = rank_batches(texts, rank_batch_size=2, ranks=2, identical=True)
    assert distinct == ["a", "a", "b", "b", "a", "a"]
    assert batches == [RankBatch(slice(0, 2), 2), RankBatch(slice(2, 4), 1), RankBatch(slice(4, 6), 1)]
    distinct, batches = rank_batches(texts, rank_batch_size=2, ranks=2, identical=False)
    assert distinct == texts and [b.copies for b in batches] == [1, 1, 1, 1]


def test_row_weights_average_rank_token_means_and_clamp_empty_batches():
    positions = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [0, 0, 0]], dtype=torch.bool)
    batches = [RankBatch(slice(0, 2), 3), RankBatch(slice(2, 4), 1)]  # 3 tokens x3 copies; 0 tokens
    w = row_weights(positions, batches, "rank_token_mean")
    assert torch.allclose(w, torch.tensor([3 / (3 * 4), 3 / (3 * 4), 1 / (1 * 4), 1 / (1 * 4)]))
    w = row_weights(positions, batches, "batch_token_mean")
    assert torch.allclose(w, torch.tensor([3 / 9, 3 / 9, 1 / 9, 1 / 9]))


def reference_loss(model, seq: torch.Tensor, prompt_width: int, pad_id: int, tau: float) -> torch.Tensor:
    """train.py, line by line: one rank's micro-batch loss."""
    pad_mask = seq.ne(pad_id)
    prompt_len = pad_mask[:, :prompt_width].sum(-1)
    token_idx = torch.arange(seq.size(1))
    gen_mask = (token_idx.unsqueeze(0) >= prompt_len.unsqueeze(1)) & pad_mask
    logits = model(seq, attention_mask=pad_mask.long()).logits
    probs = torch.softmax(logits / tau, dim=-1)
    h_tok = -(probs * torch.log(probs + 1e-12)).sum(-1)
    return (h_tok * gen_mask).sum() / gen_mask.sum().clamp_min(1)


def ragged(batch, tok, lengths):
    """``batch`` with row i's response ended by EOS after ``lengths[i]`` tokens (then padding): rank
    micro-batches of different token counts, so the averaging rules differ."""
    p = batch.prompt_len
    responses = batch.input_ids[:, p:].clone()
    for i, n in enumerate(lengths):
        responses[i, n] = tok.eos_token_id
    attention, response, lengths_t, hit_eos = response_masks(responses, [tok.eos_token_id], batch.attention_mask[:, :p])
    responses = responses.masked_fill(~attention[:, p:].bool(), tok.pad_token_id)
    return SampleBatch(input_ids=torch.cat([batch.input_ids[:, :p], responses], dim=1), attention_mask=attention,
                       response_mask=response, prompt_len=p, response_lengths=lengths_t, texts=batch.texts,
                       hit_eos=hit_eos)


@pytest.mark.parametrize("step_unit", ["micro_step", "update"])
@pytest.mark.parametrize("rank_sampling, averaging, positions", [
    ("identical", "rank_token_mean", "reference"),
    ("independent", "rank_token_mean", "reference"),
    ("identical", "batch_token_mean", "reference"),
    ("independent", "batch_token_mean", "exact"),
])
def test_gradient_at_the_accumulation_boundary_is_the_reference_loops(tiny, monkeypatch, step_unit, rank_sampling,
                                                                        averaging, positions):
    """Fixed samples (drawn once, responses cut to different lengths so rank micro-batches differ in
    token count, served to em_step in order): at the update em-sweep's accumulated gradient equals the
    reference loop's: per rank and micro-step, the micro-batch's loss (train.py's token mean, or one token
    mean over the window's responses) backwarded, the ranks' gradients averaged (DeepSpeed's all-reduce)."""
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    ranks, per_rank, batch_size = 2, 2, 8  # accum = 8 // (2 * 2) = 2 micro-steps per update
    train = train_cfg(step_unit=step_unit, data_parallel_ranks=ranks, rank_batch_size=per_rank,
                      batch_size=batch_size, rank_sampling=rank_sampling, loss_averaging=averaging,
                      loss_positions=positions, micro_batch_size=1, grad_clip=1e9, max_new_tokens=24,
                      sample_temperature=1.0, loss_temperature=0.5)
    accum = 2
    distinct = per_rank if rank_sampling == "identical" else per_rank * ranks  # rows per micro-step
    text = format_prompt(tok, PROMPT)
    per_call = distinct if step_unit == "micro_step" else distinct * accum
    calls = accum if step_unit == "micro_step" else 1
    served = [ragged(sample_responses(model, tok, [text] * per_call, sampling_settings(train), 64, seed=10 + j), tok,
                     [3 + (5 * i + 7 * j) % 19 for i in range(per_call)]) for j in range(calls)]
    queue = list(served)
    monkeypatch.setattr(em, "sample_responses", lambda *a, **k: queue.pop(0))
    captured = {}
    real_update = em.apply_update

    def capture(optimizer, loss, grad_norm, step, lr):
        captured.update({n: p.grad.clone() for n, p in model.named_parameters()})
        real_update(optimizer, loss, grad_norm, step, lr)

    monkeypatch.setattr(em, "apply_update", capture)
    opt, _ = make_optimizer(model, train)
    before = copy.deepcopy(model)
    if step_unit == "micro_step":
        acc = Accumulation(accum)
        updated = [em_step(model, tok, opt, [text] * (per_rank * ranks), train, step=j + 1, lr=1e-3, seed=j,
                           accumulation=acc).updated for j in range(accum)]
        assert updated == [False, True]
    else:
        assert em_step(model, tok, opt, [text] * batch_size, train, step=1, lr=1e-3, seed=0).updated

    def micro_batch(j, r):
        """Rank r's rows at micro-step j of the fixed samples."""
        b = served[j] if step_unit == "micro_step" else served[0]
        first = (0 if step_unit == "micro_step" else j * distinct) + (0 if rank_sampling == "identical" else r * per_rank)
        return b, slice(first, first + per_rank)

    # The reference loop on the same samples.
    ref = before
    ref.train()
    pad = tok.pad_token_id
    window_tokens = sum(float(reference_positions(b.input_ids[rows], b.prompt_len, pad).sum()
                              if positions == "reference" else b.response_mask[rows].sum())
                        for b, rows in (micro_batch(j, r) for j in range(accum) for r in range(ranks)))
    rank_grads = []
    for r in range(ranks):
        ref.zero_grad(set_to_none=True)
        for j in range(accum):
            b, rows = micro_batch(j, r)
            if averaging == "rank_token_mean":  # train.py: token mean of the micro-batch, / accumulation
                (reference_loss(ref, b.input_ids[rows], b.prompt_len, pad, 0.5) / accum).backward()
            else:  # one token mean over every rank's window (em-sweep's rule, here with ranks)
                ids, attn = b.input_ids[rows], b.attention_mask[rows]
                mask = (reference_positions(ids, b.prompt_len, pad) if positions == "reference"
                        else b.response_mask[rows].bool())
                logits = ref(ids, attention_mask=attn, position_ids=position_ids_for(attn)).logits
                probs = torch.softmax(logits / 0.5, dim=-1)
                h_tok = -(probs * torch.log(probs + 1e-12)).sum(-1)
                (ranks * (h_tok * mask).sum() / window_tokens).backward()  # ranks: the all-reduce averages
        rank_grads.append({n: p.grad.clone() for n, p in ref.named_parameters()})
    expected = {n: sum(g[n] for g in rank_grads) / ranks for n in rank_grads[0]}
    for name, g in expected.items():  # float rounding only: the sums run in another order
        assert float((captured[name] - g).norm()) <= 1e-4 * float(g.norm()) + 1e-9, name
    assert any(float(g.abs().max()) > 0 for g in expected.values())


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
def test_reference_step_k_has_k_over_accumulation_updates(tiny, ranks):
    """batch 16, 2 responses per rank: accumulation 8, 4, 2, 1 micro-steps for 1, 2, 4, 8 ranks;
    8 reference steps are then 1, 2, 4, 8 optimizer updates (AdamW's own step count)."""
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    train = train_cfg(step_unit="micro_step", data_parallel_ranks=ranks, rank_batch_size=2, batch_size=16,
                      rank_sampling="identical", loss_averaging="rank_token_mean", loss_positions="reference",
                      max_new_tokens=8, steps=8)
    updates = []
    em.train_em(model, tok, [format_prompt(tok, PROMPT)], train, seed=1,
                on_step=lambda m: updates.append(m.updated))
    assert sum(updates) == 8 // (16 // (2 * ranks))
    assert all(m for m in updates[16 // (2 * ranks) - 1::16 // (2 * ranks)])  # at the boundaries


def test_update_mode_with_identical_ranks_samples_batch_over_ranks_distinct_responses(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    train = train_cfg(data_parallel_ranks=8, rank_sampling="identical", batch_size=64, max_new_tokens=8)
    opt, _ = make_optimizer(model, train)
    m = em_step(model, tok, opt, [format_prompt(tok, PROMPT)] * 64, train, step=1, lr=1e-4, seed=0)
    assert m.responses == 8 and m.updated


def test_stop_tokens_generation_config_ignores_the_tokenizers_eos(tiny):
    model, tok = copy.deepcopy(tiny[0]), tiny[1]
    model.generation_config.eos_token_id = tok.pad_token_id  # a model whose own EOS differs from the tokenizer's
    assert _eos_ids(model, tok, True) == [tok.pad_token_id, tok.eos_token_id]
    assert _eos_ids(model, tok, False) == [tok.pad_token_id]
    assert not sampling_settings(train_cfg(stop_tokens="generation_config")).stop_on_tokenizer_eos


@pytest.mark.parametrize("override, key", [
    ("train.step_unit=epoch", "train.step_unit"),
    ("train.rank_sampling=same", "train.rank_sampling"),
    ("train.loss_averaging=mean", "train.loss_averaging"),
    ("train.loss_positions=shifted", "train.loss_positions"),
    ("train.stop_tokens=eos", "train.stop_tokens"),
    ("train.data_parallel_ranks=0", "train.data_parallel_ranks"),
    ("train.data_parallel_ranks=3", "train.batch_size"),
])
def test_reference_keys_are_checked(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_config([override]))


def test_preset_reproduces_the_reference_settings():
    cfg = compose_config(["+experiment=one_shot_em_reference"])
    t = cfg.train
    assert (t.step_unit, t.data_parallel_ranks, t.rank_batch_size, t.rank_sampling, t.loss_averaging,
            t.loss_positions, t.top_k, t.stop_tokens, t.steps) == (
        "micro_step", 8, 2, "identical", "rank_token_mean", "reference", 50, "generation_config", 10)
    assert accumulation_steps(t) == 4  # reference step 10 = 2 optimizer updates
    validate(cfg)


def test_a_reference_run_records_updates_and_its_report_names_the_step_unit(tmp_path):
    """Through the real run and report: 2 emulated ranks x 2 responses, batch 16 -> an update every
    4 reference steps; scores, loss curve and results say so, and the step-curve finding's axis
    names reference steps with the updates behind each."""
    from em_sweep.analysis import report as rep
    from em_sweep.analysis.collect import collect
    from em_sweep.run import run

    cfg = compose_config(["+experiment=one_shot_em_reference", f"paths.root={tmp_path}", "logger.mode=disabled",
                          "train.data_parallel_ranks=2", "train.batch_size=16", "train.micro_batch_size=4", "train.steps=8",
                          "train.max_new_tokens=8", "eval.at_steps=[0,4,6]", "eval.limit=20"])
    results = run(cfg)
    assert results["step_unit"] == "micro_step" and results["updates"] == 2
    assert [(s["step"], s["updates"]) for s in results["scores"]] == [(0, 0), (4, 1), (6, 1), (8, 2)]
    assert [r["updates"] for r in results["loss_curve"]] == [0, 0, 0, 1, 1, 1, 1, 2]
    c = collect(tmp_path, progress=False)
    finding = rep.finding_step_curve(rep.prepare(c.scores, c.train))
    text = "\n".join(finding.lines)
    assert rep.REFERENCE_STEP_AXIS in text and "step 4 = 1, step 6 = 1, step 8 = 2" in text


def test_default_step_accepts_any_batch_and_fsdp_refuses_the_reference_semantics():
    validate(compose_config(["train.batch_size=3", "train.micro_batch_size=1"]))  # one rank, one update
    for override in ("train.loss_averaging=rank_token_mean", "train.loss_positions=reference",
                     "train.rank_sampling=identical", "train.step_unit=micro_step"):
        with pytest.raises(ConfigError, match=r"^train\.parallel: fsdp runs em-sweep's own step"):
            validate(compose_config(["train.parallel=fsdp", "train.micro_batch_size=8", override]))
