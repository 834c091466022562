"""The `em-sweep` command: every subcommand's arguments live here (training itself is `python launch.py`).

- ``eval``, ``select-prompts``, ``logits``: Hydra overrides of the project config (conf/config.yaml),
  composed as launch.py composes them; ``select-prompts`` adds the ``select.*`` keys and ``logits``
  the ``logits.*`` keys and the method group ``logits=raw|reference`` (em_sweep/config.py).
- ``status``, ``resubmit`` (em_sweep/sweep/cli.py), ``collect`` (em_sweep/analysis/collect.py), ``report``
  (em_sweep/analysis/report.py): a directory and flags.

Bad input (a misspelt key, a wrong type, a missing file or model) is one line on stderr, ``error: ...``,
and exit status 2, before any model loads. docs/cli.md describes every subcommand.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from em_sweep.sweep import REASONS_SHOWN

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
PRIMARY_CONFIG = "config"

# Subcommands with a section of their own: the primary config composed for each, named after it.
COMMAND_CONFIGS = {"select-prompts": "em_sweep_select", "logits": "em_sweep_logits"}


# ---------------------------------------------------------------- composition

def _register_command_config(command: str) -> str:
    """Register the primary config of a tool command: conf/config.yaml's defaults list and values with
    the run schema swapped for the command's (which extends it by one section), so the command sees
    exactly the run config launch.py would compose, plus its own keys. Returns the config name."""
    import yaml
    from hydra.core.config_store import ConfigStore

    from em_sweep.config import COMMAND_SCHEMAS, SCHEMA_NAME, register_commands

    register_commands()
    schema, _ = COMMAND_SCHEMAS[command]
    base = yaml.safe_load((CONF_DIR / f"{PRIMARY_CONFIG}.yaml").read_text())
    defaults = [schema if d == SCHEMA_NAME else d for d in base["defaults"]]
    if command == "logits":
        defaults.insert(defaults.index(schema) + 1, {"logits": "raw"})  # the method group, raw by default
    name = COMMAND_CONFIGS[command]
    ConfigStore.instance().store(name=name, node={**base, "defaults": defaults})
    return name


def compose(overrides: Sequence[str], command: str | None = None) -> Any:
    """The project's config composed with Hydra overrides, as launch.py composes it; for a tool
    command (``select-prompts``, ``logits``) its primary config, which adds the command's section."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from em_sweep.config import ConfigError  # importing it registers the schemas

    if not (CONF_DIR / f"{PRIMARY_CONFIG}.yaml").is_file():
        raise ConfigError(f"em-sweep's configs are not at {CONF_DIR}: em-sweep runs from its repository "
                          "(conf/ and launch.py live there); install the checkout with pip install -e <checkout>")
    name = _register_command_config(command) if command in COMMAND_CONFIGS else PRIMARY_CONFIG
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name=name, overrides=list(overrides))


def override_keys(overrides: Sequence[str]) -> list[tuple[str, str]]:
    """(key or group, override text) of each override, parsed by Hydra's override grammar."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return [(o.key_or_group, o.input_line or "") for o in OverridesParser.create().parse_overrides(list(overrides))]


# ---------------------------------------------------------------- one-line errors

def one_line(e: BaseException) -> str:
    """A bad-input exception as one line: its first line, then the first line of the OmegaConf error
    behind a Hydra one (``Could not override 'train.stpes': Key 'stpes' not in 'TrainConfig'``), or
    the options of a missing config group choice."""
    from omegaconf.errors import OmegaConfBaseException

    lines = str(e).strip().splitlines()
    text = lines[0].strip().rstrip(".") if lines else type(e).__name__
    cause = e.__cause__
    if isinstance(cause, OmegaConfBaseException):
        msg = str(getattr(cause, "msg", None) or cause).strip().splitlines()
        if msg:
            text = f"{text}: {msg[0]}"
    override = getattr(e, "override", None)  # hydra's OverrideParseException: the override it could not parse
    if isinstance(override, str) and override not in text:
        text = f"{override}: {text}"
    options = getattr(e, "options", None)  # hydra's MissingConfigException: the group's choices
    if options:
        text = f"{text} (available: {', '.join(options)})"
    full_key = getattr(e, "full_key", None)
    if isinstance(e, OmegaConfBaseException) and full_key and full_key not in text:
        text = f"{text} ({full_key})"
    return text


# Exceptions that mean bad input to a command: (module, class). A class counts only once its
# module is imported (an error can come only from a module that ran), so classifying one never
# imports torch.
INPUT_ERRORS = (("hydra.errors", "HydraException"), ("omegaconf.errors", "OmegaConfBaseException"),
                ("em_sweep.config", "ConfigError"), ("em_sweep.prompts", "PromptError"),
                ("em_sweep.evaluation.benchmarks", "BenchmarkError"), ("em_sweep.models", "ModelLoadError"),
                ("em_sweep.analysis.selection", "SelectionError"), ("em_sweep.analysis.skewness", "LogitsError"))


def is_input_error(e: BaseException) -> bool:
    return any(isinstance(e, getattr(sys.modules[module], name))
               for module, name in INPUT_ERRORS if module in sys.modules)


def _reported(command: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """Run ``command``; bad input becomes ``error: <one line>`` on stderr and exit status 2."""

    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except Exception as e:
            if not is_input_error(e):
                raise
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2

    return run


# ---------------------------------------------------------------- the commands that compose configs

@_reported
def cmd_eval(args: argparse.Namespace) -> int:
    """Score a model or checkpoint without training: a run with train.steps=0."""
    cfg = compose([*args.overrides, "train.steps=0", "eval.at_steps=[0]"])
    from em_sweep.run import main  # after composing: a bad override never waits for torch to load

    main(cfg)
    return 0


@_reported
def cmd_select_prompts(args: argparse.Namespace) -> int:
    from em_sweep.analysis.selection import format_ranking, select_prompts_command

    cfg = compose(args.overrides, "select-prompts")
    # What chooses and samples the model: everything but select.*, where outputs go, and Hydra's own keys.
    model_overrides = [text for key, text in override_keys(args.overrides)
                       if key.split(".")[0] not in ("select", "paths", "hydra")]
    command = " ".join(["em-sweep select-prompts", *args.overrides])
    print(format_ranking(select_prompts_command(cfg, model_overrides, command)))
    return 0


def model_entries(models: Sequence[str], overrides: Sequence[str], base: Any) -> list[Any]:
    """Each ``logits.models`` entry as a :class:`em_sweep.analysis.skewness.ModelEntry`: a model preset
    (conf/model/<entry>.yaml) is composed with the command's other overrides; anything else is a
    checkpoint or HF path loaded with the base config's dtype, device and loading options."""
    from omegaconf import OmegaConf

    from em_sweep.analysis.skewness import ModelEntry, model_label

    # The preset replaces any model= choice of the command line (it would be given twice).
    rest = [text for key, text in override_keys(overrides) if key.lstrip("+~") != "model"]
    entries = []
    for entry in models:
        if (CONF_DIR / "model" / f"{entry}.yaml").is_file():
            model_cfg = compose([*rest, f"model={entry}"], "logits").model
        else:
            model_cfg = OmegaConf.create(OmegaConf.to_container(base.model, resolve=True))
            model_cfg.path, model_cfg.name = entry, model_label(entry)
        entries.append(ModelEntry(entry, model_label(entry), model_cfg))
    return entries


@_reported
def cmd_logits(args: argparse.Namespace) -> int:
    from omegaconf import OmegaConf

    from em_sweep.analysis.skewness import run_logits
    from em_sweep.config import validate_logits

    cfg = compose(args.overrides, "logits")
    settings = OmegaConf.to_object(cfg.logits)  # the method's dataclass, interpolations resolved
    validate_logits(settings)
    run_logits(settings, model_entries(settings.models, args.overrides, cfg))
    return 0


# ---------------------------------------------------------------- the parser

def _handler(target: str) -> Callable[[argparse.Namespace], int]:
    """``module:function``, imported when the subcommand runs (so `--help` and the commands that
    compose configs never import pandas, matplotlib or torch)."""

    def run(args: argparse.Namespace) -> int:
        module, name = target.split(":")
        return getattr(importlib.import_module(module), name)(args)

    return run


OVERRIDES_HELP = "Hydra overrides, e.g. model=qwen25_math_7b model.path=/ckpt eval.benchmarks=[math500]"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="em-sweep", description="Tools around em-sweep runs and sweeps "
                                     "(training: python launch.py). Every subcommand: docs/cli.md.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("eval", help="score a model (any model.path) on eval.benchmarks without training",
                       description="A run with train.steps=0 and eval.at_steps=[0]: the run directory, "
                                   "results.json and summary of a launch.py run.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help=OVERRIDES_HELP)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("select-prompts", help="rank pool prompts by variance of correctness; write prompt configs",
                       description="Rank a pool's prompts by the variance of the model's correctness over "
                                   "select.k samples (or by the std of a One-Shot RLVR accuracy history, "
                                   "select.history=...) and write conf/prompt/<name>.yaml for each of the top "
                                   "select.top prompts plus one multi-shot config.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="select.pool=<name|path> (required), select.k=16, select.top=6, select.name, "
                        "select.limit, select.ids=[...], select.history=<json>, select.id_prefix, "
                        "select.out_dir, select.ranking, select.force=true; and any run-config override "
                        "(model=<preset>, model.path=<checkpoint>, train.sample_temperature=..., seed=...)")
    p.set_defaults(func=cmd_select_prompts)

    p = sub.add_parser("logits", help="skewness and histogram of the logits of sampled responses, per model",
                       description="Sample one response per prompt from each model and report the skewness, "
                                   "mean, std and histogram of its logits: logits=raw (raw logits of benchmark "
                                   "responses, default) or logits=reference (the reference logits_shift.py: "
                                   "processed top-k scores of DSR-sub responses).")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="logits=raw|reference, logits.models=[<preset>|<checkpoint>|<HF path>,...] (required), "
                        "logits.n_responses, logits.max_new_tokens, logits.temperature, logits.top_p, "
                        "logits.top_k, logits.seed, logits.bins, logits.range=[lo,hi], logits.out_dir, ... "
                        "(docs/cli.md); and any run-config override (model=<preset> sets dtype/device for paths)")
    p.set_defaults(func=cmd_logits)

    p = sub.add_parser("status", help="counts of done / running / failed / pending runs of a sweep")
    p.add_argument("sweep_dir", help="a sweep directory (hydra.sweep.dir, holding manifest.jsonl), or a folder "
                                     "above sweeps (e.g. outputs/) to report each")
    p.add_argument("--reasons", type=int, default=REASONS_SHOWN, help="distinct failure reasons to list (default %(default)s)")
    p.set_defaults(func=_handler("em_sweep.sweep.cli:cmd_status"))

    p = sub.add_parser("resubmit", help="print a sweep's status, then resubmit its failed, interrupted and "
                                        "never-started runs to SLURM")
    p.add_argument("sweep_dir", help="the sweep directory (hydra.sweep.dir; it holds manifest.jsonl)")
    p.add_argument("--dry-run", action="store_true", help="only say how many runs would be resubmitted")
    p.add_argument("--reasons", type=int, default=REASONS_SHOWN, help="distinct failure reasons to list (default %(default)s)")
    p.set_defaults(func=_handler("em_sweep.sweep.cli:cmd_resubmit"))

    p = sub.add_parser("collect", help="gather a sweep's run directories into parquet tables",
                       description="One row per (run, step, benchmark, temperature) in scores.parquet and per "
                                   "(run, step) in train.parquet, with the run's settings as columns.")
    p.add_argument("dir", help="a sweep dir (manifest.jsonl), a paths.root (runs/) or a runs/ dir")
    p.add_argument("--name", help="keep runs whose config.name is NAME")
    p.add_argument("--out", help="output directory (default: <dir>/collected)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_handler("em_sweep.analysis.collect:cmd_collect"))

    p = sub.add_parser("report", help="figures + a Markdown report of a sweep's findings",
                       description="Collect (unless given collected tables), then write report.md and its "
                                   "figures; logits skewness comes from an `em-sweep logits` skewness.json.")
    p.add_argument("dir", help="a sweep dir, a paths.root, a runs/ dir, or a collected scores.parquet (or its dir)")
    p.add_argument("--name", help="keep runs whose config.name is NAME")
    p.add_argument("--out", help="output directory (default: <dir>/report)")
    p.add_argument("--skewness", action="append", help="an `em-sweep logits` skewness.json (repeatable)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_handler("em_sweep.analysis.report:cmd_report"))
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `em-sweep` console script: exits with the subcommand's status."""
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))


if __name__ == "__main__":
    main()
