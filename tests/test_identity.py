"""Run identity (em_sweep.rundir): one rule, by content, versioned; verified completion; file modes."""

from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from em_sweep import rundir
from em_sweep.prompts import PROMPTS_DIR, PromptError, resolve_pool_path
from tests.conftest import ROOT, compose_config

TINY_MODEL = ROOT / "em_sweep" / "assets" / "tiny-arith"
# The default run (conf/config.yaml as shipped: tiny_arith, arith_default, arith): its id under
# identity version 2. A change of the rule, the shipped model, pool or benchmark moves it: update
# it deliberately (and bump rundir.ID_VERSION when the rule itself changed).
DEFAULT_RUN_ID = "55d51e3af8f926d2"


def rid(*overrides: str) -> str:
    return rundir.run_id(compose_config(list(overrides)))


def test_the_identity_version_and_the_default_runs_id_are_pinned():
    assert rundir.ID_VERSION == 2
    payload = rundir.identity(compose_config())
    assert payload["id_version"] == 2 and set(payload) == {"id_version", "config", "inputs"}
    assert rid() == DEFAULT_RUN_ID


def test_every_config_key_is_in_the_id_unless_listed_as_excluded():
    """An exclusion list, not an inclusion list: a key added to the schema is part of the id."""
    def leaves(tree, prefix=""):
        for k, v in tree.items():
            yield from leaves(v, f"{prefix}{k}.") if isinstance(v, dict) and v else [f"{prefix}{k}"]

    for stages in ("[em]", "[em,rl]"):
        cfg = compose_config([f"stages={stages}"])
        everything = set(leaves(rundir._container(cfg)))
        hashed = set(leaves(rundir.science_config(cfg)))
        excluded = {k for k in everything
                    if any(k == x or k.startswith(x + ".") for x in rundir.NOT_IN_RUN_ID)
                    or (stages == "[em]" and k.startswith("rl."))
                    # the sandbox's limits: only with a code benchmark (the default has none)
                    or k in {f"eval.{x}" for x in rundir.CODE_ONLY_EVAL_KEYS}}
        assert hashed == everything - excluded


@pytest.mark.parametrize("override", [
    "prompt.note=reworded", "prompt.name=another_name", "model.name=renamed", "name=other_sweep",
    "paths.root=/elsewhere", "logger.mode=disabled", "logger.project=p2",
    "train.compile_loss=true", "train.share_prompt_pass=true", "train.micro_batch_size=16",
    "train.loss_chunk_tokens=128", "model.gradient_checkpointing=true",
])
def test_documentation_and_rounding_only_keys_leave_the_id(override):
    assert rid(override) == DEFAULT_RUN_ID


@pytest.mark.parametrize("override", [
    "seed=16", "train.lr=1e-3", "train.sample_batch_size=32", "train.generation_backend=hf",
    "train.optimizer=adamw", "eval.batch_size=100", "model.dtype=bfloat16", "prompt.ids=[arith1]",
    "eval.limit=5", "stages=[em,rl]",
])
def test_settings_that_change_results_change_the_id(override):
    assert rid(override) != DEFAULT_RUN_ID


def test_the_prompt_texts_identify_the_run(tmp_path, monkeypatch):
    pool = tmp_path / "pool.jsonl"
    rows = [{"id": "p1", "problem": "What is 2+3?", "answer": "5"}, {"id": "p2", "problem": "What is 4+4?", "answer": "8"}]
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = rid(f"prompt.pool={pool}", "prompt.ids=[p1]")
    # Another prompt of the pool edited: p1's run keeps its id.
    rows[1]["problem"] = "What is 4+5?"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert rid(f"prompt.pool={pool}", "prompt.ids=[p1]") == base
    # The trained prompt edited in place (same length, same second: only the bytes differ).
    rows[0]["problem"] = "What is 2+4?"
    pool.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert rid(f"prompt.pool={pool}", "prompt.ids=[p1]") != base
    # Another file at the same relative path (another working directory).
    for sub, problem in (("a", "What is 1+1?"), ("b", "What is 1+2?")):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "pool.jsonl").write_text(json.dumps({"id": "p1", "problem": problem, "answer": "2"}) + "\n")
    ids = []
    for sub in ("a", "b"):
        monkeypatch.chdir(tmp_path / sub)
        ids.append(rid("prompt.pool=pool.jsonl", "prompt.ids=[p1]"))
    assert ids[0] != ids[1]


def test_a_shipped_pool_name_is_the_shipped_file_whatever_the_working_directory_holds(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shipped = rid("prompt.pool=arith_pool")
    forged = PROMPTS_DIR.joinpath("arith_pool.jsonl").read_text().replace("52+5+59", "52+5+60")
    for name in ("arith_pool", "arith_pool.jsonl"):
        (tmp_path / name).write_text(forged)
    assert resolve_pool_path("arith_pool") == PROMPTS_DIR / "arith_pool.jsonl"
    assert rid("prompt.pool=arith_pool") == shipped
    # A path is the user's file: its texts give another id.
    assert resolve_pool_path("arith_pool.jsonl") == Path("arith_pool.jsonl")
    assert resolve_pool_path("./arith_pool.jsonl") == Path("arith_pool.jsonl")
    users = rid("prompt.pool=arith_pool.jsonl")
    (tmp_path / "arith_pool.jsonl").unlink()
    assert resolve_pool_path("arith_pool.jsonl") == PROMPTS_DIR / "arith_pool.jsonl"  # not here: the shipped one
    assert rid("prompt.pool=arith_pool.jsonl") != users  # the shadowing file never reuses the shipped run
    with pytest.raises(PromptError, match="a file of your own is given by its path"):
        resolve_pool_path("no_such_pool")


def test_a_custom_benchmark_files_content_identifies_the_run(tmp_path):
    bench = tmp_path / "mine.jsonl"
    bench.write_text(json.dumps({"q": "What is 1+1?", "a": "2"}) + "\n")
    entry = f"eval.benchmarks=[{{name:mine,path:{bench},question_field:q,answer_field:a}}]"
    base = rid(entry)
    bench.write_text(json.dumps({"q": "What is 1+1?", "a": "3"}) + "\n")  # same size, same path
    assert rid(entry) != base


def test_a_local_models_files_identify_the_run_and_their_digests_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("EM_SWEEP_CACHE_DIR", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(TINY_MODEL, model)
    base = rid(f"model.path={model}")
    assert base == rid(f"model.path={model}")
    config = json.loads((model / "config.json").read_text())
    config["rope_theta"] = config.get("rope_theta", 10000.0) * 2
    (model / "config.json").write_text(json.dumps(config))
    edited_config = rid(f"model.path={model}")
    assert edited_config != base
    with open(model / "model.safetensors", "r+b") as f:  # one byte of the weights
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    assert rid(f"model.path={model}") not in (base, edited_config)
    # The digests are kept on disk by path, size, mtime and inode: another process reads them back.
    cached = rundir.read_jsonl(tmp_path / "cache" / rundir.DIGEST_CACHE)
    weights = [r for r in cached if r["path"].endswith("model.safetensors")]
    assert weights and weights[-1]["digest"].startswith("sha256:")
    key = rundir._stat_key(model / "model.safetensors")
    rundir._file_digests.clear()
    rundir._disk_cache_loaded.clear()
    # A fake entry for the current weights (not a real digest) proves the cache is read, not the file.
    rundir.append_jsonl(tmp_path / "cache" / rundir.DIGEST_CACHE,
                        {"path": key[0], "size": key[1], "mtime_ns": key[2], "ino": key[3], "digest": "sha256:fake"})
    assert rundir.file_digest(model / "model.safetensors", persist=True) == "sha256:fake"
    rundir._file_digests.clear()


def test_a_hub_model_is_identified_by_its_cached_revision(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--someorg--somemodel"
    assert rundir.model_digest("someorg/somemodel") == {"hub_id": "someorg/somemodel", "revision": None}
    unresolved = rid("model.path=someorg/somemodel")
    ids = []
    for commit in ("a" * 40, "b" * 40):
        (repo / "snapshots" / commit).mkdir(parents=True)
        (repo / "snapshots" / commit / "config.json").write_text("{}")
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
        assert rundir.model_digest("someorg/somemodel")["revision"] == commit
        ids.append(rid("model.path=someorg/somemodel"))
    assert len({unresolved, *ids}) == 3


def test_run_files_get_the_users_umask(tmp_path):
    """Atomic writes go through mkstemp (0600): they must end up as an ordinary open() would make them."""
    before = os.umask(0o002)
    try:
        rundir.write_text_atomic(tmp_path / "a.txt", "x")
        rundir.write_json_atomic(tmp_path / "b.json", {})
        rundir.write_status(tmp_path, "running")
        with open(tmp_path / "plain", "w") as f:
            f.write("x")
    finally:
        os.umask(before)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()}
    assert modes == {"a.txt": 0o664, "b.json": 0o664, rundir.STATUS: 0o664, "plain": 0o664}


@pytest.mark.parametrize("content, state", [
    (None, rundir.ABSENT),
    ('{"run_id": "RUN", "scores": []}', rundir.COMPLETE),
    ('{"run_id": "RUN", "sco', rundir.CORRUPT),  # torn
    ("", rundir.CORRUPT),
    (b"\xff\xfe\x00garbage", rundir.CORRUPT),
    ("[1, 2]", rundir.CORRUPT),
    ('{"run_id": "another"}', rundir.CORRUPT),
    ('{"scores": []}', rundir.CORRUPT),
    ("DIRECTORY", rundir.UNREADABLE),
])
def test_done_means_results_that_parse_and_name_the_run(tmp_path, content, state):
    run = tmp_path / "RUN"
    run.mkdir()
    if content == "DIRECTORY":
        (run / rundir.RESULTS).mkdir()
    elif isinstance(content, bytes):
        (run / rundir.RESULTS).write_bytes(content)
    elif content is not None:
        (run / rundir.RESULTS).write_text(content)
    found, why = rundir.completion(run)
    assert found == state
    assert rundir.is_complete(run) == (state == rundir.COMPLETE)
    assert (why is None) == (state in (rundir.COMPLETE, rundir.ABSENT))


def test_a_corrupt_runs_files_are_set_aside_not_deleted(tmp_path):
    run = tmp_path / "RUN"
    run.mkdir()
    (run / rundir.RESULTS).write_text('{"run_id": "RU')
    (run / rundir.METRICS).write_text("{}\n")
    (run / rundir.ATTEMPTS).write_text("1\n")
    aside = rundir.set_aside(run, "results.json: torn")
    assert aside.parent == run and aside.name.startswith(rundir.CORRUPT_PREFIX)
    assert sorted(p.name for p in aside.iterdir()) == ["WHY", rundir.METRICS, rundir.RESULTS]
    assert (aside / rundir.RESULTS).read_text() == '{"run_id": "RU'
    assert sorted(p.name for p in run.iterdir()) == [rundir.ATTEMPTS, aside.name]


def test_em_sweep_eval_says_when_it_serves_a_finished_run(tmp_path, capsys):
    from em_sweep.cli import main

    args = ["eval", f"paths.root={tmp_path}", "logger.mode=disabled", "eval.limit=4", "eval.max_new_tokens=8"]
    for _ in range(2):
        with pytest.raises(SystemExit) as done:
            main(args)
        assert done.value.code == 0
    (run,) = (tmp_path / "runs").iterdir()
    out = capsys.readouterr().out
    assert out.count("skipped: already complete") == 1 and f"skipped: already complete (run {run.name})" in out
