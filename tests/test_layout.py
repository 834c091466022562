"""The package's structure: role packages, the direction of imports, stable public paths, the README's map."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGE = ROOT / "em_sweep"
ROLES = ("training", "generation", "evaluation", "analysis", "sweep")
# Stable public import paths kept from the flat layout: alias module -> where the code lives.
ALIASES = {
    "em_sweep.loss": "em_sweep.training.loss",
    "em_sweep.grading": "em_sweep.evaluation.grading",
    "em_sweep.selection": "em_sweep.analysis.selection",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the em_sweep modules it imports anywhere (top level or inside a function)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
                # `from em_sweep.analysis import collect` imports the module em_sweep.analysis.collect.
                deps.update(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_between_modules():
    graph = import_graph()
    assert "em_sweep.analysis.skewness" in graph["em_sweep.cli"] or "em_sweep.analysis.selection" in graph["em_sweep.cli"]
    assert cycles(graph) == []
    # The walk finds cycles through imports inside functions too.
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def role(module: str) -> str:
    """The role package a module belongs to (the package itself included), else "top"."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROLES else "top"


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports against the direction of the layers, as 'importer -> imported'.

    Generation serves training and evaluation, so it imports neither; nothing that trains,
    generates or evaluates knows about runs, sweeps, reports or the command line above it.
    """
    above = {"analysis", "sweep"}
    entry = {"em_sweep.run", "em_sweep.cli"}
    bad = []
    for importer, imported in sorted((a, b) for a, bs in graph.items() for b in bs):
        low, high = role(importer), role(imported)
        if low == "generation" and high in {"training", "evaluation"} | above:
            bad.append(f"{importer} -> {imported}")
        elif low in {"training", "generation", "evaluation"} and (high in above or imported in entry):
            bad.append(f"{importer} -> {imported}")
    return bad


def test_imports_follow_the_layers():
    graph = import_graph()
    assert "em_sweep.generation.sample" in graph["em_sweep.training.em"]  # the graph sees the real imports
    assert layer_violations(graph) == []
    # The rule catches an import against the layers.
    assert layer_violations({"em_sweep.generation.sample": {"em_sweep.training.em"},
                             "em_sweep.generation.decode": {"em_sweep.analysis"},
                             "em_sweep.training.em": {"em_sweep.sweep.plan", "em_sweep.config"},
                             "em_sweep.evaluation.evaluate": {"em_sweep.run"}}) == [
        "em_sweep.evaluation.evaluate -> em_sweep.run",
        "em_sweep.generation.decode -> em_sweep.analysis",
        "em_sweep.generation.sample -> em_sweep.training.em",
        "em_sweep.training.em -> em_sweep.sweep.plan",
    ]


def public_definitions(path: Path) -> set[str]:
    """The public names a module defines at its top level (functions, classes, constants; not loggers)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("_") and n not in {"log", "logger"}}


@pytest.mark.parametrize("alias", sorted(ALIASES))
def test_an_alias_offers_every_public_name_of_its_module_as_the_same_object(alias):
    module, target = importlib.import_module(alias), importlib.import_module(ALIASES[alias])
    expected = public_definitions(Path(target.__file__))
    assert len(expected) >= 5, alias
    assert sorted(expected - set(vars(module))) == [], f"{alias} lacks these names of {ALIASES[alias]}"
    for name in expected:
        assert getattr(module, name) is getattr(target, name), f"{alias}.{name}"
    # The alias only re-exports: a docstring and imports from its module, nothing else.
    body = ast.parse(Path(module.__file__).read_text()).body
    assert isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant), alias
    assert all(isinstance(n, ast.ImportFrom) and n.module == ALIASES[alias] for n in body[1:]), alias


def test_the_names_users_import_are_where_the_readme_says():
    from em_sweep.grading import extract_answer, grade_many, is_equivalent
    from em_sweep.loss import token_entropy
    from em_sweep.selection import rank_by_variance
    assert extract_answer("so \\boxed{42}") == "42"
    assert is_equivalent("1/2", "0.5") and not is_equivalent("1/3", "0.5")
    assert [g.correct for g in grade_many(["4", "5"], [["4"], ["6"]])] == [True, False]
    assert rank_by_variance({"a": [0.1, 0.9], "b": [0.5, 0.5]}) == ["a", "b"]
    import torch
    logits = torch.zeros(1, 2, 4)
    assert torch.allclose(token_entropy(logits, torch.ones(1, 2), 1.0), torch.log(torch.tensor(4.0)))


def readme_map() -> tuple[set[str], str]:
    """The paths the README's "Where things live" table names, and that section's text."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Where things live"):]
    section = section[:section.index("\n## ", 1)]
    named: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        folder = ""
        for token in re.findall(r"`([^`]+)`", line.split(" | ")[0]):
            if "/" in token:
                folder = token if token.endswith("/") else token.rpartition("/")[0] + "/"
                named.add(token)
            else:
                named.add(folder + token)
    return named, section


def test_the_readme_maps_every_module():
    named, section = readme_map()
    covered_folders = [n for n in named if n.endswith("/")]
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        if path.name == "__init__.py" or module_name(path) in ALIASES:
            continue
        if rel not in named and not any(rel.startswith(f) for f in covered_folders):
            missing.append(rel)
    assert missing == []
    for alias in ALIASES:
        assert f"`{alias}`" in section, alias
    assert not [n for n in named if n.startswith("em_sweep/") and not (ROOT / n).exists()]


@pytest.mark.parametrize("package", [r for r in ROLES])
def test_each_role_package_says_what_each_of_its_modules_is_for(package):
    folder = PACKAGE / package
    doc = ast.get_docstring(ast.parse((folder / "__init__.py").read_text())) or ""
    modules = sorted(p.stem for p in folder.glob("*.py") if p.name != "__init__.py")
    assert modules
    assert [m for m in modules if f"``{m}``" not in doc] == []


def test_the_package_docstring_names_each_role_and_each_top_level_module():
    doc = ast.get_docstring(ast.parse((PACKAGE / "__init__.py").read_text())) or ""
    top = sorted(p.stem for p in PACKAGE.glob("*.py")
                 if p.name != "__init__.py" and f"em_sweep.{p.stem}" not in ALIASES)
    assert "run" in top and "rundir" in top
    assert [m for m in [*ROLES, *top] if f"``{m}``" not in doc] == []
    assert [a for a in ALIASES if f"``{a}``" not in doc] == []
