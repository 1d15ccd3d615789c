"""The lineage job on the multiprocess executor: training shards are separate steps that run
in parallel processes (what lets other executors spread them over machines)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from cli import ensure_dagster_home
from tests.test_lineage import TINY, TINY_TRAK

ROOT = Path(__file__).resolve().parents[1]


def test_lineage_job_fans_training_out_over_processes(tmp_path):
    exp_dir, home = tmp_path / "experiments", tmp_path / "home"
    exp_dir.mkdir()
    spec = {**TINY, "training": {"epochs": 30, "batch_size": 32, "models_per_batch": 12}, "trak": TINY_TRAK}
    (exp_dir / "fan.yaml").write_text(yaml.safe_dump(spec))
    dagster_home = ensure_dagster_home(home)
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"execution": {"config": {"multiprocess": {"max_concurrent": 2}}}}))
    env = {**os.environ, "PROVENANCE_HOME": str(home), "PROVENANCE_EXPERIMENTS": str(exp_dir),
           "DAGSTER_HOME": str(dagster_home)}
    subprocess.run([sys.executable, "-c", "from dagster import DagsterInstance; "
                    "DagsterInstance.get().add_dynamic_partitions('experiments', ['fan'])"],
                   cwd=ROOT, env=env, check=True)
    out = subprocess.run([sys.executable, "-m", "dagster", "job", "execute", "-f", "definitions.py", "-j", "lineage_job",
                          "--tags", json.dumps({"dagster/partition": "fan"}), "--config", str(tmp_path / "run.yaml")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    # three shards of 12, 12 and 8 subset models, then the full-data model: four train steps,
    # each started in a process of its own
    starts = [line for line in log.splitlines() if "train_models[shard_" in line and "STEP_START" in line]
    steps = sorted({line.split("train_models[")[1].split("]")[0] for line in starts})
    assert steps == [f"shard_{i}" for i in range(4)], log[-3000:]
    pids = {line.split(" - ")[5] for line in starts}
    assert len(pids) == 4, starts
    # the "training" pool (limit 1 on a CPU-only machine: a step already trains one model per core)
    # keeps the shards' processes from running at the same time
    from dagster import DagsterEventType, DagsterInstance

    with DagsterInstance.from_config(str(dagster_home)) as instance:
        [run] = instance.get_runs()
        spans = {}
        for entry in instance.all_logs(run.run_id, of_type={DagsterEventType.STEP_START,
                                                            DagsterEventType.STEP_SUCCESS}):
            step = entry.step_key or ""
            if step.startswith("checkpoints.train_models[") or step.startswith("train_models["):
                spans.setdefault(step, {})[entry.dagster_event.event_type] = entry.timestamp
    spans = sorted((v[DagsterEventType.STEP_START], v[DagsterEventType.STEP_SUCCESS]) for v in spans.values())
    assert len(spans) == 4 and all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), spans
    import duckdb

    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM models WHERE experiment = 'fan'").fetchone() == (33,)
