import pytest
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from em_sweep.config import ConfigError, validate
from tests.conftest import compose_config


def test_defaults_compose_and_validate():
    cfg = compose_config()
    validate(cfg)
    assert cfg.model.name == "tiny_arith"
    # Sampling and loss temperatures follow the top-level temperature unless set on their own.
    assert cfg.train.sample_temperature == cfg.train.loss_temperature == cfg.temperature == 0.5
    cfg = compose_config(["temperature=0.9", "train.loss_temperature=0.3"])
    assert cfg.train.sample_temperature == 0.9 and cfg.train.loss_temperature == 0.3


def test_model_presets_carry_their_own_learning_rate():
    lrs = {}
    for name in ("qwen25_math_1_5b", "qwen25_math_7b", "qwen25_7b_instruct", "llama31_8b_instruct", "tiny_arith"):
        cfg = compose_config([f"model={name}"])
        lrs[name] = cfg.train.lr
        assert cfg.train.lr == cfg.model.lr
    assert lrs["qwen25_math_1_5b"] < lrs["qwen25_math_7b"]
    real = compose_config(["model=qwen25_math_7b", "prompt=pi1"])
    # Real models get the paper's reference settings (MISSION.md s1, s3).
    assert real.model.path == "Qwen/Qwen2.5-Math-7B"
    assert (real.train.top_p, real.train.repetition_penalty, real.train.max_new_tokens) == (0.95, 1.15, 512)
    assert real.eval.max_new_tokens == 3072 and real.eval.template == "qwen25-math-cot"
    assert list(real.eval.benchmarks) == ["math500", "minerva_math", "olympiadbench", "amc23"]


@pytest.mark.parametrize("override, key", [("train.stpes=3", "stpes"), ("model.pth=x", "pth"),
                                           ("train.steps=abc", "steps"), ("temperature=hot", "temperature")])
def test_misspelt_key_or_wrong_type_fails_at_compose_time(override, key):
    with pytest.raises(ConfigCompositionException) as info:
        compose_config([override])
    assert key in str(info.value) + str(info.value.__cause__)


@pytest.mark.parametrize("overrides, key", [
    (["train.steps=-1"], "train.steps"),
    (["train.batch_size=10", "train.micro_batch_size=4"], "train.batch_size"),
    (["train.loss_temperature=0"], "train.loss_temperature"),
    (["temperature=-0.5"], "train.sample_temperature"),
    (["train.top_p=1.5"], "train.top_p"),
    (["eval.template=fancy"], "eval.template"),
    (["logger.mode=sometimes"], "logger.mode"),
    (["prompt.ids=[]"], "prompt.ids"),
])
def test_invalid_values_name_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_config(overrides))


def test_interpolated_lr_is_resolved_in_the_recorded_config():
    cfg = compose_config(["model.lr=3e-4"])
    assert OmegaConf.to_container(cfg, resolve=True)["train"]["lr"] == 3e-4


@pytest.mark.parametrize("overrides, key", [
    (["train.steps=5", "eval.at_steps=[0,10]"], "eval.at_steps"),
    (["train.steps=5", "train.save_at_steps=[6]"], "train.save_at_steps"),
])
def test_schedules_past_the_last_step_are_rejected(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(compose_config(overrides))
