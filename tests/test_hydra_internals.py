"""The private Hydra/OmegaConf parts the sweep planner uses: pinned, and checked so a change fails loudly."""

from __future__ import annotations

import ast
import importlib
import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from packaging.requirements import Requirement

from em_sweep.sweep import hydra_compat

ROOT = Path(__file__).resolve().parents[1]


def test_installed_hydra_and_omegaconf_are_in_the_pinned_tested_range():
    deps = [Requirement(d) for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]]
    for name in ("hydra-core", "omegaconf"):
        spec = next(d.specifier for d in deps if d.name == name)
        assert "<" in str(spec), f"{name} has no upper bound in pyproject.toml ({spec})"
        assert spec.contains(version(name)), f"installed {name} {version(name)} is outside the pinned {spec}"
        stated = hydra_compat.TESTED.split(name, 1)[1].split(" and ")[0]
        assert all(str(s) in stated for s in spec), f"hydra_compat.TESTED ({hydra_compat.TESTED}) does not state {spec}"


def test_the_hydra_internals_the_planner_uses_are_unchanged():
    found = hydra_compat.problems()
    assert not found, ("Hydra/OmegaConf internals that em_sweep/sweep/plan.py and sweeper.py rely on changed: "
                       + "; ".join(found) + ". Adapt the planner (and hydra_compat) or keep the pinned range.")


def test_the_internals_behave_as_the_planner_assumes():
    """Not only the signatures: overrides apply in place in order, and the expansion is Hydra's product order."""
    parser = OverridesParser.create()
    cfg = OmegaConf.create({"a": {"b": 1}, "c": [1]})
    ConfigLoaderImpl._apply_overrides_to_config(parser.parse_overrides(["a.b=2", "+d=3", "c=[4,5]"]), cfg)
    assert OmegaConf.to_container(cfg) == {"a": {"b": 2}, "c": [4, 5], "d": 3}
    batches = BasicSweeper.split_arguments(parser.parse_overrides(["x=1,2", "y=a,b", "z=0"]), max_batch_size=None)
    assert batches == [[["x=1", "y=a", "z=0"], ["x=1", "y=b", "z=0"], ["x=2", "y=a", "z=0"], ["x=2", "y=b", "z=0"]]]


def test_a_changed_internal_is_named_and_stops_planning(monkeypatch):
    def renamed(overrides, config):  # the second parameter renamed, as a Hydra refactor might
        raise AssertionError("not called")

    monkeypatch.setattr(ConfigLoaderImpl, "_apply_overrides_to_config", staticmethod(renamed))
    assert hydra_compat.problems() == [
        "hydra._internal.config_loader_impl.ConfigLoaderImpl._apply_overrides_to_config takes "
        "['overrides', 'config'], the planner passes ['overrides', 'cfg']"]
    hydra_compat.check.cache_clear()
    try:
        with pytest.raises(RuntimeError, match=r"tested with hydra-core>=1\.3\.2,<1\.4 .* installed hydra-core "
                                               + version("hydra-core").replace(".", r"\.")):
            hydra_compat.check()
    finally:
        hydra_compat.check.cache_clear()
    # The class as loaded now: Hydra's plugin scan re-imports its core plugin modules.
    live = importlib.import_module("hydra._internal.core_plugins.basic_sweeper").BasicSweeper
    monkeypatch.delattr(live, "split_arguments")
    found = hydra_compat.problems()
    assert any("BasicSweeper.split_arguments no longer exists" in p for p in found), found
    # The multirun expansion, the planner's first call into Hydra, checks before it calls.
    from em_sweep.sweep.plan import expand_jobs
    hydra_compat.check.cache_clear()
    try:
        with pytest.raises(RuntimeError, match="split_arguments no longer exists"):
            expand_jobs(None, ["seed=1,2"])  # type: ignore[arg-type]
    finally:
        hydra_compat.check.cache_clear()


PRIVATE_NAMES = {"_get_node", "_is_none", "_is_missing", "_value", "_apply_overrides_to_config"}


def private_uses(path: Path) -> list[str]:
    """Imports of Hydra's internals and calls of the private OmegaConf/Hydra names in one file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hydra._internal"):
            found.append(f"{path.name}:{node.lineno} imports {node.module}")
        elif isinstance(node, ast.Import) and any(a.name.startswith("hydra._internal") for a in node.names):
            found.append(f"{path.name}:{node.lineno} imports hydra._internal")
        elif isinstance(node, ast.Attribute) and node.attr in PRIVATE_NAMES:
            found.append(f"{path.name}:{node.lineno} uses {node.attr}")
    return found


def test_only_hydra_compat_touches_hydra_and_omegaconf_internals():
    compat = ROOT / "em_sweep" / "sweep" / "hydra_compat.py"
    others = [p for p in [*(ROOT / "em_sweep").rglob("*.py"), *(ROOT / "hydra_plugins").rglob("*.py"),
                          ROOT / "launch.py"] if p != compat]
    assert [u for p in others for u in private_uses(p)] == []
    assert len(private_uses(compat)) >= 5  # the scan sees them where they are
