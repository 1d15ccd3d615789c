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
        "store": ArtifactStoreResource(root=str(h / "artifacts"), url=os.environ.get("PROVENANCE_STORE_URL", "")),
        "experiments": ExperimentsResource(directory=str(Path(exp_dir).resolve()), pins=str(h / "artifacts")),
        "compute": ComputeResource(device=os.environ.get("PROVENANCE_DEVICE", "auto")),
        "duckdb": DuckDBResource(database=str(h / "warehouse.duckdb")),
    }


def k8s_config() -> dict:
    """dagster-k8s's executor config for PROVENANCE_EXECUTOR=k8s: every step a Kubernetes Job
    running the run's image (DAGSTER_CURRENT_IMAGE, or PROVENANCE_K8S_IMAGE) in
    PROVENANCE_K8S_NAMESPACE; the PROVENANCE_* settings travel with it, so steps find the shared
    store (PROVENANCE_STORE_URL) and the specs the way this process does."""
    config = {"job_namespace": os.environ.get("PROVENANCE_K8S_NAMESPACE", "default"),
              "env_vars": sorted(f"{k}={v}" for k, v in os.environ.items()
                                 if k.startswith("PROVENANCE_") and k != "PROVENANCE_CWD")}
    if os.environ.get("PROVENANCE_K8S_MAX_CONCURRENT"):
        config["max_concurrent"] = int(os.environ["PROVENANCE_K8S_MAX_CONCURRENT"])
    if os.environ.get("PROVENANCE_K8S_IMAGE"):
        config["job_image"] = os.environ["PROVENANCE_K8S_IMAGE"]
    return config


def executor():
    """The executor, chosen by environment alone: ``PROVENANCE_EXECUTOR`` = ``multiprocess`` (the
    default: steps in processes on this machine) or ``celery`` (steps on celery workers, on any
    machines that share the artifact store and the Dagster instance; broker and result backend from
    ``PROVENANCE_CELERY_BROKER`` / ``PROVENANCE_CELERY_BACKEND``, default a Redis on localhost) or
    ``k8s`` (each step a Kubernetes Job, dagster-k8s; README "More than one machine")."""
    kind = os.environ.get("PROVENANCE_EXECUTOR", "multiprocess")
    if kind == "multiprocess":
        return None                                   # Dagster's default for asset jobs
    if kind == "celery":
        from dagster_celery import celery_executor

        broker = os.environ.get("PROVENANCE_CELERY_BROKER", "redis://localhost:6379/0")
        return celery_executor.configured({"broker": broker,
                                           "backend": os.environ.get("PROVENANCE_CELERY_BACKEND", broker)})
    if kind == "k8s":
        try:
            from dagster_k8s import k8s_job_executor
        except ImportError:
            raise ValueError("PROVENANCE_EXECUTOR=k8s needs dagster-k8s: pip install -e '.[k8s]'") from None
        return k8s_job_executor.configured(k8s_config())
    raise ValueError(f"PROVENANCE_EXECUTOR: {kind!r} is not one of multiprocess, celery, k8s")


defs = Definitions(assets=ALL_ASSETS, asset_checks=ALL_CHECKS, jobs=[lineage_job, score_queries_job, observe_sources_job, *STUDY_JOBS],
                   sensors=[experiment_specs_sensor, inbox_sensor], schedules=[stale_experiments_schedule],
                   resources=make_resources(), executor=executor())
