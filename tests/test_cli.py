"""The `em-sweep` command: one module owns every subcommand, one-line errors."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from em_sweep.cli import build_parser, main
from tests.conftest import ROOT
from tests.test_layout import module_name

PACKAGE = ROOT / "em_sweep"
SUBCOMMANDS = {"eval", "select-prompts", "logits", "status", "resubmit", "collect", "report"}


def test_one_module_registers_every_subcommand():
    registering = sorted(module_name(p) for p in PACKAGE.rglob("*.py")
                         if any(isinstance(n, ast.Attribute) and n.attr in ("add_parser", "add_subparsers")
                                for n in ast.walk(ast.parse(p.read_text()))))
    assert registering == ["em_sweep.cli"]
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.dest == "command"]
    assert set(sub.choices) == SUBCOMMANDS
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"em-sweep": "em_sweep.cli:main"}


@pytest.mark.parametrize("command, section", [("select-prompts", "select"), ("logits", "logits")])
def test_tool_commands_compose_the_run_config_launch_py_composes_plus_their_section(command, section):
    from omegaconf import OmegaConf

    from em_sweep.cli import compose

    overrides = ["model=qwen25_math_7b", "+experiment=example_sweep", "train.steps=3", "paths.root=/data"]
    tool = OmegaConf.to_container(compose(overrides, command), resolve=True)
    run = OmegaConf.to_container(compose(overrides), resolve=True)
    assert section in tool and section not in run
    assert {k: v for k, v in tool.items() if k != section} == run


def console_script() -> Path:
    """The installed `em-sweep` entry point beside this interpreter."""
    script = Path(sys.executable).parent / "em-sweep"
    assert script.is_file(), f"{script} missing: `pip install -e .` installs the em-sweep console script"
    return script


@pytest.mark.slow
@pytest.mark.parametrize("argv, names", [
    (["eval", "train.stpes=1"], "train.stpes"),
    (["eval", "train.steps=abc"], "train.steps=abc"),
    (["eval", "model=no_such_model"], "model/no_such_model"),
    (["eval", "train.steps=[1"], "train.steps=[1"),
    (["select-prompts", "select.pool=dsr_sub", "select.kk=3"], "select.kk"),
    (["select-prompts", "select.pool=dsr_sub", "select.k=x"], "select.k=x"),
    (["select-prompts", "select.pool=dsr_sub", "train.stpes=1"], "train.stpes"),
    (["logits", "logits.models=[tiny_arith]", "logits.nn=3"], "logits.nn"),
    (["logits", "logits.models=[tiny_arith]", "logits.n_responses=x"], "logits.n_responses=x"),
    (["logits", "logits.models=[tiny_arith]", "logits=no_such_method"], "logits/no_such_method"),
    (["logits", "logits.models=[tiny_arith]", "eval.seed=1.5"], "eval.seed=1.5"),
])
def test_override_errors_are_one_line_through_the_console_script(argv, names, tmp_path):
    """As launch.py: a misspelt key or a wrong type is one line naming it, exit status 2, nothing written."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run([str(console_script()), *argv, f"paths.root={tmp_path}"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and names in lines[0], proc.stderr[-2000:]
    assert proc.stdout == "" and not list(tmp_path.iterdir())


def test_resubmit_prints_the_status_first_and_status_has_no_resubmit_flag(tmp_path, capsys):
    from em_sweep import rundir
    from em_sweep.sweep import manifest
    from em_sweep.sweep.plan import PlannedRun

    sweep = tmp_path / "sweep"
    run = PlannedRun("r1", str(tmp_path / "runs" / "r1"), ("seed=1",), "m")
    manifest.append_manifest(sweep, [manifest.ManifestEntry(run, "local", 100.0)])
    manifest.write_launcher_settings(sweep, {"kind": "local"})
    rundir.write_status(Path(run.run_dir), "failed", reason="RuntimeError: boom")
    with pytest.raises(SystemExit) as done:
        main(["resubmit", str(sweep), "--dry-run"])
    captured = capsys.readouterr()
    assert f"sweep {sweep}: 1 runs" in captured.out and "RuntimeError: boom" in captured.out  # as `status` prints
    assert done.value.code == 2 and "was not submitted to SLURM" in captured.err  # a local sweep re-runs by launch
    with pytest.raises(SystemExit) as done:
        main(["status", str(sweep), "--resubmit"])
    assert done.value.code == 2 and "unrecognized arguments: --resubmit" in capsys.readouterr().err


def test_an_install_without_the_repositorys_configs_is_one_clear_line(tmp_path, monkeypatch, capsys):
    import em_sweep.cli as cli

    monkeypatch.setattr(cli, "CONF_DIR", tmp_path / "site-packages" / "conf")  # a non-editable install
    with pytest.raises(SystemExit) as done:
        main(["eval", "eval.limit=1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert done.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: em-sweep's configs are not at ") and "pip install -e" in err[0]
