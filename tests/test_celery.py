"""More than one machine, by configuration alone: the lineage job's steps (the training fan-out
included) on two dagster-celery worker processes through a Redis broker on localhost, chosen by
PROVENANCE_EXECUTOR=celery.  The test starts Debian's redis-server and the workers, and stops them."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cli import ensure_dagster_home
from tests.test_lineage import TINY, TINY_TRAK

ROOT = Path(__file__).resolve().parents[1]
CELERY = Path(sys.executable).parent / "dagster-celery"

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None or not CELERY.exists(),
                                reason="needs Debian's redis-server and dagster-celery (.ci/run installs both)")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc):
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_the_lineage_runs_on_celery_workers_through_redis(tmp_path):
    port = _free_port()
    broker = f"redis://127.0.0.1:{port}/0"
    exp_dir, home = tmp_path / "experiments", tmp_path / "home"
    exp_dir.mkdir()
    spec = {**TINY, "training": {"epochs": 10, "batch_size": 32, "models_per_batch": 12}, "trak": TINY_TRAK}
    (exp_dir / "cel.yaml").write_text(yaml.safe_dump(spec))
    dagster_home = ensure_dagster_home(home)
    env = {**os.environ, "PROVENANCE_HOME": str(home), "PROVENANCE_EXPERIMENTS": str(exp_dir),
           "DAGSTER_HOME": str(dagster_home), "PROVENANCE_EXECUTOR": "celery", "PROVENANCE_CELERY_BROKER": broker,
           "PROVENANCE_DEVICE": "cpu",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}   # dagster-celery runs `celery`
    (tmp_path / "celery.yaml").write_text(yaml.safe_dump({"execution": {"config": {"broker": broker, "backend": broker}}}))
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
    workers = []
    try:
        for i in range(2):
            log = open(tmp_path / f"worker{i}.log", "w")
            workers.append(subprocess.Popen(
                [str(CELERY), "worker", "start", "-y", str(tmp_path / "celery.yaml"), "-n", f"w{i}@%h", "-A",
                 "dagster_celery.app", "--", "--concurrency=1"], cwd=ROOT, env=env, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True))
        deadline = time.time() + 120                 # both workers up before the run is submitted
        while time.time() < deadline and not all("ready." in (tmp_path / f"worker{i}.log").read_text()
                                                  for i in range(2)):
            assert all(w.poll() is None for w in workers), (tmp_path / "worker0.log").read_text()[-3000:]
            time.sleep(0.5)
        assert all("ready." in (tmp_path / f"worker{i}.log").read_text() for i in range(2))
        subprocess.run([sys.executable, "-c", "from dagster import DagsterInstance; "
                        "DagsterInstance.get().add_dynamic_partitions('experiments', ['cel'])"],
                       cwd=ROOT, env=env, check=True)
        out = subprocess.run([sys.executable, "-m", "dagster", "job", "execute", "-f", "definitions.py", "-j",
                              "lineage_job", "--tags", json.dumps({"dagster/partition": "cel"})],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        logs = out.stdout + out.stderr
        assert out.returncode == 0, logs[-4000:] + "".join(
            (tmp_path / f"worker{i}.log").read_text()[-2000:] for i in range(2))
        assert "celery" in logs.lower()
        time.sleep(1)
        done = [(tmp_path / f"worker{i}.log").read_text().count("succeeded in") for i in range(2)]
        assert sum(done) >= 4, done                  # the steps (four training shards among them) ran there
        import duckdb

        with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
            assert conn.execute("SELECT count(*) FROM models WHERE experiment = 'cel'").fetchone() == (33,)
    finally:
        for w in workers:
            _stop(w)
        _stop(redis)
