import os
import subprocess
import sys
from pathlib import Path

import yaml

from cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_validate_reports_the_key_and_exits_2(tmp_path, capsys):
    p = tmp_path / "typo.yaml"
    p.write_text(yaml.safe_dump({"subsets": {"alpah": 0.5}}))
    assert main(["validate", str(p)]) == 2
    assert f"{p}: subsets.alpah: unknown key" in capsys.readouterr().err
    assert main(["validate", str(ROOT / "experiments" / "demo.yaml")]) == 0


def test_run_prints_the_report_and_sql_reads_the_warehouse(tmp_path):
    from tests.test_lineage import TINY

    spec = tmp_path / "tiny_cli.yaml"
    spec.write_text(yaml.safe_dump(TINY))
    env = {**os.environ, "PROVENANCE_HOME": str(tmp_path / "home"), "PROVENANCE_PROGRESS": "1"}
    out = subprocess.run([sys.executable, "cli.py", "run", str(spec), "--log-level", "WARNING"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    # progress bars on the long stages (forced on: stderr is not a terminal here)
    for bar in ("shard_0: training 32 models", "featurizing 360 examples", "strongest feature: local search"):
        assert bar in out.stderr, bar
    assert "provenance report: experiment tiny_cli" in out.stdout
    assert "LDS trak" in out.stdout and "detector strongest_feature" in out.stdout
    assert (tmp_path / "home" / "dagster" / "dagster.yaml").exists()
    sql = subprocess.run([sys.executable, "cli.py", "sql", "SELECT count(*) AS n FROM models"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert sql.returncode == 0 and "33" in sql.stdout
    bad = subprocess.run([sys.executable, "cli.py", "sql", "SELECT * FROM nope"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 1 and "nope" in bad.stderr


def test_run_study_refuses_a_study_the_spec_does_not_name(tmp_path):
    p = tmp_path / "plain.yaml"
    p.write_text(yaml.safe_dump({"seed": 1}))
    env = {**os.environ, "PROVENANCE_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "cli.py", "run", str(p), "--study", "smallify"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "--study smallify: the spec names no study" in out.stderr
    assert not (tmp_path / "home").exists()                  # refused before anything was written


def test_run_study_runs_that_study_and_what_it_reads(tmp_path):
    """`--study regimes`: the data stages it reads (training_set with its sibling poison_truth) and
    the study, not the core's models or attributions; the report shows the study only."""
    p = tmp_path / "reg_cli.yaml"
    p.write_text(yaml.safe_dump({"seed": 1, "dataset": {"source": "digits", "limit_train": 200, "limit_test": 60},
                                 "model": {"arch": "mlp", "hidden": 16}, "training": {"epochs": 1},
                                 "regimes": {"schedules": ["step"], "seeds": 1, "momenta": [0.5],
                                             "equivalence_epochs": 1}}))
    env = {**os.environ, "PROVENANCE_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "cli.py", "run", str(p), "--study", "regimes", "--log-level", "WARNING"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "provenance report: experiment reg_cli (studies only)" in out.stdout and "regimes (" in out.stdout
    artifacts = tmp_path / "home" / "artifacts" / "reg_cli"
    assert (artifacts / "training_set").is_dir() and (artifacts / "regimes_runs").is_dir()
    assert not (artifacts / "checkpoints").exists()
