"""Assembles the Dagster code location: assets, checks, job, sensor and resources.

Storage is chosen by environment, not code:
  PROVENANCE_HOME         artifacts, warehouse and Dagster instance (default: <project>/.provenance)
  PROVENANCE_EXPERIMENTS  folder of experiment specs (default: <project>/experiments)
  PROVENANCE_DEVICE       auto | cpu | cuda[:i]   (default: auto)
"""
from __future__ import annotations

import os
from pathlib import Path

from dagster import Definitions
from dagster_duckdb import DuckDBResource

from assets import (ALL_ASSETS, ALL_CHECKS, STUDY_JOBS, experiment_specs_sensor, inbox_sensor, lineage_job,
                    observe_sources_job, score_queries_job, stale_experiments_schedule)
from resources import ArtifactStoreResource, ComputeResource, ExperimentsResource

PROJECT = Path(__file__).resolve().parent


def home() -> Path:
    """$PROVENANCE_HOME (a relative one from the user's directory, ops.spec.user_dir), else <project>/.provenance."""
    from ops.spec import user_path

    return user_path(os.environ.get("PROVENANCE_HOME") or PROJECT / ".provenance").resolve()


def experiments_dir() -> Path:
    from ops.spec import user_path

    return user_path(os.environ.get("PROVENANCE_EXPERIMENTS") or PROJECT / "experiments").resolve()


def make_resources(home_dir: Path | None = None, exp_dir: Path | None = None) -> dict:
    h = Path(home_dir) if home_dir else home()
    exp_dir = exp_dir or experiments_dir()
    return {
        "store": ArtifactStoreResource(root=str(h / "artifacts")),
        "experiments": ExperimentsResource(directory=str(Path(exp_dir).resolve()), pins=str(h / "artifacts")),
        "compute": ComputeResource(device=os.environ.get("PROVENANCE_DEVICE", "auto")),
        "duckdb": DuckDBResource(database=str(h / "warehouse.duckdb")),
    }


defs = Definitions(assets=ALL_ASSETS, asset_checks=ALL_CHECKS, jobs=[lineage_job, score_queries_job, observe_sources_job, *STUDY_JOBS],
                   sensors=[experiment_specs_sensor, inbox_sensor], schedules=[stale_experiments_schedule],
                   resources=make_resources())
