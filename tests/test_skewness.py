"""Logits skewness: streaming moments equal scipy on the same values, memory stays bounded, CLI end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen2Config, Qwen2ForCausalLM

from em_sweep.sample import SampleBatch
from em_sweep.skewness import (
    Histogram,
    LogitsArgumentError,
    LogitsSettings,
    Moments,
    merge_moments,
    model_label,
    parse_arguments,
    response_logits,
    stream_statistics,
)

VOCAB = 96


def test_merged_moments_equal_scipy_on_uneven_shifted_chunks():
    rng = np.random.default_rng(0)
    # Large common offset and a skewed shape: the case where naive power sums lose digits.
    values = 1e4 + rng.gamma(2.0, 3.0, size=10_007)
    acc = Moments()
    for chunk in np.split(values, [1, 2, 50, 51, 3000, 9000]):
        acc = merge_moments(acc, Moments.of(torch.from_numpy(chunk)))
    assert acc.n == values.size
    assert acc.mean == pytest.approx(values.mean(), rel=1e-12)
    assert acc.variance == pytest.approx(values.var(), rel=1e-9)
    assert acc.skewness == pytest.approx(scipy.stats.skew(values), rel=1e-6)
    # Merging is symmetric and the empty set is neutral.
    a, b = Moments.of(torch.from_numpy(values[:10])), Moments.of(torch.from_numpy(values[10:]))
    assert merge_moments(b, a).skewness == pytest.approx(merge_moments(a, b).skewness, rel=1e-9)
    assert merge_moments(Moments(), a) == a and merge_moments(a, Moments()) == a


def test_constant_values_have_no_skewness_and_scale_does_not_change_it():
    assert math.isnan(Moments.of(torch.full((5,), 3.0)).skewness)
    x = torch.tensor([0.0, 1.0, 1.0, 5.0], dtype=torch.float64)
    assert Moments.of(x / 0.6).skewness == pytest.approx(Moments.of(x).skewness, rel=1e-12)


def test_histogram_counts_every_value_in_fixed_bins():
    h = Histogram(0.0, 4.0, 4)
    h.add(torch.tensor([-1.0, 0.0, 0.5, 1.0, 3.9, 4.0, 7.0]))
    h.add(torch.tensor([2.5]))
    assert h.counts == [2, 1, 1, 2] and h.underflow == 1 and h.overflow == 1
    assert h.edges == [0.0, 1.0, 2.0, 3.0, 4.0]
    flat = Histogram(2.0, 2.0, 3)  # all values equal
    flat.add(torch.tensor([2.0, 2.0]))
    assert sum(flat.counts) == 2


@pytest.fixture(scope="module")
def random_model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return Qwen2ForCausalLM(cfg).eval()


def ragged_batch(rows: int = 7, prompt_len: int = 5, length: int = 9) -> SampleBatch:
    """Left-padded ragged prompts, responses of different lengths, as sample_responses lays them out."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (rows, prompt_len + length), generator=g)
    prompt_lens = [prompt_len - (r % 3) for r in range(rows)]
    resp_lens = [1 + (3 * r) % length for r in range(rows)]
    attn = torch.zeros_like(ids)
    resp = torch.zeros_like(ids)
    for r in range(rows):
        attn[r, prompt_len - prompt_lens[r]:prompt_len + resp_lens[r]] = 1
        resp[r, prompt_len - 1:prompt_len - 1 + resp_lens[r]] = 1
    return SampleBatch(ids, attn, resp, prompt_len, torch.tensor(resp_lens), [""] * rows,
                       torch.zeros(rows, dtype=torch.bool))


def test_response_logits_are_exactly_the_logits_that_produced_the_responses(random_model):
    batch = ragged_batch()
    streamed = torch.cat(list(response_logits(random_model, batch, micro_batch_size=3)))
    with torch.no_grad():
        from em_sweep.sample import position_ids_for
        full = random_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                            position_ids=position_ids_for(batch.attention_mask)).logits
    expected = full[batch.response_mask.bool()]
    assert streamed.shape == expected.shape == (int(batch.response_lengths.sum()), VOCAB)
    torch.testing.assert_close(streamed, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 1 / 0.6])
def test_streaming_skewness_equals_scipy_on_the_same_logits(random_model, scale):
    batch = ragged_batch()
    values = torch.cat(list(response_logits(random_model, batch, 2))).double().numpy().ravel() * scale
    stats = stream_statistics(lambda: response_logits(random_model, batch, 2), bins=50, scale=scale,
                              chunk_values=3 * VOCAB)
    assert stats.moments.n == values.size
    assert stats.moments.skewness == pytest.approx(scipy.stats.skew(values), rel=1e-6)
    assert stats.moments.mean == pytest.approx(values.mean(), rel=1e-6)
    assert stats.moments.std == pytest.approx(values.std(), rel=1e-6)
    assert (stats.minimum, stats.maximum) == pytest.approx((values.min(), values.max()))
    counts, _ = np.histogram(values, bins=50, range=(values.min(), values.max()))
    assert sum(stats.histogram.counts) == values.size
    assert np.abs(np.array(stats.histogram.counts) - counts).sum() <= 2  # bin-edge rounding only


class LargestVocabTensor(TorchDispatchMode):
    """Records the largest tensor with a vocabulary-sized last dimension that any op produces."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, tuple | list) else (out,):
            if isinstance(t, torch.Tensor) and t.dim() and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.numel())
        return out


def test_memory_stays_bounded_by_one_micro_batch_of_logits(random_model):
    batch = ragged_batch(rows=12)
    micro = 3
    bound = micro * batch.input_ids.shape[1] * VOCAB  # one micro-batch's full logits
    with LargestVocabTensor(VOCAB) as probe:
        stats = stream_statistics(lambda: response_logits(random_model, batch, micro), bins=20,
                                  chunk_values=4 * VOCAB)
    assert probe.largest > 0
    assert probe.largest <= bound, (probe.largest, bound)
    assert stats.moments.n > bound  # more values streamed than one micro-batch's logits could hold
    assert len(stats.histogram.counts) == 20


def test_arguments_parse_and_bad_ones_are_named():
    models, s, overrides = parse_arguments(
        ["models=[tiny_arith,outputs/runs/abc/checkpoints/step-10]", "n=3", "range=[-5,5]",
         "divide_by_temperature=true", "model=tiny_arith"], LogitsSettings())
    assert models == ["tiny_arith", "outputs/runs/abc/checkpoints/step-10"]
    assert (s.n_responses, s.range, s.divide_by_temperature, s.temperature, s.max_new_tokens) == (
        3, (-5.0, 5.0), True, 0.6, 500)
    assert overrides == ["model=tiny_arith"]
    for bad, message in ((["n=3"], "models="), (["models=[a]", "n=x"], "n='x'"),
                         (["models=[a]", "range=[3,1]"], "range="), (["models=[a]", "temperature=0"], "temperature"),
                         (["models"], "key=value")):
        with pytest.raises(LogitsArgumentError, match=message):
            parse_arguments(bad, LogitsSettings())
    assert model_label("outputs/runs/0123456789abcdef/checkpoints/step-10") == "0123456789/step-10"
    assert model_label("tiny_arith") == "tiny_arith"


def test_logits_command_reports_bad_models_in_one_line(tmp_path, capsys):
    from em_sweep.cli import main

    for argv, message in ((["models=[/no/such/model]"], "/no/such/model"), (["models=[a]", "model=nosuch"], "nosuch"),
                          (["n=2"], "models=")):
        with pytest.raises(SystemExit) as done:
            main(["logits", *argv, "--out-dir", str(tmp_path)])
        assert done.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())
