"""Hydra entry point: `python launch.py [overrides]` runs one experiment; `-m` runs a sweep."""

import os

# Idle torch CPU threads yield instead of spin-waiting: on a shared or busy CPU node spinning
# threads slow EM steps several-fold. Must be set before torch loads; GPU work is unaffected.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

import em_sweep.config  # noqa: E402, F401  (registers the structured-config schema)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def launch(cfg: DictConfig) -> None:
    # Imported here: torch/transformers cost ~4 s, which a sweep submission never needs.
    from em_sweep.run import main

    if cfg.train.parallel == "none":
        main(cfg)
        return
    # train.parallel=fsdp: this process is one rank of the run (torchrun --nproc-per-node N launch.py ...).
    from em_sweep.training.distributed import exit_after

    exit_after(main, cfg)


if __name__ == "__main__":
    launch()
