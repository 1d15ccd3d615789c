"""Worker processes for CPU models trained one per core (kernels/workers.py)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from kernels import workers
from kernels.models import build_model
from kernels.train import Recipe, train_stacked

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not workers.available(), reason="no forkserver start method here")


def _data(n=96):
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 3, (n,), generator=g)
    return torch.randn(n, 1, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float(), y


def _train(monkeypatch, mode, on_epoch=None, snapshots=None):
    monkeypatch.setenv("PROVENANCE_CPU_WORKERS", mode)
    x, y = _data()
    make = lambda: build_model("small_cnn", (1, 8, 8), 3, 4)  # noqa: E731 - a closure: sent by cloudpickle
    subsets = [np.arange(0, 96, 2), np.arange(1, 96, 2), np.arange(0, 48)]
    recipe = Recipe(epochs=2, batch_size=16, lr=0.05, flip=True, translate=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        return train_stacked(make, x, y, subsets, [5, 6, 7], recipe, on_epoch=on_epoch, snapshots=snapshots)
    finally:
        torch.set_num_threads(threads)


def test_models_trained_in_processes_equal_models_trained_on_threads(monkeypatch):
    seen, snaps = [], {1: None}
    procs = _train(monkeypatch, "processes", on_epoch=lambda e, loss: seen.append((e, loss)), snapshots=snaps)
    assert workers._pool is not None and workers._pool.alive()          # they did train in processes
    assert os.getpid() not in [p.pid for p in workers._pool.procs]
    threads = _train(monkeypatch, "threads")
    for k in threads:
        assert torch.equal(procs[k], threads[k]), k
    assert sorted(e for e, _ in seen) == [0, 0, 0, 1, 1, 1]          # progress came back from the workers
    assert all(np.isfinite(loss) for _, loss in seen)
    assert snaps[1]["conv1.weight"].shape == procs["conv1.weight"].shape
    assert not torch.equal(snaps[1]["conv1.weight"], procs["conv1.weight"])   # epoch 1, not the end


def test_unknown_worker_mode_is_refused(monkeypatch):
    with pytest.raises(ValueError, match="PROVENANCE_CPU_WORKERS"):
        _train(monkeypatch, "fibers")


def _fails(a, job, progress):
    if job == 1:
        raise ValueError(f"job {job} is bad ({a})")
    return {"out": {"v": torch.tensor([float(job)])}}


def _dies(job, progress):
    os._exit(3)


def _double(job, progress):
    progress(job)
    return {"out": {"v": torch.full((2,), 2.0 * job)}}


def test_a_failing_job_reraises_here_with_its_traceback_and_the_pool_starts_afresh():
    with pytest.raises(workers.WorkerError, match=r"ValueError: job 1 is bad \(x\)"):
        workers.run(_fails, ("x",), [0, 1, 2], 2)
    got = []
    out = workers.run(_double, (), [1, 2, 3], 2, on_progress=lambda i, job: got.append((i, job)))
    assert [o["out"]["v"].tolist() for o in out] == [[2.0, 2.0], [4.0, 4.0], [6.0, 6.0]]
    assert sorted(got) == [(0, 1), (1, 2), (2, 3)]


def test_a_worker_that_dies_raises_instead_of_hanging():
    with pytest.raises(workers.WorkerDied, match="exited with code 3"):
        workers.run(_dies, (), [0], 2)
    assert workers.run(_double, (), [5], 2)[0]["out"]["v"].tolist() == [10.0, 10.0]


def test_a_script_without_the_main_guard_still_trains_on_threads(tmp_path):
    """The forkserver's workers import the main module; in a script without the guard that
    would train again in the worker.  The worker cannot start, and training falls back to
    threads with a warning instead of failing or hanging."""
    script = tmp_path / "unguarded.py"
    script.write_text(textwrap.dedent(f"""
        import sys, warnings
        sys.path.insert(0, {str(ROOT)!r})
        import numpy as np, torch
        from kernels.models import build_model
        from kernels.train import Recipe, train_stacked
        torch.set_num_threads(2)
        x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 3, (32,))
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            out = train_stacked(lambda: build_model("small_cnn", (1, 8, 8), 3, 4), x, y,
                                [np.arange(16), np.arange(16, 32)], [1, 2], Recipe(epochs=1, batch_size=8))
        print("trained", tuple(out["conv1.weight"].shape))
        print("warned", any("Training on threads instead" in str(m.message) for m in w))
    """))
    env = {k: v for k, v in os.environ.items() if k != "PROVENANCE_CPU_WORKERS"}
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trained (2, 4, 1, 3, 3)" in r.stdout
    assert "warned True" in r.stdout


def test_a_larger_pool_serves_a_smaller_call_without_restarting():
    workers.run(_double, (), [1, 2], 2)
    pids = [p.pid for p in workers._pool.procs]
    out = workers.run(_double, (), [3, 4, 5], 1)          # one worker at a time, same processes
    assert [o["out"]["v"].tolist() for o in out] == [[6.0, 6.0], [8.0, 8.0], [10.0, 10.0]]
    assert [p.pid for p in workers._pool.procs] == pids
