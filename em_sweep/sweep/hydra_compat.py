"""The private Hydra and OmegaConf parts the sweep planner relies on, listed and checked in one place.

Hydra has no public API to apply overrides to a composed config or to expand a multirun, and
the planner must do both exactly as Hydra does (its run ids must equal a full composition's),
so it calls Hydra's own implementations:

- ``hydra._internal.config_loader_impl.ConfigLoaderImpl._apply_overrides_to_config(overrides, cfg)``
  (staticmethod): what Hydra applies after composing, in order;
- ``hydra._internal.core_plugins.basic_sweeper.BasicSweeper``: ``split_arguments(overrides,
  max_batch_size)`` (staticmethod: the cartesian product in Hydra's order), ``__init__(max_batch_size,
  params)`` and the ``hydra_context``/``config``/``launcher``/``params`` attributes its ``setup`` sets
  (em-sweep's sweeper subclasses it);
- the config loader's ``repository.group_exists`` (which keys are config groups);
- OmegaConf nodes' ``_get_node``, ``_is_none``, ``_is_missing``, ``_value`` (raw interpolation text).

Every use goes through this module: :func:`apply_overrides`, :func:`split_arguments`, :func:`node`,
:func:`is_set_dict`, :func:`raw_value` and the :class:`BasicSweeper` base class.
pyproject.toml pins the tested range (``hydra-core>=1.3.2,<1.4``, ``omegaconf>=2.3,<2.4``);
:func:`problems` says in words what changed if an installed version breaks any of these, and
``plan_sweep`` refuses to plan with such a version (tests/test_hydra_internals.py checks it).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

TESTED = "hydra-core>=1.3.2,<1.4 and omegaconf>=2.3,<2.4"

# This module is the only one in em-sweep that touches Hydra's internals (tests/test_hydra_internals.py
# checks that). Functions import them when called: Hydra's plugin scan can re-import its core plugin
# modules, and the checks must see the classes Hydra uses now.
try:  # the base class of em-sweep's sweeper
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
except ImportError as e:
    raise ImportError(f"em-sweep's sweep planner was tested with {TESTED}: {e}") from e

__all__ = ["BasicSweeper", "apply_overrides", "check", "node", "problems", "raw_value", "split_arguments",
           "is_set_dict"]


def _params(fn: Callable[..., Any]) -> list[str]:
    return [p for p in inspect.signature(fn).parameters if p != "self"]


def _check_static(problems: list[str], owner: type, name: str, expected: list[str]) -> None:
    where = f"{owner.__module__}.{owner.__name__}.{name}"
    raw = inspect.getattr_static(owner, name, None)
    if raw is None:
        problems.append(f"{where} no longer exists")
    elif not isinstance(raw, staticmethod):
        problems.append(f"{where} is no longer a staticmethod")
    elif _params(getattr(owner, name)) != expected:
        problems.append(f"{where} takes {_params(getattr(owner, name))}, the planner passes {expected}")


def problems() -> list[str]:
    """What in the installed Hydra/OmegaConf differs from what the planner relies on (empty: nothing)."""
    found: list[str] = []
    try:
        from hydra._internal.config_loader_impl import ConfigLoaderImpl
        from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    except ImportError as e:
        return [f"cannot import Hydra's internals: {e}"]
    _check_static(found, ConfigLoaderImpl, "_apply_overrides_to_config", ["overrides", "cfg"])
    _check_static(found, BasicSweeper, "split_arguments", ["overrides", "max_batch_size"])
    if _params(BasicSweeper.__init__)[:2] != ["max_batch_size", "params"]:
        found.append(f"BasicSweeper.__init__ takes {_params(BasicSweeper.__init__)}, em-sweep's sweeper passes "
                     "max_batch_size and params")
    else:
        sweeper = BasicSweeper(max_batch_size=None, params={"a": "1,2"})
        missing = [a for a in ("hydra_context", "config", "launcher", "params") if not hasattr(sweeper, a)]
        if missing or sweeper.params != {"a": "1,2"}:
            found.append(f"BasicSweeper no longer sets the attributes {missing or ['params']} em-sweep's sweeper reads")
    if "self.repository" not in inspect.getsource(ConfigLoaderImpl.__init__):
        found.append("ConfigLoaderImpl no longer sets self.repository (the planner asks it which keys are groups)")
    from hydra._internal.config_repository import ConfigRepository

    if not callable(getattr(ConfigRepository, "group_exists", None)):
        found.append("ConfigRepository.group_exists no longer exists")
    from omegaconf import DictConfig
    from omegaconf.base import Node

    for owner, name in ((DictConfig, "_get_node"), (Node, "_is_none"), (Node, "_is_missing"), (Node, "_value")):
        if not callable(getattr(owner, name, None)):
            found.append(f"omegaconf {owner.__name__}.{name} no longer exists")
    return found


@functools.cache
def check() -> None:
    """Raise RuntimeError, one message naming the versions and what changed, if :func:`problems` finds any."""
    found = problems()
    if found:
        raise RuntimeError(
            f"em-sweep's sweep planner was tested with {TESTED}; the installed hydra-core "
            f"{version('hydra-core')} / omegaconf {version('omegaconf')} changed what it relies on: "
            + "; ".join(found) + ". Install a tested version (pip install 'hydra-core>=1.3.2,<1.4').")


# ---------------------------------------------------------------- the accessors the planner calls

def apply_overrides(overrides: list[Any], cfg: Any) -> None:
    """Hydra's application of parsed overrides to a composed config, in place and in order."""
    from hydra._internal.config_loader_impl import ConfigLoaderImpl

    check()
    ConfigLoaderImpl._apply_overrides_to_config(overrides, cfg)


def split_arguments(overrides: list[Any]) -> list[list[list[str]]]:
    """Hydra's multirun expansion of parsed overrides (the cartesian product in BasicSweeper's order)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    check()
    return BasicSweeper.split_arguments(overrides, max_batch_size=None)


def node(cfg: Any, key: Any) -> Any:
    """The child node of ``cfg`` at ``key``, without resolving it."""
    return cfg._get_node(key)


def is_set_dict(child: Any) -> bool:
    """Whether a child node is a mapping that is neither None nor missing."""
    from omegaconf import DictConfig

    return isinstance(child, DictConfig) and not child._is_none() and not child._is_missing()


def raw_value(parent: Any, key: str) -> Any:
    """The unresolved value of ``parent``'s child ``key`` (an interpolation's own text)."""
    return parent._get_node(key)._value()

