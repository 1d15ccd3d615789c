"""Once end to end with a real ``dagster-daemon`` on localhost, as a user runs provenance:

finish an experiment with ``./provenance run``, turn the sensors on, drop query images into its
inbox (their attributions reach the warehouse, earlier rows unchanged), edit ``detector.restarts``
(a run of only the backdoor report and the warehouse, no model retrained), and revert the edit
(another run: the run keys let a revert through).
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import numpy as np
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = {
    "seed": 1,
    "dataset": {"source": "digits", "limit_train": 300, "limit_test": 60},
    "attack": {"kind": "badnets", "target_class": 0, "poison_count": 20, "patch_size": 3},
    "model": {"arch": "mlp", "hidden": 32},
    "training": {"epochs": 6, "batch_size": 32},
    "subsets": {"num_models": 16, "num_heldout": 6},
    "trak": {"num_models": 3, "proj_dim": 32, "top_k": 5},
    "datamodels": {"n_lambdas": 3, "tol": 1e-4},
    "detector": {"restarts": 8},
    "lds": {"min_heldout": 5, "bootstrap": 50},
}
DAEMON = Path(sys.executable).parent / "dagster-daemon"
DAGSTER = Path(sys.executable).parent / "dagster"

pytestmark = pytest.mark.skipif(not DAEMON.exists(), reason="dagster-daemon is not installed")


def _q(home, sql):
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        return conn.execute(sql).fetchall()


def _wait_for_run(instance, what, since: float, timeout: float = 240.0):
    """The newest run matching ``what`` created after ``since``, once it has finished."""
    from dagster import DagsterRunStatus, RunsFilter

    deadline = time.time() + timeout
    while time.time() < deadline:
        for record in instance.get_run_records(RunsFilter(**what), limit=5):
            if record.create_timestamp.timestamp() >= since and record.dagster_run.status in (
                    DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED):
                return record.dagster_run
        time.sleep(1.0)
    raise AssertionError(f"no finished run matching {what} within {timeout:.0f}s")


def test_daemon_scores_inbox_files_and_reruns_only_what_a_spec_edit_affects(tmp_path, monkeypatch):
    from PIL import Image

    home, exps = tmp_path / "home", tmp_path / "experiments"
    exps.mkdir()
    spec_file = exps / "daemon.yaml"
    spec_file.write_text(yaml.safe_dump(SPEC))
    env = {**os.environ, "PROVENANCE_HOME": str(home), "PROVENANCE_EXPERIMENTS": str(exps),
           "PROVENANCE_SENSOR_INTERVAL": "3", "PROVENANCE_DEVICE": "cpu", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "cli.py", "run", "daemon", "--log-level", "WARNING"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    dagster_home = subprocess.run([sys.executable, "cli.py", "dagster-home"], cwd=ROOT, env=env,
                                  capture_output=True, text=True, check=True).stdout.strip()
    env["DAGSTER_HOME"] = dagster_home
    before = _q(home, "SELECT count(*), sum(score) FROM attributions")
    models = sorted(p.name for p in (home / "artifacts" / "daemon" / "checkpoints").rglob("*.safetensors"))
    mtimes = {p: p.stat().st_mtime_ns for p in (home / "artifacts" / "daemon" / "checkpoints").rglob("*.safetensors")}

    daemon = subprocess.Popen([str(DAEMON), "run", "-w", "workspace.yaml"], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "daemon.log", "w"),
                              start_new_session=True)
    try:
        from dagster import DagsterInstance, RunsFilter

        for name in ("experiment_specs_sensor", "inbox_sensor"):
            subprocess.run([str(DAGSTER), "sensor", "start", name, "-w", "workspace.yaml"], cwd=ROOT, env=env,
                           check=True, capture_output=True)
        monkeypatch.setenv("DAGSTER_HOME", dagster_home)
        with DagsterInstance.get() as instance:
            # 1. query images in the inbox: one scoring run, rows of their own
            art = home / "artifacts" / "daemon" / "training_set"
            images = np.load(art / "test_images.npy")
            inbox = home / "artifacts" / "daemon" / "inbox"
            inbox.mkdir(parents=True)
            t0 = time.time()
            for i in range(3):
                Image.fromarray(images[i][..., 0]).save(inbox / f".q{i}.png")
                os.replace(inbox / f".q{i}.png", inbox / f"q{i}.png")     # appears whole
            scored = [_wait_for_run(instance, {"job_name": "score_queries_job", "tags": {"inbox_file": f"q{i}.png"}},
                                    t0) for i in range(3)]
            assert all(r.status.value == "SUCCESS" for r in scored), [r.status for r in scored]
            assert _q(home, "SELECT query_id FROM queries ORDER BY query_id") == [("q0.png",), ("q1.png",), ("q2.png",)]
            assert _q(home, "SELECT count(DISTINCT query_id) FROM query_attributions") == [(3,)]
            assert _q(home, "SELECT count(*), sum(score) FROM attributions") == before

            # the CLI's run recorded what it read: the specs sensor saw nothing to do
            assert not instance.get_runs(RunsFilter(job_name="lineage_job"))

            # 2. a detector edit: a run of the backdoor report and the warehouse only
            t1 = time.time()
            edited = {**SPEC, "detector": {"restarts": 6}}
            spec_file.write_text(yaml.safe_dump(edited))
            edit_run = _wait_for_run(instance, {"job_name": "lineage_job", "tags": {"provenance/experiment": "daemon"}},
                                     t1)
            assert edit_run.status.value == "SUCCESS", (tmp_path / "daemon.log").read_text()[-3000:]
            assert {k.to_user_string() for k in edit_run.asset_selection} == {"backdoor_report", "warehouse"}
            assert "spec/detector" in edit_run.tags["provenance/reason"]
            assert sorted(p.name for p in (home / "artifacts" / "daemon" / "checkpoints").rglob("*.safetensors")) \
                == models
            assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())          # nothing retrained
            spec_json = _q(home, "SELECT spec_json FROM experiments WHERE experiment = 'daemon'")[0][0]
            assert '"restarts":6' in spec_json.replace(" ", "")
            assert _q(home, "SELECT count(*) FROM queries") == [(3,)]                  # the queries stay

            # 3. the revert is a change like any other: another run, with another run key
            t2 = time.time()
            spec_file.write_text(yaml.safe_dump(SPEC))
            revert_run = _wait_for_run(instance, {"job_name": "lineage_job",
                                                  "tags": {"provenance/experiment": "daemon"}}, t2)
            assert revert_run.status.value == "SUCCESS"
            assert revert_run.run_id != edit_run.run_id
            assert revert_run.tags["dagster/run_key"] != edit_run.tags["dagster/run_key"]
            spec_json = _q(home, "SELECT spec_json FROM experiments WHERE experiment = 'daemon'")[0][0]
            assert '"restarts":8' in spec_json.replace(" ", "")
    finally:
        os.killpg(daemon.pid, signal.SIGTERM)
        try:
            daemon.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(daemon.pid, signal.SIGKILL)
        shutil.rmtree(home / "dagster" / "storage", ignore_errors=True)
