"""Variance-based prompt selection: ranking, history files, written prompt configs, end to end."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from em_sweep.analysis.selection import (
    GENERATED_MARKER,
    SelectionError,
    load_history,
    map_history_ids,
    parse_history,
    rank_by_variance,
    usable_candidates,
    variance_table,
    write_prompt_configs,
)
from em_sweep.cli import main as cli_main
from em_sweep.config import validate
from em_sweep.prompts import PoolItem, select_prompts
from em_sweep.run import preflight
from tests.conftest import compose_config


def em_sweep(*argv: str) -> int:
    with pytest.raises(SystemExit) as done:
        cli_main(list(argv))
    return int(done.value.code or 0)


# ---------------------------------------------------------------- ranking

def test_rank_by_variance_most_variable_first_ties_by_id():
    history = {
        "b": [1, 1, 1, 1],  # var 0
        "c": [0, 0, 1, 1],  # var 0.25
        "a": [0, 1, 0, 1],  # var 0.25 (ties with c: id order)
        "d": [0.5],  # one value: var 0
        "e": [0, 0, 0, 1],  # var 0.1875
    }
    assert rank_by_variance(history) == ["a", "c", "e", "b", "d"]
    table = variance_table(history)
    assert [r.rank for r in table] == [1, 2, 3, 4, 5]
    assert table[2].id == "e" and table[2].mean == 0.25 and table[2].variance == pytest.approx(0.1875)
    assert table[2].std == pytest.approx(0.1875 ** 0.5) and table[2].n == 4
    assert rank_by_variance({}) == []


def test_ranking_matches_one_shot_rlvr_std_order():
    rng = random.Random(3)
    history = {str(i): [rng.choice([0.0, 0.25, 0.5, 0.75, 1.0]) for _ in range(rng.randint(1, 12))]
               for i in range(300)}
    expected = sorted(history, key=lambda k: (-float(np.std(history[k])), k))
    ranked = rank_by_variance(history)
    # np.std may differ in the last bit between equal-variance lists; the exact ranking must agree
    # with it wherever np.std separates two prompts by more than rounding.
    stds = {k: float(np.std(v)) for k, v in history.items()}
    for hi, lo in zip(ranked, ranked[1:], strict=False):
        assert stds[hi] >= stds[lo] - 1e-12
    assert ranked[0] == expected[0] and set(ranked) == set(history)


@pytest.mark.parametrize("history, message", [
    ({"7": []}, "id '7': empty history"),
    ({"7": [0.5, float("nan")]}, "id '7': value 1 is nan"),
    ({"7": [0.5, "x"]}, "value 1 is 'x'"),
    ({"7": [True, 0]}, "value 0 is True"),
    ({"7": 0.5}, "expected a list of numbers"),
])
def test_bad_histories_name_the_id_and_the_problem(history, message):
    with pytest.raises(SelectionError, match=message.replace("(", r"\(")):
        rank_by_variance(history)


# ---------------------------------------------------------------- history files

def test_history_file_errors_name_the_file_and_what_is_wrong(tmp_path):
    cases = {
        "trailing.json": ('{"1": [0, 1],}', "not valid JSON (line 1, column"),
        "list.json": ("[[0, 1]]", "expected a JSON object mapping an example index"),
        "empty.json": ("{}", "the history is empty"),
        "nan.json": ('{"1": [0, 1], "2": [0, NaN]}', "id '2': value 1 is nan"),
        "nested.json": ('{"1": {"acc": [0, 1]}}', "id '1': expected a list of numbers, got dict"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(SelectionError) as err:
            load_history(tmp_path / name)
        assert str(err.value).startswith(str(tmp_path / name)), err.value
        assert message in str(err.value), err.value
    with pytest.raises(SelectionError, match="cannot read history file"):
        load_history(tmp_path / "missing.json")
    assert parse_history({"3": [1, 0.5]}, "x") == {"3": [1.0, 0.5]}


def test_history_indices_map_to_pool_ids():
    pool = ["dsr0", "dsr1", "dsr124"]
    assert map_history_ids({"124": [1.0], "dsr1": [0.0]}, pool) == {"dsr124": [1.0], "dsr1": [0.0]}
    assert map_history_ids({"x1": [1.0]}, ["x1", "y"], id_prefix=None) == {"x1": [1.0]}
    with pytest.raises(SelectionError, match=r"\['999'\].*match no pool id.*'dsr'"):
        map_history_ids({"999": [1.0]}, pool)


def test_pool_rows_without_an_answer_are_skipped():
    items = [PoolItem("a", "q", "1"), PoolItem("b", "q", ""), PoolItem("c", "q", None), PoolItem("d", " ", "2")]
    usable, skipped = usable_candidates(items)
    assert [i.id for i in usable] == ["a"]
    assert [s["id"] for s in skipped] == ["b", "c", "d"]


def test_hand_written_configs_are_not_overwritten(tmp_path):
    (tmp_path / "mine.yaml").write_text("name: mine\n")
    with pytest.raises(SelectionError, match="hand-written"):
        write_prompt_configs(tmp_path, {"mine": f"{GENERATED_MARKER}\nname: mine\n"})
    assert (tmp_path / "mine.yaml").read_text() == "name: mine\n"
    write_prompt_configs(tmp_path, {"gen": f"{GENERATED_MARKER}\nname: gen\n"})
    write_prompt_configs(tmp_path, {"gen": f"{GENERATED_MARKER}\nname: gen\nids: []\n"})  # ours: overwritten
    assert "ids" in (tmp_path / "gen.yaml").read_text()


def compose_prompt(conf_dir: Path, name: str, *overrides: str):
    """The project config with ``prompt=<name>`` found in an extra search path (as conf/prompt would be)."""
    return compose_config([f"hydra.searchpath=[file://{conf_dir}]", f"prompt={name}", *overrides])


def test_history_selection_on_dsr_sub_writes_configs_hydra_composes(tmp_path):
    history = {"124": [0.0, 0.5, 1.0, 1.0], "0": [0.0, 0.0, 0.0, 0.0], "265": [0.0, 1.0, 0.0, 1.0],
               "7": [0.25, 0.75, 0.25, 0.75]}
    (tmp_path / "acc_step_500.json").write_text(json.dumps(history))
    out = tmp_path / "conf" / "prompt"
    ranking = tmp_path / "ranking.json"
    code = em_sweep("select-prompts", "select.pool=dsr_sub", "select.top=2", "select.name=rlvr",
                    f"select.history={tmp_path / 'acc_step_500.json'}", f"select.out_dir={out}",
                    f"select.ranking={ranking}")
    assert code == 0
    record = json.loads(ranking.read_text())
    # dsr265 has no answer in the pool: skipped; dsr124 std 0.41 > dsr7 std 0.25 > dsr0.
    assert [r["id"] for r in record["ranking"]] == ["dsr124", "dsr7", "dsr0"]
    assert {"id": "dsr265", "reason": "no answer to grade against"} in record["skipped"]
    assert sorted(p.name for p in out.iterdir()) == ["rlvr_dsr124.yaml", "rlvr_dsr7.yaml", "rlvr_top2.yaml"]
    cfg = compose_prompt(tmp_path / "conf", "rlvr_top2")
    assert cfg.prompt.pool == "dsr_sub" and list(cfg.prompt.ids) == ["dsr124", "dsr7"]
    validate(cfg)
    assert [p.id for p in select_prompts(cfg.prompt)] == ["dsr124", "dsr7"]
    assert "std of One-Shot RLVR training accuracy" in cfg.prompt.note


def test_select_prompts_reports_bad_input_in_one_line(tmp_path, capsys):
    (tmp_path / "h.json").write_text("{oops")
    out = f"select.out_dir={tmp_path}"
    assert em_sweep("select-prompts", "select.pool=dsr_sub", f"select.history={tmp_path / 'h.json'}", out) == 2
    err = capsys.readouterr().err
    assert "h.json: not valid JSON" in err and len(err.strip().splitlines()) == 1
    assert em_sweep("select-prompts", "select.k=4", out) == 2
    assert "select.pool" in capsys.readouterr().err
    assert em_sweep("select-prompts", "select.pool=no_such_pool", out) == 2
    assert "no_such_pool" in capsys.readouterr().err
    assert em_sweep("select-prompts", "select.pool=dsr_sub", "select.k=x", out) == 2
    assert "select.k=x" in capsys.readouterr().err
    assert em_sweep("select-prompts", "select.pool=dsr_sub", "modle=x", out) == 2
    assert "modle" in capsys.readouterr().err
    assert em_sweep("select-prompts", "select.pool=dsr_sub", "model.path=/no/such/model", out) == 2
    assert "/no/such/model" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.yaml"))


# ---------------------------------------------------------------- sampling, on the shipped model

def small_pool(path: Path) -> Path:
    """Arithmetic problems the default model half-solves, and one row with no answer."""
    rows = [("p1", "What is 12+7?", "19"), ("p2", "What is 48-9+3?", "42"), ("p3", "Compute 61+25-14+8.", "80"),
            ("p4", "What is 5+5?", "10"), ("p5", "Calculate 93-47+12-30+6.", "34"), ("nogold", "What is 1+1?", "")]
    path.write_text("".join(json.dumps({"id": i, "problem": q, "answer": a}) + "\n" for i, q, a in rows))
    return path


def test_selection_end_to_end_on_the_default_model_writes_loadable_configs(tmp_path):
    pool = small_pool(tmp_path / "pool.jsonl")
    out = tmp_path / "conf" / "prompt"
    ranking = tmp_path / "ranking.json"
    code = em_sweep("select-prompts", "model=tiny_arith", f"select.pool={pool}", "select.k=6", "select.top=3",
                    "train.sample_batch_size=16", f"select.out_dir={out}", f"select.ranking={ranking}")
    assert code == 0
    record = json.loads(ranking.read_text())
    assert record["method"] == "sampling" and record["k"] == 6 and record["responses"] == 5 * 6
    assert record["skipped"] == [{"id": "nogold", "reason": "no answer to grade against"}]
    ranked = record["ranking"]
    assert sorted(r["id"] for r in ranked) == ["p1", "p2", "p3", "p4", "p5"]
    for r in ranked:
        assert len(r["history"]) == 6 and set(r["history"]) <= {0.0, 1.0}
        assert r["variance"] == pytest.approx(np.var(r["history"]))
    assert [r["id"] for r in ranked] == rank_by_variance({r["id"]: r["history"] for r in ranked})
    top = [r["id"] for r in ranked[:3]]
    names = sorted(p.stem for p in out.glob("*.yaml"))
    assert names == sorted([f"sel_tiny_arith_{i}" for i in top] + ["sel_tiny_arith_top3"])
    cfg = compose_prompt(tmp_path / "conf", "sel_tiny_arith_top3")
    assert list(cfg.prompt.ids) == top and cfg.prompt.pool == str(pool.resolve())
    assert [p.id for p in preflight(cfg)] == top
    one = compose_prompt(tmp_path / "conf", f"sel_tiny_arith_{top[0]}")
    assert list(one.prompt.ids) == [top[0]] and "variance" in one.prompt.note
