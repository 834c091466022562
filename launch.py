"""Hydra entry point: `python launch.py [overrides]` runs one experiment; `-m` runs a sweep."""

import hydra
from omegaconf import DictConfig

import em_sweep.config  # noqa: F401  (registers the structured-config schema)
from em_sweep.run import main


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def launch(cfg: DictConfig) -> None:
    main(cfg)


if __name__ == "__main__":
    launch()
