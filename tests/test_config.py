import importlib.util

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
    # Real models get the paper's reference settings (docs/method.md, section 2).
    assert real.model.path == "Qwen/Qwen2.5-Math-7B"
    assert (real.train.top_p, real.train.repetition_penalty, real.train.max_new_tokens) == (0.95, 1.15, 512)
    assert real.eval.max_new_tokens == 3072 and real.eval.template == "qwen25-math-cot"
    assert list(real.eval.benchmarks) == ["math500", "minerva_math", "olympiadbench", "amc23"]
    # The 7B preset carries the GPU settings measured to fit one 80 GB card at < 10 s a step,
    # and a command-line override still wins over them.
    assert (real.train.generation_backend, real.train.loss_chunk_tokens) == ("static_compile", 2048)
    assert real.model.gradient_checkpointing is True
    other = compose_config(["model=qwen25_math_7b", "train.generation_backend=static"])
    assert other.train.generation_backend == "static"


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
    (["eval.pass_k=[0]"], "eval.pass_k"),
    (["eval.code_timeout_s=0"], "eval.code_timeout_s"),
    (["eval.code_memory_mb=10"], "eval.code_memory_mb"),
    (["eval.code_workers=0"], "eval.code_workers"),
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


def _bench(tmp_path, rows, **fields):
    path = tmp_path / "b.jsonl"
    path.write_text("".join(r + "\n" for r in rows))
    entry = {"name": "mine", "path": str(path), "question_field": "q", "answer_field": "a", **fields}
    return "eval.benchmarks=[" + "{" + ",".join(f"{k}:{v}" for k, v in entry.items() if v is not None) + "}]"


GOOD_ROWS = ['{"q": "1+1?", "a": "2"}', '{"q": "2+2?", "a": "4"}']


@pytest.mark.parametrize("rows, fields, fragment", [
    (GOOD_ROWS, {"path": "/nonexistent/mine.jsonl"}, "file not found: /nonexistent/mine.jsonl"),
    (GOOD_ROWS, {"answer_field": None}, "missing required keys answer_field"),
    (GOOD_ROWS, {"path": None}, "missing required keys path (or file)"),
    (GOOD_ROWS, {"colour": "red"}, "unknown keys colour"),
    (GOOD_ROWS, {"answer_format": "boxed"}, "answer_format 'boxed'"),
    ([GOOD_ROWS[0], '{"q": "2+2?", "a": '], {}, "line 2: invalid JSON"),
    ([GOOD_ROWS[0], '{"q": "2+2?"}'], {}, "line 2: missing field 'a'"),
    (GOOD_ROWS, {"id_field": "uid"}, "line 1: missing field 'uid'"),
    (GOOD_ROWS, {"name": "math500"}, "'math500' is taken"),
    (GOOD_ROWS, {"name": "avg4"}, "'avg4' is taken"),
    (GOOD_ROWS, {"name": "'my bench'"}, "'my bench' must be"),
])
def test_custom_benchmark_errors_are_one_line_naming_the_problem(tmp_path, rows, fields, fragment):
    override = _bench(tmp_path, rows, **fields)
    with pytest.raises(ConfigError) as info:
        validate(compose_config([override]))
    message = str(info.value)
    assert message.startswith("eval.benchmarks: ") and "\n" not in message
    assert fragment in message, message
    if "line" in fragment:
        assert str(tmp_path / "b.jsonl") in message


@pytest.mark.parametrize("benchmarks, fragment", [
    ("[arith,nosuchbench]", "unknown benchmark 'nosuchbench'"),
    ("[arith,arith]", "'arith' is listed twice"),
    ("[]", "needs at least one"),
])
def test_benchmark_names_are_checked(benchmarks, fragment):
    with pytest.raises(ConfigError, match=fragment):
        validate(compose_config([f"eval.benchmarks={benchmarks}"]))


def test_two_custom_benchmarks_with_one_name_are_rejected(tmp_path):
    entry = _bench(tmp_path, GOOD_ROWS).removeprefix("eval.benchmarks=[").removesuffix("]")
    with pytest.raises(ConfigError, match="'mine' is listed twice"):
        validate(compose_config([f"eval.benchmarks=[{entry},{entry}]"]))
    validate(compose_config([f"eval.benchmarks=[arith,{entry}]"]))


def test_eval_backend_choices():
    validate(compose_config(["eval.backend=hf"]))
    with pytest.raises(ConfigError, match=r"eval\.backend: unknown 'tgi'"):
        validate(compose_config(["eval.backend=tgi"]))
    # vLLM loads the saved weights: a run that trains in memory cannot use it (checked before import).
    with pytest.raises(ConfigError, match=r"eval\.backend: vllm scores the saved model\.path only.*train\.steps=10"):
        validate(compose_config(["eval.backend=vllm", "train.steps=10"]))


@pytest.mark.skipif(importlib.util.find_spec("vllm") is not None, reason="vLLM is installed here")
def test_eval_backend_vllm_without_vllm_says_how_to_install():
    with pytest.raises(ConfigError, match=r"eval\.backend: vllm is not installed; `pip install vllm` on a CUDA"):
        validate(compose_config(["eval.backend=vllm", "train.steps=0", "eval.at_steps=[0]"]))
