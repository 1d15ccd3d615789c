"""A run killed midway leaves finished models in the store; the re-run trains only the rest."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.test_lineage import TINY, TINY_TRAK

ROOT = Path(__file__).resolve().parents[1]


def _models(home: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime_ns for p in (home / "artifacts" / "resume" / "checkpoints" / "models").rglob("*.safetensors")}


def test_killed_run_resumes_training_only_missing_models(tmp_path):
    spec = {**TINY, "training": {"epochs": 60, "batch_size": 32, "models_per_batch": 4}, "trak": TINY_TRAK}
    path = tmp_path / "resume.yaml"
    path.write_text(yaml.safe_dump(spec))
    home = tmp_path / "home"
    env = {**os.environ, "PROVENANCE_HOME": str(home)}
    cmd = [sys.executable, "cli.py", "run", str(path)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and len(_models(home)) < 4:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)       # kill -9 the whole run, mid-training
    proc.wait()
    before = _models(home)
    total = 24 + 8 + 1
    assert 0 < len(before) < total, f"{len(before)} models existed when the run was killed"
    assert not list((home / "artifacts" / "resume" / "checkpoints" / "models").rglob("*.tmp"))

    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    log = out.stdout + out.stderr
    assert f"{total} models: {len(before)} already trained, {total - len(before)} to train" in log
    after = _models(home)
    assert len(after) == total
    assert all(after[p] == m for p, m in before.items()), "a finished model was trained again"
    assert "provenance report: experiment resume" in out.stdout
