"""The `em-sweep` command: tools around runs and sweeps (training itself is `python launch.py`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose(overrides: list[str]):
    """Compose the project's config (conf/config.yaml) with Hydra overrides, as launch.py does."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    import em_sweep.config  # noqa: F401  (registers the schema)

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a model or checkpoint without training: a run with train.steps=0."""
    from em_sweep.run import main

    cfg = compose([*args.overrides, "train.steps=0", "eval.at_steps=[0]"])
    main(cfg)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="em-sweep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("eval", help="score a model (any model.path) on eval.benchmarks without training")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model.path=/ckpt eval.benchmarks=[math500]")
    p.set_defaults(func=cmd_eval)
    from em_sweep import collect, selection, skewness
    from em_sweep.sweep import cli as sweep_cli

    selection.add_subcommand(sub)  # select-prompts
    skewness.add_subcommand(sub)  # logits
    sweep_cli.add_subcommands(sub)  # status, resubmit
    collect.add_subcommands(sub)  # collect, report
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    sys.exit(args.func(args))
