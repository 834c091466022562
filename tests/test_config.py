import importlib.util
import re

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


# ---------------------------------------------------------------- every numeric key, finite and in range
# (key, bad values); rl.* keys are checked where a stage uses them, so their cases run with stages=[em,rl].
# Float keys get nan and inf; every key a value just outside its range.
NAN_INF = ["nan", "inf", "-inf"]
BAD_NUMBERS = {
    "model.lr": ["-1e-5", *NAN_INF],
    "temperature": ["0", "-0.5", *NAN_INF],
    "seed": ["-1", str(2**32)],
    "train.steps": ["-1"],
    "train.batch_size": ["0"],
    "train.micro_batch_size": ["0", "-8"],
    "train.lr": ["-1e-5", *NAN_INF],
    "train.weight_decay": ["-0.01", *NAN_INF],
    "train.adam_beta1": ["1.0", "-0.1", "1.5", *NAN_INF],
    "train.adam_beta2": ["1.0", "-0.1", *NAN_INF],
    "train.adam_eps": ["0", "-1e-8", *NAN_INF],
    "train.warmup_steps": ["-1"],
    "train.grad_clip": ["0", "-1", *NAN_INF],
    "train.sample_temperature": ["0", "-1", *NAN_INF],
    "train.top_p": ["0", "1.01", *NAN_INF],
    "train.top_k": ["-1"],
    "train.repetition_penalty": ["0", "-1", *NAN_INF],
    "train.max_new_tokens": ["0"],
    "train.sample_batch_size": ["0"],
    "train.loss_temperature": ["0", *NAN_INF],
    "train.loss_chunk_tokens": ["-1"],
    "train.save_at_steps": ["[-1]", "[11]"],
    "rl.steps": ["-1"],
    "rl.group_size": ["1", "0"],
    "rl.batch_size": ["0", "12"],
    "rl.micro_batch_size": ["0", "7"],
    "rl.sample_batch_size": ["0"],
    "rl.lr": ["0", "-1e-6", *NAN_INF],
    "rl.weight_decay": ["-0.01", *NAN_INF],
    "rl.adam_beta1": ["1.0", "-0.1", *NAN_INF],
    "rl.adam_beta2": ["1.0", *NAN_INF],
    "rl.adam_eps": ["0", *NAN_INF],
    "rl.warmup_steps": ["-1"],
    "rl.grad_clip": ["0", *NAN_INF],
    "rl.updates_per_batch": ["0"],
    "rl.clip_ratio": ["0", "1", *NAN_INF],
    "rl.kl_coef": ["-0.1", *NAN_INF],
    "rl.temperature": ["0", *NAN_INF],
    "rl.top_p": ["0", "2", *NAN_INF],
    "rl.top_k": ["-1"],
    "rl.repetition_penalty": ["0", *NAN_INF],
    "rl.max_new_tokens": ["0"],
    "rl.loss_chunk_tokens": ["-1"],
    "eval.at_steps": ["[-1]", "[11]"],
    "eval.temperatures": ["[]", "[-0.5]", "[0.0,nan]", "[inf]", "[0.0,-inf]"],
    "eval.n_samples": ["0"],
    "eval.top_p": ["0", "1.5", "-1", *NAN_INF],
    "eval.max_new_tokens": ["0"],
    "eval.batch_size": ["0"],
    "eval.limit": ["0", "-5"],
    "eval.grade_timeout_s": ["0", "-1", "1e12", *NAN_INF],
    "eval.seed": ["-1", str(2**32)],
    "logger.project_shards": ["0"],
    "logger.init_timeout_s": ["0", "-1", "1e12", *NAN_INF],
    "train.data_parallel_ranks": ["0", "-2"],
    "train.rank_batch_size": ["0"],
    "eval.pass_k": ["[0]", "[]"],
    "eval.code_timeout_s": ["0", "1e12", *NAN_INF],
    "eval.code_memory_mb": ["32"],
    "eval.code_workers": ["0"],
    "eval.em_inf.steps": ["-1"],
    "eval.em_inf.lr": ["0", *NAN_INF],
    "eval.em_inf.kl_weight": ["-0.1", *NAN_INF],
    "eval.em_inf.threshold": ["-1", *NAN_INF],
    "rl.entropy_coef": ["-0.001", *NAN_INF],
    "stop.probe_samples": ["-1"],
    "stop.heldout_prompts": ["-1"],
    "stop.agreement": ["0", "1.5", *NAN_INF],
    "stop.heldout_ratio": ["0", "1.5", *NAN_INF],
    "stop.entropy_ratio": ["0", "1.5", *NAN_INF],
}
NUMBER_CASES = [(key, value) for key, values in BAD_NUMBERS.items() for value in values]


def _numeric_keys():
    """Every int/float (or list of them) key of the structured configs."""
    import dataclasses
    import typing

    from em_sweep import config

    def walk(cls, prefix):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            t = hints[f.name]
            if dataclasses.is_dataclass(t):
                yield from walk(t, f"{prefix}{f.name}.")
            elif {int, float} & ({t} | set(typing.get_args(t)) | {a for x in typing.get_args(t) for a in typing.get_args(x)}):
                yield prefix + f.name

    return set(walk(config.Config, ""))


def test_the_table_covers_every_numeric_key_of_the_schema():
    assert _numeric_keys() == set(BAD_NUMBERS), _numeric_keys() ^ set(BAD_NUMBERS)


@pytest.mark.slow
@pytest.mark.parametrize("key, value", NUMBER_CASES, ids=[f"{k}={v}" for k, v in NUMBER_CASES])
def test_every_numeric_key_rejects_non_finite_and_out_of_range_values_naming_the_key(key, value):
    overrides = ["train.steps=10", f"{key}={value}"]
    if key.startswith("rl."):
        overrides.append("stages=[em,rl]")
    with pytest.raises(ConfigError) as info:
        validate(compose_config(overrides))
    message = str(info.value)
    # The key itself is named (or, for the shared temperature, the keys that follow it).
    named = [key] if key != "temperature" else ["temperature", "train.sample_temperature"]
    assert any(message.startswith(f"{k}: ") for k in named) and "\n" not in message, message


@pytest.mark.parametrize("overrides, fragment", [
    (["model.device=cuda:x"], "model.device: 'cuda:x' is not a device"),
    (["model.device=gpu"], "model.device: 'gpu' is not a device"),
    (["model.device=cuda:-1"], "model.device: 'cuda:-1' is not a device"),
    (["train.optimizer=adamw_bf16_sr"], "train.optimizer: adamw_bf16_sr updates bfloat16 weights, but model.dtype=float32"),
    (["train.optimizer=adamw_bf16_kahan", "model.dtype=float16"], "model.dtype=float16"),
    (["stages=[rl]", "rl.optimizer=adamw_bf16_sr"], "rl.optimizer: adamw_bf16_sr updates bfloat16"),
])
def test_device_spelling_and_optimizer_dtype_are_checked(overrides, fragment):
    with pytest.raises(ConfigError, match=re.escape(fragment)):
        validate(compose_config(overrides))
    # An optimizer of a stage that does not train is not in the way.
    validate(compose_config(["train.steps=0", "eval.at_steps=[0]", "train.optimizer=adamw_bf16_sr"]))


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash_attn is installed here")
def test_flash_attention_without_flash_attn_names_the_package():
    with pytest.raises(ConfigError, match=r"model\.attn_implementation: flash_attention_2 needs the flash_attn package"):
        validate(compose_config(["model.attn_implementation=flash_attention_2"]))


@pytest.mark.skipif(importlib.util.find_spec("torchao") is not None, reason="torchao is installed here")
def test_an_8bit_optimizer_without_its_package_names_the_package():
    with pytest.raises(ConfigError, match=r"train\.optimizer: adamw_8bit needs the torchao package"):
        validate(compose_config(["train.optimizer=adamw_8bit", "model.dtype=bfloat16"]))
