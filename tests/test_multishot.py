"""Multi-shot EM: a prompt config with N ids spreads them evenly over every training batch."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import em_sweep.training.em
from em_sweep.prompts import PoolItem, batch_prompts
from em_sweep.run import run
from tests.conftest import compose_config

PROBLEMS = {"m1": "What is 12+7?", "m2": "What is 48-9+3?", "m3": "Compute 61+25-14+8."}


@pytest.mark.parametrize("n, batch", [(1, 5), (3, 6), (4, 6), (6, 4)])
def test_batch_prompts_is_as_even_as_the_batch_allows(n, batch):
    prompts = [PoolItem(f"p{i}", f"q{i}", None) for i in range(n)]
    counts = Counter(p.id for p in batch_prompts(prompts, batch))
    assert sum(counts.values()) == batch
    assert len(counts) == min(n, batch)  # every prompt is used once the batch has room for it
    assert max(counts.values()) - min(counts.values()) <= 1


def test_more_prompts_than_slots_cycle_through_the_set_step_by_step():
    prompts = [f"p{i}" for i in range(5)]
    batches = [batch_prompts(prompts, 2, step) for step in range(5)]
    assert batches[:3] == [["p0", "p1"], ["p2", "p3"], ["p4", "p0"]]
    assert Counter(p for b in batches for p in b) == dict.fromkeys(prompts, 2)  # 5 steps: each prompt twice
    assert batch_prompts(prompts[:2], 4, step=3) == ["p0", "p1", "p0", "p1"]  # room for all: every step the same


@pytest.mark.parametrize("batch, steps", [(6, 2), (2, 3)])
def test_a_multi_shot_run_samples_every_listed_prompt_evenly(tmp_path, monkeypatch, batch, steps):
    """Every listed prompt is trained on: evenly in each batch where the batch has room for all,
    else over the steps (3 prompts, batches of 2: m1 m2 | m3 m1 | m2 m3)."""
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": i, "problem": q, "answer": None}) + "\n" for i, q in PROBLEMS.items()))
    seen: list[list[str]] = []
    real = em_sweep.training.em.sample_responses

    def recording(model, tokenizer, prompt_texts, *args, **kwargs):
        seen.append(list(prompt_texts))
        return real(model, tokenizer, prompt_texts, *args, **kwargs)

    monkeypatch.setattr(em_sweep.training.em, "sample_responses", recording)
    cfg = compose_config([f"paths.root={tmp_path}", "logger.mode=disabled", "prompt.name=multi",
                          f"prompt.pool={pool}", "prompt.ids=[m1,m2,m3]", f"train.steps={steps}",
                          f"train.batch_size={batch}", "train.micro_batch_size=2", "train.max_new_tokens=16",
                          "eval.limit=4"])
    results = run(cfg)
    assert results["prompt"]["ids"] == ["m1", "m2", "m3"] and len(results["loss_curve"]) == steps
    assert len(seen) == steps  # one sampling call per EM step
    per_step = [[next(i for i, q in PROBLEMS.items() if q in t) for t in texts] for texts in seen]
    if batch == 6:
        assert all(Counter(ids) == {"m1": 2, "m2": 2, "m3": 2} for ids in per_step)
    else:
        assert per_step == [["m1", "m2"], ["m3", "m1"], ["m2", "m3"]]
    assert Path(results["run_dir"]).is_dir()
