"""Shared fixtures: the shipped tiny model (real weights, real tokenizer) and Hydra composition."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

import em_sweep.config  # noqa: F401  (registers the schema)
from em_sweep.models import ModelCache

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)


def compose_config(overrides: list[str] | None = None):
    """The real config.yaml composed with overrides, as launch.py would see it."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides or [])


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the shipped default model, loaded once per session."""
    cfg = compose_config()
    return ModelCache().get(cfg.model)


@pytest.fixture()
def shared_passes(monkeypatch):
    """For each call of loss_pass._shared_prompt_hidden (the real one), whether it ran the prompt once
    (False: this decoder fell back to the full pass)."""
    from em_sweep.training import loss_pass

    real, outcomes = loss_pass._shared_prompt_hidden, []

    def counted(*args):
        hidden = real(*args)
        outcomes.append(hidden is not None)
        return hidden

    monkeypatch.setattr(loss_pass, "_shared_prompt_hidden", counted)
    return outcomes
