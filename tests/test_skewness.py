"""Logits skewness: streaming moments equal scipy on the same values, memory stays bounded, CLI end to end."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.stats
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import Qwen2Config, Qwen2ForCausalLM

from em_sweep.analysis.skewness import (
    Histogram,
    Moments,
    ScoredResponses,
    merge_moments,
    model_label,
    reference_prompt_texts,
    reference_record,
    reference_values,
    response_logits,
    sample_scored,
    shortest_length,
    stream_statistics,
)
from em_sweep.config import ConfigError, RawLogitsConfig, ReferenceLogitsConfig, validate_logits
from em_sweep.generation.sample import SampleBatch
from tests.conftest import ROOT

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
        from em_sweep.generation.sample import position_ids_for
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


def compose_logits(*overrides: str):
    """The `em-sweep logits` config composed by the command's own composition."""
    from em_sweep.cli import compose

    return compose(list(overrides), "logits")


def test_logits_keys_compose_as_hydra_overrides_and_bad_ones_are_named():
    from omegaconf import OmegaConf

    cfg = compose_logits("logits.models=[tiny_arith,outputs/runs/abc/checkpoints/step-10]", "logits.n_responses=3",
                         "logits.range=[-5,5]", "logits.divide_by_temperature=true", "model=tiny_arith",
                         "paths.root=/data")
    s = OmegaConf.to_object(cfg.logits)
    assert isinstance(s, RawLogitsConfig)
    assert s.models == ["tiny_arith", "outputs/runs/abc/checkpoints/step-10"]
    assert (s.n_responses, s.range, s.divide_by_temperature, s.temperature, s.max_new_tokens) == (
        3, [-5.0, 5.0], True, 0.6, 500)
    # Raw defaults follow the run config's evaluation settings; outputs derive from paths.root.
    assert (s.benchmark, s.template, s.seed, s.out_dir) == (cfg.eval.benchmarks[0], cfg.eval.template,
                                                            cfg.eval.seed, "/data/logits")
    validate_logits(s)
    for bad, key in ((("logits.n_responses=0",), "logits.n_responses"), (("logits.range=[3,1]",), "logits.range"),
                     (("logits.temperature=0",), "logits.temperature"), ((), "logits.models")):
        models = () if key == "logits.models" else ("logits.models=[a]",)
        with pytest.raises(ConfigError, match=key):
            validate_logits(OmegaConf.to_object(compose_logits(*models, *bad).logits))
    assert model_label("outputs/runs/0123456789abcdef/checkpoints/step-10") == "0123456789/step-10"
    assert model_label("tiny_arith") == "tiny_arith"


def test_logits_command_reports_bad_models_in_one_line(tmp_path, capsys):
    from em_sweep.cli import main

    out = f"logits.out_dir={tmp_path}"
    for argv, message in ((["logits.models=[/no/such/model]"], "/no/such/model"),
                          (["logits.models=[a]", "model=nosuch"], "nosuch"),
                          (["logits.n_responses=2"], "logits.models"),
                          (["logits=reference", "logits.models=[tiny_arith]", "logits.pool=no_such_pool"],
                           "no_such_pool")):
        with pytest.raises(SystemExit) as done:
            main(["logits", *argv, out])
        assert done.value.code == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert not list(tmp_path.iterdir())


# ---------------------------------------------------------------- reference method (logits_shift.py)

def logits_shift_direct(per_model: dict[str, list[list[np.ndarray]]]) -> dict[str, dict]:
    """A direct transcription of what the reference's logits_shift.py computes from ``output.scores``
    (one list of per-step score vectors per response, per model): min_len over every response of
    every model, truncation, nan_to_num, ``!= 0``, then mean, std, scipy skew and a 50-bin histogram."""
    min_len = min(len(steps) for responses in per_model.values() for steps in responses)
    out = {}
    for name, responses in per_model.items():
        logits_all = np.stack([np.stack(steps[:min_len]) for steps in responses])
        logits_all = np.nan_to_num(logits_all, nan=0.0, posinf=0.0, neginf=0.0)
        flat = logits_all[logits_all != 0].flatten()
        counts, edges = np.histogram(flat, bins=50)
        out[name] = {"min_len": min_len, "n": flat.size, "mean": flat.mean(), "std": flat.std(),
                     "skew": scipy.stats.skew(flat), "counts": counts, "edges": edges}
    return out


def handmade_scores(seed: int, lengths: list[int], vocab: int = 40, top_k: int = 6) -> list[list[np.ndarray]]:
    """Processed scores as generate writes them: logits / 0.6, all but the top k at -inf; with an
    exact 0.0 among the kept scores, a nan and a +inf, which the reference also turns into 0 and drops."""
    rng = np.random.default_rng(seed)
    responses = []
    for n in lengths:
        steps = []
        for _ in range(n):
            scores = (rng.gamma(2.0, 2.0, size=vocab) - 3.0).astype(np.float32) / np.float32(0.6)
            kth = np.sort(scores)[-top_k]
            scores[scores < kth] = -np.inf
            steps.append(scores)
        responses.append(steps)
    kept = np.flatnonzero(np.isfinite(responses[0][0]))
    responses[0][0][kept[0]] = 0.0
    responses[0][1][kept[1]] = np.nan
    responses[-1][0][kept[2]] = np.inf
    return responses


def test_reference_statistics_equal_a_direct_implementation_of_logits_shift():
    per_model = {"base": handmade_scores(0, [7, 5, 9]), "em": handmade_scores(1, [4, 8, 6])}
    expected = logits_shift_direct(per_model)
    scored = {name: ScoredResponses([[reference_values(torch.from_numpy(s)) for s in steps] for steps in responses],
                                    [True] * len(responses))
              for name, responses in per_model.items()}
    length = shortest_length(scored.values())
    assert length == 4 == expected["base"]["min_len"]  # the shortest response of either model
    settings = ReferenceLogitsConfig(bins=50)
    for name, s in scored.items():
        record = reference_record(s, settings, length)
        e = expected[name]
        assert record["n_values"] == e["n"] and record["truncated_to"] == 4
        assert record["skewness"] == pytest.approx(e["skew"], rel=1e-6)
        assert record["mean"] == pytest.approx(e["mean"], rel=1e-6)
        assert record["std"] == pytest.approx(e["std"], rel=1e-6)
        assert record["histogram"]["edges"] == pytest.approx(e["edges"].tolist(), rel=1e-6)
        assert np.abs(np.array(record["histogram"]["counts"]) - e["counts"]).sum() <= 2  # bin-edge rounding only
    # The dropped entries: the filtered -inf, the exact 0.0, nan and +inf.
    assert reference_values(torch.tensor([1.5, float("-inf"), 0.0, float("nan"), float("inf"), -2.0])).tolist() == [
        1.5, -2.0]
    # Without truncation every position counts.
    full = reference_record(scored["em"], settings, None)
    assert full["truncated_to"] is None and full["response_lengths"] == [4, 8, 6]
    assert full["n_values"] == sum(v.numel() for v in scored["em"].values())


@pytest.mark.parametrize("batch", [1, 3])
def test_reference_sampling_keeps_the_processed_scores_of_every_generated_position(tiny, batch):
    """The scores kept per position are the model's logits / T with all but the top k removed,
    recomputed here directly from a teacher-forced forward pass over each response."""
    model, tokenizer = tiny
    problems = ["What is 12+7?", "Compute 61+25-14+8.", "What is 5+5?"]
    texts = reference_prompt_texts(tokenizer, problems, " Answer briefly.")
    settings = ReferenceLogitsConfig(max_new_tokens=12, sample_batch_size=batch, top_k=5)
    scored = sample_scored(model, tokenizer, texts, settings)
    assert len(scored.steps) == 3 and all(1 <= n <= 12 for n in scored.lengths)
    eos = model.generation_config.eos_token_id
    for text, steps, tokens, hit in zip(texts, scored.steps, scored.token_ids, scored.hit_eos, strict=True):
        assert len(steps) == len(tokens) and hit == (tokens[-1] == eos) and (hit or len(tokens) == 12)
        # tokenizer(text) with its special tokens, as the reference tokenizes, then the response.
        prompt = tokenizer(text)["input_ids"]
        ids = torch.tensor([prompt + tokens])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, len(prompt) - 1:-1].float() / settings.temperature
        kth = torch.topk(logits, settings.top_k, dim=-1).values[:, -1:]
        direct = torch.where(logits < kth, torch.tensor(float("-inf")), logits)
        for t, kept in enumerate(steps):
            assert kept.numel() == settings.top_k
            torch.testing.assert_close(kept, reference_values(direct[t]), rtol=1e-4, atol=1e-4)
    assert len(scored.texts) == 3


def test_reference_prompts_and_defaults_are_the_reference_scripts():
    from em_sweep.prompts import load_pool

    s = ReferenceLogitsConfig()
    # logits_shift.py: NUM_SAMPLES = 20, MAX_NEW_TOKENS = 500, TEMPERATURE = 0.6, torch.manual_seed(42),
    # ax.hist(..., bins=50), generate's top_k default of 50; dsr_sub.parquet's first rows.
    assert (s.n_responses, s.max_new_tokens, s.temperature, s.seed, s.bins, s.top_k, s.top_p) == (
        20, 500, 0.6, 42, 50, 50, 1.0)
    assert s.pool == "dsr_sub" and s.truncate_to_shortest and s.sample_batch_size == 1
    assert list(load_pool(s.pool))[:3] == ["dsr0", "dsr1", "dsr2"]
    # The parquet's user turn: the problem, a space, then DeepScaleR's instruction.
    assert s.instruction == " Let's think step by step and output the final answer within \\boxed{}."

    class Template:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, **kwargs):
            assert not tokenize and "add_generation_prompt" not in kwargs
            return repr(messages)

    assert reference_prompt_texts(Template(), ["Q?"], s.instruction) == [
        repr([{"role": "user", "content": "Q?" + s.instruction}])]


@pytest.mark.slow
def test_logits_command_end_to_end_with_both_methods(tmp_path):
    """The real console entry point on the shipped model: each record states its method; the
    reference method cuts every response of every model to the shortest one."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    tiny_path = ROOT / "em_sweep" / "assets" / "tiny-arith"
    for method, extra in (("reference", []), ("raw", ["logits.bins=20"])):
        out = tmp_path / method
        proc = subprocess.run([sys.executable, "-m", "em_sweep.cli", "logits", f"logits={method}",
                               f"logits.models=[tiny_arith,{tiny_path}]", "logits.n_responses=3",
                               "logits.max_new_tokens=12", f"logits.out_dir={out}", *extra],
                              capture_output=True, text=True, timeout=600, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        records = json.loads((out / "skewness.json").read_text())
        assert [r["model"] for r in records] == ["tiny_arith", str(tiny_path)]
        assert {r["method"] for r in records} == {method} and records[0]["settings"]["method"] == method
        assert all(r["n_values"] > 0 and r["n_responses"] == 3 for r in records)
        assert (out / "histogram.png").stat().st_size > 0
        if method == "reference":
            shortest = min(n for r in records for n in r["response_lengths"])
            assert all(r["truncated_to"] == shortest for r in records)
            # top_k 50 of the 259-token vocabulary at each of the shortest response's positions
            assert all(r["n_values"] == pytest.approx(3 * shortest * 50, rel=0.02) for r in records)
            assert len(records[0]["histogram"]["counts"]) == 50
        else:
            assert len(records[0]["histogram"]["counts"]) == 20 and "truncated_to" not in records[0]
