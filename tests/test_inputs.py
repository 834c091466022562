"""Bad input files: one line naming the file and line, before anything is loaded or computed, for
prompt pools (runs and `em-sweep select-prompts`), custom benchmarks and selection histories."""

import subprocess
import sys

import pytest

from em_sweep import inputs
from em_sweep.analysis.selection import SelectionError, load_history
from em_sweep.config import ConfigError, validate
from em_sweep.prompts import PromptError, load_pool
from tests.conftest import ROOT, compose_config

GOOD_POOL = [b'{"id": "a", "problem": "1+1?", "answer": "2"}', b'{"id": "b", "problem": "2+2?", "answer": 4}']

# (lines of the file, line named, fragment of the message)
BAD_POOLS = {
    "latin1": ([GOOD_POOL[0], b'{"id": "c", "problem": "caf\xe9?", "answer": "1"}'], 2, "not UTF-8 text (byte 0xe9"),
    "utf16": (['{"id": "a", "problem": "x"}'.encode("utf-16")], 1, "binary data"),
    "binary": ([b"\x7fELF\x02\x01\x01\x00\x00\x00"], 1, "binary data (a NUL byte)"),
    "problem_null": ([GOOD_POOL[0], b'{"id": "c", "problem": null}'], 2, "field 'problem' must be a non-empty string"),
    "problem_empty": ([b'{"id": "c", "problem": "  "}'], 1, "field 'problem' must be a non-empty string"),
    "problem_number": ([b'{"id": "c", "problem": 12}'], 1, "field 'problem' must be a non-empty string"),
    "problem_list": ([b'{"id": "c", "problem": ["a"]}'], 1, "field 'problem' must be a non-empty string"),
    "id_null": ([GOOD_POOL[0], b'{"id": null, "problem": "x"}'], 2, "field 'id' must be a string or an integer id, got null"),
    "id_empty": ([b'{"id": "", "problem": "x"}'], 1, "field 'id' is an empty id"),
    "id_list": ([b'{"id": [1], "problem": "x"}'], 1, "got a JSON array"),
    "id_object": ([b'{"id": {"k": 1}, "problem": "x"}'], 1, "got a JSON object"),
    "id_float": ([b'{"id": 1.5, "problem": "x"}'], 1, "got a JSON number"),
    "id_bool": ([b'{"id": true, "problem": "x"}'], 1, "got a JSON boolean"),
    "id_duplicate": ([*GOOD_POOL, b'{"id": "a", "problem": "3+3?"}'], 3, "duplicate id 'a' (also on line 1)"),
    "id_duplicate_int_str": ([b'{"id": 7, "problem": "x"}', b'{"id": "7", "problem": "y"}'], 2, "duplicate id '7'"),
    "answer_nan": ([b'{"id": "a", "problem": "x", "answer": NaN}'], 1, "non-finite gold answer (nan)"),
    "answer_inf": ([b'{"id": "a", "problem": "x", "answer": -Infinity}'], 1, "non-finite gold answer (-inf)"),
    "answer_list": ([b'{"id": "a", "problem": "x", "answer": [1, 2]}'], 1, "gold answer that is a JSON array"),
    "answer_object": ([b'{"id": "a", "problem": "x", "answer": {"v": 1}}'], 1, "gold answer that is a JSON object"),
    "not_object": ([GOOD_POOL[0], b"[1, 2]"], 2, "expected a JSON object, got a JSON array"),
    "bad_json": ([GOOD_POOL[0], b'{"id": "c", "problem": '], 2, "invalid JSON"),
    "missing_problem": ([b'{"id": "c"}'], 1, "missing field(s) problem"),
    "empty_file": ([b"", b"  "], None, "no prompts in the file"),
}


def _write(path, lines):
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


@pytest.mark.parametrize("case", sorted(BAD_POOLS))
def test_bad_pool_files_fail_in_one_line_naming_file_and_line(tmp_path, case):
    lines, line, fragment = BAD_POOLS[case]
    path = _write(tmp_path / f"{case}.jsonl", lines)
    with pytest.raises(PromptError) as info:
        load_pool(str(path))
    message = str(info.value)
    assert message.startswith(f"{path}{'' if line is None else f':{line}'}: "), message
    assert fragment in message and "\n" not in message, message


def test_a_good_pool_still_loads_and_numbers_become_strings(tmp_path):
    pool = load_pool(str(_write(tmp_path / "good.jsonl", [b"\xef\xbb\xbf" + GOOD_POOL[0], GOOD_POOL[1]])))
    assert [(p.id, p.answer) for p in pool.values()] == [("a", "2"), ("b", "4")]


def test_an_input_file_over_the_size_limit_fails_before_it_is_read(tmp_path):
    big = tmp_path / "big.jsonl"
    with open(big, "wb") as f:  # sparse: no disk, no time
        f.truncate(inputs.MAX_INPUT_BYTES + 1)
    with pytest.raises(PromptError, match=r"big\.jsonl: is 256 MiB, over the 256 MiB limit for input files"):
        load_pool(str(big))
    spec = "{name:mine,path:" + str(big) + ",question_field:q,answer_field:a}"
    with pytest.raises(ConfigError, match=r"eval\.benchmarks: benchmark 'mine', .*big\.jsonl: is 256 MiB, over"):
        validate(compose_config([f"eval.benchmarks=[{spec}]"]))
    with pytest.raises(SelectionError, match=r"big\.jsonl: is 256 MiB, over the 256 MiB limit"):
        load_history(big)


GOOD_BENCH = [b'{"q": "1+1?", "a": "2", "id": 1}', b'{"q": "2+2?", "a": 4, "id": 2}']

# (lines, extra spec fields, line named, fragment)
BAD_BENCHMARKS = {
    "latin1": ([GOOD_BENCH[0], b'{"q": "\xe9t\xe9?", "a": "2", "id": 3}'], {}, 2, "not UTF-8 text"),
    "binary": ([b"PK\x03\x04\x14\x00\x00\x00"], {}, 1, "binary data"),
    "question_null": ([b'{"q": null, "a": "2", "id": 1}'], {}, 1, "field 'q' is not a non-empty string"),
    "question_empty": ([GOOD_BENCH[0], b'{"q": "", "a": "2", "id": 2}'], {}, 2, "field 'q' is not a non-empty string"),
    "answer_null": ([b'{"q": "x", "a": null, "id": 1}'], {}, 1, "no gold answer in field 'a'"),
    "answer_empty": ([b'{"q": "x", "a": "", "id": 1}'], {}, 1, "no gold answer in field 'a'"),
    "answer_nan": ([GOOD_BENCH[0], b'{"q": "x", "a": NaN, "id": 2}'], {}, 2, "non-finite gold answer (nan)"),
    "answer_inf": ([b'{"q": "x", "a": Infinity, "id": 1}'], {}, 1, "non-finite gold answer (inf)"),
    "answer_object": ([b'{"q": "x", "a": {"v": 2}, "id": 1}'], {}, 1, "gold answer that is a JSON object"),
    "answer_nested_list": ([b'{"q": "x", "a": [[2]], "id": 1}'], {}, 1, "gold answer that is a JSON array"),
    "answer_list_nan": ([b'{"q": "x", "a": ["2", NaN], "id": 1}'], {"answer_format": "list"}, 1, "non-finite"),
    "solution_not_string": ([b'{"q": "x", "a": 5, "id": 1}'], {"answer_format": "boxed_in_solution"}, 1,
                            "must be a string for answer_format 'boxed_in_solution'"),
    "gsm8k_not_string": ([b'{"q": "x", "a": ["#### 5"], "id": 1}'], {"answer_format": "gsm8k"}, 1,
                         "must be a string for answer_format 'gsm8k'"),
    "id_null": ([GOOD_BENCH[0], b'{"q": "x", "a": "1", "id": null}'], {}, 2, "field 'id' must be a string or an integer id, got null"),
    "id_list": ([b'{"q": "x", "a": "1", "id": [1]}'], {}, 1, "got a JSON array"),
    "id_empty": ([b'{"q": "x", "a": "1", "id": " "}'], {}, 1, "field 'id' is an empty id"),
    "id_duplicate": ([*GOOD_BENCH, b'{"q": "3+3?", "a": "6", "id": 1}'], {}, 3, "duplicate id (field 'id') '1' (also on line 1)"),
    "not_object": ([b'"just a string"'], {}, 1, "expected a JSON object, got a JSON string"),
}


@pytest.mark.parametrize("case", sorted(BAD_BENCHMARKS))
def test_bad_custom_benchmark_files_fail_validation_in_one_line_naming_file_and_line(tmp_path, case):
    lines, fields, line, fragment = BAD_BENCHMARKS[case]
    path = _write(tmp_path / f"{case}.jsonl", lines)
    entry = {"name": "mine", "path": str(path), "question_field": "q", "answer_field": "a", "id_field": "id", **fields}
    override = "eval.benchmarks=[{" + ",".join(f"{k}:{v}" for k, v in entry.items()) + "}]"
    with pytest.raises(ConfigError) as info:
        validate(compose_config([override]))
    message = str(info.value)
    assert message.startswith(f"eval.benchmarks: benchmark 'mine', {path}, line {line}: "), message
    assert fragment in message and "\n" not in message, message


BAD_HISTORIES = {
    "latin1.json": (b'{"1": [0, 1],\n "2": [1, 0], "caf\xe9": [1]}', 2, "not UTF-8 text"),
    "binary.json": (b"\x00\x00\x00\x01", 1, "binary data"),
    "repeated.json": (b'{"1": [0, 1],\n "2": [1, 1],\n "1": [1, 1]}', 3, "key '1' appears twice (also on line 1)"),
}


@pytest.mark.parametrize("name", sorted(BAD_HISTORIES))
def test_bad_history_files_fail_in_one_line_naming_file_and_line(tmp_path, name):
    data, line, fragment = BAD_HISTORIES[name]
    (tmp_path / name).write_bytes(data)
    with pytest.raises(SelectionError) as info:
        load_history(tmp_path / name)
    message = str(info.value)
    assert message.startswith(f"{tmp_path / name}:{line}: ") and fragment in message and "\n" not in message, message


@pytest.mark.parametrize("case", ["latin1", "problem_null", "id_duplicate", "answer_nan"])
def test_select_prompts_reports_a_bad_pool_in_one_line(tmp_path, capsys, case):
    from em_sweep.cli import main

    lines, line, fragment = BAD_POOLS[case]
    path = _write(tmp_path / f"{case}.jsonl", lines)
    with pytest.raises(SystemExit) as exit_:
        main(["select-prompts", f"select.pool={path}", "select.k=2", f"select.out_dir={tmp_path / 'conf'}",
              f"select.ranking={tmp_path / 'r.json'}", f"paths.root={tmp_path}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err == err.splitlines()[0] and err.startswith(f"error: {path}:{line}: ") and fragment in err
    assert not (tmp_path / "r.json").exists() and not (tmp_path / "conf").exists()


@pytest.mark.slow
def test_launch_reports_a_bad_pool_and_a_bad_benchmark_in_one_line_before_compute(tmp_path):
    pool = _write(tmp_path / "pool.jsonl", [GOOD_POOL[0], b'{"id": "a", "problem": "again"}'])
    bench = _write(tmp_path / "bench.jsonl", [b'{"q": "x", "a": {"v": 1}}'])
    spec = "{name:mine,path:" + str(bench) + ",question_field:q,answer_field:a}"
    for overrides, expected in (([f"prompt.pool={pool}", "prompt.ids=[a]"], f"{pool}:2: duplicate id 'a'"),
                                ([f"eval.benchmarks=[{spec}]"], f"{bench}, line 1: field 'a' holds a gold answer")):
        proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), f"paths.root={tmp_path}", *overrides,
                               "logger.mode=disabled"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert not (tmp_path / "runs").exists()


def test_shipped_pools_and_benchmarks_pass_the_checks():
    from em_sweep.evaluation.benchmarks import BENCHMARKS, load_benchmark
    from em_sweep.prompts import PROMPTS_DIR

    for path in PROMPTS_DIR.glob("*.jsonl"):
        assert load_pool(str(path))
    for name in BENCHMARKS:
        assert load_benchmark(name)
