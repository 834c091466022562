"""Checks before the weights are loaded (run.preflight): the model directory, device, dtype and
attention, and the context and memory limits. Each bad input is one line, before compute."""

import json
import shutil
import subprocess
import sys

import pytest
import torch

from em_sweep.config import ConfigError
from em_sweep.limits import check_memory, memory_estimate
from em_sweep.models import ASSETS, ModelFacts, ModelLoadError
from em_sweep.run import INPUT_ERRORS, preflight
from tests.conftest import ROOT, compose_config

TINY = ASSETS / "tiny-arith"


def _broken_model(tmp_path, how):
    d = tmp_path / "model"
    shutil.copytree(TINY, d)
    weights = d / "model.safetensors"
    if how == "config_not_json":
        (d / "config.json").write_text('{"model_type": "qwen2", ')
    elif how == "config_unknown_type":
        (d / "config.json").write_text('{"model_type": "no_such_architecture"}')
    elif how == "config_vocab_too_small":
        cfg = json.loads((d / "config.json").read_text())
        (d / "config.json").write_text(json.dumps({**cfg, "vocab_size": 100}))
    elif how == "no_tokenizer":
        (d / "tokenizer.json").unlink()
    elif how == "weights_truncated":
        weights.write_bytes(weights.read_bytes()[:-1000])
    elif how == "weights_garbage":
        weights.write_bytes(b"\xff" * 4096)
    elif how == "weights_missing":
        weights.unlink()
    elif how == "index_names_missing_shard":
        weights.rename(d / "model-00001-of-00002.safetensors")
        (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
            "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    elif how == "bin_truncated":
        weights.unlink()
        (d / "pytorch_model.bin").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    return d


MODEL_CASES = {
    "config_not_json": "cannot read the model's config.json",
    "config_unknown_type": "cannot read the model's config.json",
    "config_vocab_too_small": "tokenizer and weights do not belong together",
    "no_tokenizer": "no tokenizer in",
    "weights_truncated": "model.safetensors is truncated or corrupt",
    "weights_garbage": "is not a valid safetensors file",
    "weights_missing": "no weights in",
    "index_names_missing_shard": "names weight files missing",
    "bin_truncated": "is truncated or not a torch checkpoint",
}


def _fails_in_one_line(overrides, error, fragment):
    with pytest.raises(error) as info:
        preflight(compose_config(overrides))
    message = str(info.value)
    assert isinstance(info.value, INPUT_ERRORS) and "\n" not in message and fragment in message, message
    return message


@pytest.mark.parametrize("how", sorted(MODEL_CASES))
def test_a_broken_model_directory_is_named_before_its_weights_load(tmp_path, how):
    d = _broken_model(tmp_path, how)
    message = _fails_in_one_line([f"model.path={d}"], ModelLoadError, MODEL_CASES[how])
    assert message.startswith("model.path: ")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_named(device):
    _fails_in_one_line([f"model.device={device}"], ModelLoadError, "CUDA is not available here")


def test_a_bf16_optimizer_on_the_float32_weights_auto_resolves_to_is_named():
    _fails_in_one_line(["model.dtype=auto", "model.device=cpu", "train.optimizer=adamw_bf16_kahan"], ConfigError,
                       "train.optimizer: adamw_bf16_kahan updates bfloat16 weights, but model.dtype=auto is float32 on cpu")


@pytest.mark.parametrize("name", ["sdap", "flash_attention", "Eager"])
def test_an_unknown_attention_implementation_is_named(name):
    _fails_in_one_line([f"model.attn_implementation={name}"], ModelLoadError,
                       f"model.attn_implementation: unknown {name!r}; choose from")


def _bench_file(tmp_path, question):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"q": question, "a": "1"}) + "\n")
    return "eval.benchmarks=[{name:long,path:" + str(path) + ",question_field:q,answer_field:a}]"


CONTEXT_CASES = [  # the tiny model's context is 1024 tokens (one token a character)
    (["train.max_new_tokens=1000"], "train.max_new_tokens: prompt 'arith0' is 45 tokens; with train.max_new_tokens=1000 that is 1045, over"),
    (["stages=[em,rl]", "rl.max_new_tokens=1010"], "rl.max_new_tokens: prompt 'arith0'"),
    (["eval.max_new_tokens=1024"], "eval.max_new_tokens: 1024 leaves no room for a prompt"),
    (["eval.max_new_tokens=5000"], "eval.max_new_tokens: 5000 leaves no room"),
    (["eval.benchmarks=[math500]"], "eval.benchmarks: benchmark 'math500' problem"),
]


@pytest.mark.parametrize("overrides, fragment", CONTEXT_CASES)
def test_prompts_past_the_models_context_are_named(overrides, fragment):
    _fails_in_one_line(overrides, ConfigError, fragment)


def test_a_custom_benchmark_prompt_past_the_context_is_named(tmp_path):
    _fails_in_one_line([_bench_file(tmp_path, "7+" * 600 + "1?")], ConfigError,
                       "eval.benchmarks: benchmark 'long' problem '0' is a")


MEMORY_CASES = [  # on CPU the bound is the machine's RAM
    (["train.batch_size=50000000", "train.sample_batch_size=50000000", "train.micro_batch_size=50000000"],
     "train.sample_batch_size: the run needs at least"),
    (["eval.temperatures=[1.0]", "eval.n_samples=100000000", "eval.batch_size=100000000"],
     "eval.batch_size: the run needs at least"),
    (["train.loss_chunk_tokens=0", "train.batch_size=2000000", "train.micro_batch_size=2000000",
      "train.sample_batch_size=1"], "train.loss_chunk_tokens: the run needs at least"),
]


@pytest.mark.parametrize("overrides, fragment", MEMORY_CASES)
def test_a_batch_that_cannot_fit_the_device_is_named(overrides, fragment):
    _fails_in_one_line(overrides, ConfigError, fragment)


def test_the_memory_rule_passes_the_paper_setting_on_an_80gb_card_and_names_the_key_past_it():
    """Qwen2.5-Math-7B dimensions (config only: no weights, no GPU) under the 7B preset: fits an
    80 GB card; an evaluation batch sixteen times larger does not, and the error names the key."""
    from transformers import Qwen2Config

    qwen7b = Qwen2Config(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                         num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=4096)
    facts = ModelFacts("Qwen/Qwen2.5-Math-7B", qwen7b, None, torch.device("cuda", 0), torch.bfloat16, 7_615_616_512)
    eval_lengths = {"olympiadbench": [(str(i), 1500) for i in range(675)]}
    cfg = compose_config(["model=qwen25_math_7b", "prompt=pi1"])
    need, terms = memory_estimate(cfg, facts, 160, eval_lengths)
    assert terms["weights"][1] == 2 * 7_615_616_512 and terms["training state"][1] == 6 * 7_615_616_512
    check_memory(cfg, facts, 160, eval_lengths, device_bytes=80 * 10**9)
    big = compose_config(["model=qwen25_math_7b", "prompt=pi1", "eval.batch_size=1024"])
    with pytest.raises(ConfigError, match=r"^eval\.batch_size: the run needs at least .* but cuda:0 has 74\.5 GiB"):
        check_memory(big, facts, 160, eval_lengths, device_bytes=80 * 10**9)


@pytest.mark.slow
def test_launch_names_a_corrupt_model_in_one_line_and_creates_nothing(tmp_path):
    d = _broken_model(tmp_path, "weights_truncated")
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), f"paths.root={tmp_path / 'out'}",
                           f"model.path={d}", "logger.mode=disabled"], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 2 and "model.safetensors is truncated or corrupt" in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "out" / "runs").exists()


def test_select_prompts_names_a_corrupt_model_before_loading_it(tmp_path, capsys):
    from em_sweep.cli import main

    d = _broken_model(tmp_path, "no_tokenizer")
    with pytest.raises(SystemExit) as exit_:
        main(["select-prompts", "select.pool=arith_pool", "select.k=2", "select.limit=2", f"model.path={d}",
              f"select.out_dir={tmp_path / 'conf'}", f"select.ranking={tmp_path / 'r.json'}", f"paths.root={tmp_path}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model.path: no tokenizer in") and "\n" not in err, err
