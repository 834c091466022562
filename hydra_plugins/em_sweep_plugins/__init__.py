"""em-sweep's Hydra plugins: ``hydra/sweeper=em_sweep``, ``hydra/launcher=slurm`` and ``hydra/launcher=local``.

Hydra only instantiates plugin classes defined under the ``hydra_plugins`` package, and imports
every module here at start-up to find them; so these are thin, import-light subclasses of the
implementations in ``em_sweep.sweep``, plus the registration of their config schemas (which
the YAML files in ``conf/hydra/`` extend).
"""

from hydra.core.config_store import ConfigStore

from em_sweep.sweep.launcher import (
    LocalLauncherConf,
    LocalSweepLauncher,
    SlurmLauncherConf,
    SlurmSweepLauncher,
)
from em_sweep.sweep.sweeper import FastSweeper, SweeperConf


class EmSweepSweeper(FastSweeper):
    """em-sweep's sweeper (em_sweep.sweep.sweeper.FastSweeper)."""


class EmSweepSlurmLauncher(SlurmSweepLauncher):
    """em-sweep's SLURM launcher (em_sweep.sweep.launcher.SlurmSweepLauncher)."""


class EmSweepLocalLauncher(LocalSweepLauncher):
    """em-sweep's in-process launcher (em_sweep.sweep.launcher.LocalSweepLauncher)."""


_store = ConfigStore.instance()
_store.store(group="hydra/sweeper", name="em_sweep_schema", node=SweeperConf, provider="em_sweep")
_store.store(group="hydra/launcher", name="em_sweep_slurm_schema", node=SlurmLauncherConf, provider="em_sweep")
_store.store(group="hydra/launcher", name="em_sweep_local_schema", node=LocalLauncherConf, provider="em_sweep")
