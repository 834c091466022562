"""Evaluation on the shipped tiny model: a user's own benchmark scored and recorded under its name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from em_sweep.config import validate
from em_sweep.evaluation.evaluate import Score, evaluate, evaluation_backend, generate_responses
from em_sweep.generation.sample import SamplingSettings
from em_sweep.record import RunRecorder
from em_sweep.rundir import run_id
from tests.conftest import ROOT, compose_config

CUSTOM = ROOT / "tests" / "data" / "custom_benchmark.jsonl"
CUSTOM_ENTRY = f"{{name:mine,path:{CUSTOM},question_field:problem,answer_field:solution,id_field:uid}}"


class _KeysMirror:
    """Stands in for W&B: keeps what would be logged."""

    def __init__(self) -> None:
        self.logged: dict[str, Any] = {}

    def log(self, metrics: dict[str, Any], step: int) -> None:
        self.logged.update(metrics)


def test_custom_benchmark_is_scored_and_recorded_under_its_name(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    cfg = compose_config([f"eval.benchmarks=[arith,{CUSTOM_ENTRY}]", "eval.limit=8"])
    validate(cfg)
    scores, records = evaluate(model, tokenizer, cfg.eval, step=0)
    assert [s["benchmark"] for s in scores] == ["arith", "mine"]
    mine = scores[1]
    assert mine["n_problems"] == 4 and mine["n"] == 1
    mine_records = [r for r in records if r["benchmark"] == "mine"]
    assert [r["id"] for r in mine_records] == ["c1", "c2", "c3", "c4"]
    assert [r["gold"] for r in mine_records] == [["19"], ["25"], ["27"], ["59"]]
    assert mine["accuracy"] == sum(r["correct"] for r in mine_records) / 4

    mirror = _KeysMirror()
    RunRecorder(tmp_path, mirror).eval(0, scores, records, primary_temperature=0.0)  # type: ignore[arg-type]
    assert {"eval/mine/accuracy", "eval/arith/accuracy"} <= mirror.logged.keys()
    lines = [json.loads(x) for x in (tmp_path / "eval_records.jsonl").read_text().splitlines()]
    assert {x["benchmark"] for x in lines} == {"arith", "mine"}


def test_hf_backend_returns_responses_per_prompt_and_sample(tiny) -> None:
    model, tokenizer = tiny
    cfg = compose_config(["eval.batch_size=3"])
    texts = ["What is 1+2?", "What is 30+40+5?"]
    out = generate_responses(model, tokenizer, texts, 2, SamplingSettings(temperature=1.0, max_new_tokens=8),
                             cfg.eval)
    assert len(out) == 2 and all(len(row) == 2 and all(isinstance(t, str) for t in row) for row in out)


def test_run_id_follows_the_custom_benchmark(tmp_path: Path) -> None:
    other = tmp_path / "other.jsonl"
    other.write_text(CUSTOM.read_text())

    def rid(entry: str) -> str:
        return run_id(compose_config([f"eval.benchmarks=[{entry}]"]))

    base = rid(CUSTOM_ENTRY)
    assert rid(CUSTOM_ENTRY) == base
    assert rid(CUSTOM_ENTRY.replace(str(CUSTOM), str(other))) != base
    assert rid(CUSTOM_ENTRY.replace("answer_field:solution", "answer_field:problem")) != base
    assert rid(CUSTOM_ENTRY.replace(",id_field:uid", "")) != base


def test_yaml_preset_with_a_custom_benchmark(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(ROOT)  # the preset's relative path resolves against the current directory
    cfg = compose_config(["+experiment=custom_benchmark"])
    validate(cfg)
    assert cfg.eval.benchmarks[0] == "arith" and cfg.eval.benchmarks[1].name == "arith_custom"


@pytest.mark.slow
def test_launch_scores_a_custom_benchmark_from_the_command_line(tmp_path: Path) -> None:
    cmd = [sys.executable, str(ROOT / "launch.py"), f"paths.root={tmp_path}", "logger.mode=disabled",
           "train.steps=0", "eval.limit=4", f"eval.benchmarks=[arith,{CUSTOM_ENTRY}]"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "mine" in proc.stdout  # the summary table
    (run,) = (tmp_path / "runs").iterdir()
    results = json.loads((run / "results.json").read_text())
    assert [s["benchmark"] for s in results["final_scores"]] == ["arith", "mine"]
    assert results["config"]["eval"]["benchmarks"][1]["path"] == str(CUSTOM)
    records = [json.loads(x) for x in (run / "eval_records.jsonl").read_text().splitlines()]
    assert [r["id"] for r in records if r["benchmark"] == "mine"] == ["c1", "c2", "c3", "c4"]


# ---------------------------------------------------------------------------
# The evaluation toolkit's rules (Qwen2.5-Eval/evaluation): prompt, stop strings, extraction
# ---------------------------------------------------------------------------

# Qwen2.5-Eval/evaluation/utils.py, PROMPT_TEMPLATES["qwen25-math-cot"], written out by hand.
TOOLKIT_PROMPT = ("<|im_start|>system\nPlease reason step by step, and put your final answer within \\boxed{}."
                  "<|im_end|>\n<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n")
# Meta-Llama-3-8B-Instruct's chat template.
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)


def _llama_style(tokenizer):
    """The tiny tokenizer's vocabulary with Llama-3's special tokens, chat template and BOS added to
    every encoding (as Llama tokenizers do by default)."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    tk.add_special_tokens(["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"])
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
        special_tokens=[("<|begin_of_text|>", bos)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                   pad_token="<|eot_id|>", chat_template=LLAMA3_CHAT_TEMPLATE)


def test_qwen25_math_cot_is_the_toolkits_string_for_a_qwen_tokenizer(tiny) -> None:
    from em_sweep.prompts import format_eval_prompt

    _, tokenizer = tiny  # Qwen2 tokenizer with a ChatML chat template, no BOS
    prompt = format_eval_prompt(tokenizer, "  What is 1+2?\n", "qwen25-math-cot")
    assert prompt == TOOLKIT_PROMPT.replace("{question}", "What is 1+2?")  # the question stripped, as the toolkit does
    # For a ChatML model the model's own template with the same system turn is the same string.
    assert format_eval_prompt(tokenizer, "What is 1+2?", "chat-cot") == prompt
    assert format_eval_prompt(tokenizer, "What is 1+2?", "chat") == (
        "<|im_start|>user\nWhat is 1+2?<|im_end|>\n<|im_start|>assistant\n")


def test_qwen25_math_cot_is_the_toolkits_string_for_a_llama_tokenizer(tiny) -> None:
    from em_sweep.prompts import format_eval_prompt

    llama = _llama_style(tiny[1])
    bos = llama.convert_tokens_to_ids("<|begin_of_text|>")
    prompt = format_eval_prompt(llama, "What is 1+2?", "qwen25-math-cot")
    # The toolkit's ChatML string, not Llama's format, after the BOS vLLM adds when it tokenizes a text prompt.
    assert prompt == "<|begin_of_text|>" + TOOLKIT_PROMPT.replace("{question}", "What is 1+2?")
    ids = llama(prompt, add_special_tokens=False)["input_ids"]  # as em-sweep tokenizes prompts
    assert ids == llama(TOOLKIT_PROMPT.replace("{question}", "What is 1+2?"))["input_ids"]
    assert ids.count(bos) == 1
    # chat-cot is the model's own (Llama) template.
    assert format_eval_prompt(llama, "What is 1+2?", "chat-cot") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nPlease reason step by step, and put your "
        "final answer within \\boxed{}.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nWhat is 1+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_special_token_stops_are_cut_before_decoding(tiny) -> None:
    import torch

    from em_sweep.evaluation.evaluate import response_texts, stop_token_ids
    from em_sweep.generation.sample import SampleBatch

    _, tokenizer = tiny
    stops = ["</s>", "<|im_end|>", "<|endoftext|>"]
    ids = stop_token_ids(tokenizer, stops)
    # <|im_end|> and <|endoftext|> are special tokens here (decoding drops them); "</s>" is plain text.
    assert ids == {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")}
    prompt = tokenizer(["Q: 1+2?", "Q: 3+4?"], add_special_tokens=False, padding=True, return_tensors="pt")
    answers = ["3<|im_end|>\n<|im_start|>user\n\\boxed{9}", "7 done<|im_end|>"]
    resp = tokenizer(answers, add_special_tokens=False, padding=True, return_tensors="pt")
    # Right-padded responses as sample.py lays them out; the second row ends with its stop token.
    batch = SampleBatch(
        input_ids=torch.cat([prompt["input_ids"], resp["input_ids"]], dim=1),
        attention_mask=torch.cat([prompt["attention_mask"], resp["attention_mask"]], dim=1),
        response_mask=torch.cat([torch.zeros_like(prompt["attention_mask"]), resp["attention_mask"]], dim=1),
        prompt_len=prompt["input_ids"].shape[1], response_lengths=resp["attention_mask"].sum(1),
        texts=tokenizer.batch_decode(resp["input_ids"], skip_special_tokens=True),
        hit_eos=torch.tensor([False, True]),
    )
    assert batch.texts[0] == "3\nuser\n\\boxed{9}"  # what decoding alone leaves: the stop is gone
    assert response_texts(batch, tokenizer, ids) == ["3", "7 done"]
    assert response_texts(batch, tokenizer, set()) == batch.texts


def test_records_and_scores_carry_the_extraction_rule_and_grader_versions(tiny) -> None:
    from em_sweep.evaluation.grading import EXTRACTION_RULES, grader_versions

    model, tokenizer = tiny
    # A stop string every arithmetic answer passes through: responses are cut there.
    cfg = compose_config(["eval.limit=12", "eval.stop_strings=[\"+\",\"<|im_end|>\"]"])
    validate(cfg)
    scores, records = evaluate(model, tokenizer, cfg.eval, step=0)
    (score,) = scores
    assert all("+" not in r["response"] for r in records)
    assert all(r["extraction"] in EXTRACTION_RULES for r in records)
    counts = {rule: sum(r["extraction"] == rule for r in records) for rule in EXTRACTION_RULES}
    assert {rule: score[f"extraction_{rule}"] for rule in EXTRACTION_RULES} == counts
    assert sum(counts.values()) == len(records) == 12
    assert counts["last_number"] > 0  # "50+34=84. ... \\boxed{4}" cut at "+" leaves "50": no box, a number
    assert score["boxed_rate"] == counts["boxed"] / 12
    versions = grader_versions()
    assert (score["math_verify_version"], score["latex2sympy2_extended_version"], score["antlr4_version"]) == (
        versions["math-verify"], versions["latex2sympy2_extended"], versions["antlr4-python3-runtime"])


def test_stop_strings_are_checked() -> None:
    from em_sweep.config import ConfigError

    with pytest.raises(ConfigError, match="eval.stop_strings"):
        validate(compose_config(["eval.stop_strings=[\"\"]"]))
CODE = ROOT / "tests" / "data" / "custom_code.jsonl"
CODE_ENTRY = (f"{{name:mycode,path:{CODE},family:code,question_field:prompt,test_field:tests,"
              "entry_point_field:fn,id_field:key}")


def test_code_and_logic_responses_are_executed_and_parsed() -> None:
    """The scoring half of evaluation on hand-written responses (no model needed)."""
    from em_sweep.evaluation import families
    from em_sweep.evaluation.benchmarks import load_benchmark, resolve_spec

    cfg = compose_config([f"eval.benchmarks=[{CODE_ENTRY},kk]", "eval.pass_k=[1,2]", "eval.code_timeout_s=2"])
    validate(cfg)
    code_spec = resolve_spec(cfg.eval.benchmarks[0])
    code = load_benchmark(code_spec)
    responses = [
        ["```python\ndef add(a, b):\n    return a + b\n```", "```python\ndef add(a, b):\n    return a - b\n```",
         "```python\nimport os\ndef add(a, b):\n    while True:\n        pass\n```"],
        ["def reverse_words(s):\n    return ' '.join(reversed(s.split()))\n", "no idea", ""],
    ]
    fields, records = families.score(code_spec, code, responses, 3, cfg.eval, step=0, temperature=0.7, t0=0.0)
    score = Score(**fields)
    assert [r["correct"] for r in records] == [True, False, False, True, False, False]
    assert records[1]["reason"].startswith("AssertionError") and records[4]["extracted"] == ""
    assert "check(add)" in records[0]["program"] and records[0]["grade_status"] == "passed"
    assert score.family == "code" and score.accuracy == pytest.approx(2 / 6) and score.pass_at_n == 1.0
    assert score.metrics["pass@1"] == pytest.approx(1 / 3)
    assert score.metrics["pass@2"] == pytest.approx(1 - (2 / 3) * (1 / 2))  # 1 - C(2,2)/C(3,2) per problem
    assert score.boxed_rate == pytest.approx(4 / 6)

    kk_spec = resolve_spec("kk")
    puzzles = load_benchmark(kk_spec, limit=2)  # 2 and 3 people
    right = "<answer>" + puzzles[0].answers[0] + "</answer>"
    flipped = {"knight": "knave", "knave": "knight"}
    pairs = zip(puzzles[1].names, puzzles[1].roles, strict=True)
    one_wrong = "CONCLUSION:\n" + "\n".join(
        f"({i + 1}) {n} is a {flipped[r] if i == 0 else r}" for i, (n, r) in enumerate(pairs))
    fields, records = families.score(kk_spec, puzzles, [[right], [one_wrong]], 1, cfg.eval, 0, 0.0, 0.0)
    score = Score(**fields)
    assert [r["grade_status"] for r in records] == ["correct", "wrong_identity"]
    assert records[0]["extracted"] == records[0]["gold"] and records[1]["people"] == 3
    assert score.metrics == {"accuracy_people2": 1.0, "accuracy_people3": 0.0}


def test_tiny_model_on_code_and_logic_benchmarks(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    cfg = compose_config([f"eval.benchmarks=[humaneval,kk,{CODE_ENTRY}]", "eval.limit=2", "eval.max_new_tokens=16"])
    validate(cfg)
    scores, records = evaluate(model, tokenizer, cfg.eval, step=0)
    by_name = {s["benchmark"]: s for s in scores}
    assert {n: by_name[n]["family"] for n in by_name} == {"humaneval": "code", "kk": "logic", "mycode": "code"}
    assert by_name["humaneval"]["pass@1"] == by_name["humaneval"]["accuracy"]
    assert {"accuracy_people2", "accuracy_people3"} <= by_name["kk"].keys()
    code_records = [r for r in records if r["benchmark"] == "humaneval"]
    assert len(code_records) == 2 and all("program" in r and r["grade_status"] in ("passed", "failed")
                                          for r in code_records)
    assert all("gold" in r and "people" in r for r in records if r["benchmark"] == "kk")

    mirror = _KeysMirror()
    RunRecorder(tmp_path, mirror).eval(0, scores, records, primary_temperature=0.0)  # type: ignore[arg-type]
    assert {"eval/humaneval/pass@1", "eval/kk/accuracy_people2", "eval/mycode/accuracy"} <= mirror.logged.keys()
    lines = [json.loads(x) for x in (tmp_path / "eval_records.jsonl").read_text().splitlines()]
    assert {x["benchmark"] for x in lines} == {"humaneval", "kk", "mycode"}


def test_sandbox_limits_are_part_of_the_run_id_only_with_a_code_benchmark() -> None:
    default = run_id(compose_config())
    assert run_id(compose_config(["eval.code_timeout_s=3", "eval.pass_k=[1]", "eval.code_workers=8"])) == default
    code = ["eval.benchmarks=[humaneval,kk]"]
    assert run_id(compose_config(code)) != default
    assert run_id(compose_config([*code, "eval.code_timeout_s=3"])) != run_id(compose_config(code))
    assert run_id(compose_config([*code, "eval.code_workers=8", "eval.pass_k=[1]"])) == run_id(compose_config(code))
    assert run_id(compose_config([f"eval.benchmarks=[{CODE_ENTRY}]", "eval.code_memory_mb=512"])) != run_id(
        compose_config([f"eval.benchmarks=[{CODE_ENTRY}]"]))


@pytest.mark.parametrize(("overrides", "backend"), [
    ([], "continuous"),  # the default on any device the static decoder supports
    (["eval.generation_backend=hf"], "hf"),
    (["eval.generation_backend=auto"], "hf"),  # auto takes the static decoder on CUDA only
    (["eval.em_inf.enabled=true"], "hf"),  # EM-INF's logits processor runs inside HF generate
])
def test_the_recorded_evaluation_backend_is_the_one_evaluation_runs_on(tiny, overrides, backend):
    from em_sweep.run import resolved_settings

    model, _ = tiny
    cfg = compose_config(overrides)
    assert evaluation_backend(model, cfg.eval) == backend
    assert resolved_settings(cfg, model)["eval_generation_backend"] == backend
