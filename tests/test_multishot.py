"""Multi-shot EM: a prompt config with N ids spreads them evenly over every training batch."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

import em_sweep.em
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


def test_a_multi_shot_run_samples_every_listed_prompt_evenly_in_each_batch(tmp_path, monkeypatch):
    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps({"id": i, "problem": q, "answer": None}) + "\n" for i, q in PROBLEMS.items()))
    seen: list[list[str]] = []
    real = em_sweep.em.sample_responses

    def recording(model, tokenizer, prompt_texts, *args, **kwargs):
        seen.append(list(prompt_texts))
        return real(model, tokenizer, prompt_texts, *args, **kwargs)

    monkeypatch.setattr(em_sweep.em, "sample_responses", recording)
    cfg = compose_config([f"paths.root={tmp_path}", "logger.mode=disabled", "prompt.name=multi",
                          f"prompt.pool={pool}", "prompt.ids=[m1,m2,m3]", "train.steps=2", "train.batch_size=6",
                          "train.micro_batch_size=3", "train.max_new_tokens=16", "eval.limit=4"])
    results = run(cfg)
    assert results["prompt"]["ids"] == ["m1", "m2", "m3"] and len(results["loss_curve"]) == 2
    assert len(seen) == 2  # one sampling call per EM step
    for texts in seen:
        per_problem = Counter(next(i for i, q in PROBLEMS.items() if q in t) for t in texts)
        assert per_problem == {"m1": 2, "m2": 2, "m3": 2}
    assert Path(results["run_dir"]).is_dir()
