"""The W&B mirror: real offline runs (no server), spread over projects when asked."""

import pytest
from omegaconf import OmegaConf

from em_sweep.config import ConfigError, validate
from em_sweep.record import WandbMirror, project_for
from tests.conftest import compose_config


def test_project_shards_spread_runs_by_run_id_and_keep_each_run_in_one_project():
    ids = [f"{i:016x}" for i in range(300)]
    assert {project_for("em", r, 1) for r in ids} == {"em"}
    counts = {p: sum(project_for("em", r, 3) == p for r in ids) for p in ("em-0", "em-1", "em-2")}
    assert counts == {"em-0": 100, "em-1": 100, "em-2": 100}
    assert project_for("em", "00000000000000fe", 3) == project_for("em", "00000000000000fe", 3) == "em-2"


def test_an_offline_run_lands_in_its_shard_project(tmp_path):
    logger = OmegaConf.create({"mode": "offline", "project": "grid", "project_shards": 3, "entity": None,
                               "init_timeout_s": 60.0})
    mirror = WandbMirror(logger, tmp_path, "00000000000000fe", "sweep", {"seed": 1})
    try:
        assert mirror.run is not None and mirror.run.project == "grid-2"
    finally:
        mirror.finish()
    assert list((tmp_path / "wandb").glob("offline-run-*/*.wandb"))


def test_project_shards_must_be_positive():
    with pytest.raises(ConfigError, match="logger.project_shards"):
        validate(compose_config(["logger.project_shards=0"]))


def test_the_paper_grid_spreads_its_runs_over_two_projects():
    cfg = compose_config(["+experiment=paper_grid"])
    assert (cfg.logger.project, cfg.logger.project_shards) == ("paper_grid", 2)
