"""A pool of long-lived worker processes, one per core, for work that runs one job per core.

CPU convolutional models train one per core, each on one intra-op thread (kernels/train.py).  As
threads of one process they share the GIL (each step leaves and re-enters Python some fifty
times) and the process's memory map and allocator; as processes they share nothing but the
training data.  Measured on the 2-core machine (docs/decisions.md): a small-CNN step on each of
two cores took 7.1-7.3 ms on threads and 6.2-6.7 ms in processes (6.2 ms alone), and whole
training runs gave 6% and 9% more models per hour.  So the jobs run in processes:

- started by the ``forkserver`` method (a clean single-threaded server that has imported torch
  forks each worker; never ``fork`` from a process that may run other threads), and kept for the
  life of the process, so a worker loads torch, oneDNN's kernels and numba's cached kernels once;
- the function is sent with cloudpickle (closures and lambdas work), the shared arguments
  through torch's multiprocessing pickler: CPU tensors travel as shared memory, not copies
  (their storage moves to shared memory once, in place);
- results come back as safetensors bytes (tensors by value, no code executed on loading);
- a job that raises re-raises here with the worker's traceback; a worker that dies (killed,
  out of memory) raises ``WorkerDied``; either way the pool is shut down and the next call starts
  a fresh one, so no half-finished state is ever reused;
- workers exit when this process exits (they read EOF on their pipe, and on Linux also get
  SIGKILL when their parent dies).

Nothing here knows about training; kernels/train.py passes its per-model function.
"""
from __future__ import annotations

import atexit
import multiprocessing as mp
import signal
import threading
import traceback
from collections import deque
from multiprocessing.connection import wait
from typing import Any, Callable, Sequence

PRELOAD = ["torch", "numpy", "kernels.train", "kernels.models"]
START_TIMEOUT_S = 300


class WorkerError(RuntimeError):
    """A job raised in a worker process; the message holds the worker's traceback."""


class WorkerDied(RuntimeError):
    """A worker process exited while running a job."""


class WorkerStartError(RuntimeError):
    """The worker processes could not start (for example, a script without the
    ``if __name__ == "__main__":`` guard: the forkserver imports the main module)."""


def available() -> bool:
    """Whether worker processes can be used here (the forkserver start method: Unix)."""
    return "forkserver" in mp.get_all_start_methods()


def _die_with_parent() -> None:
    try:                                   # Linux: SIGKILL when the forkserver (our parent) exits
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _serve(conn, threads: int) -> None:
    """Worker main loop: ("setup", fn bytes, args), then ("job", i, job) ... until "stop" or EOF."""
    _die_with_parent()
    import cloudpickle
    import torch
    from safetensors.torch import save

    torch.set_num_threads(threads)
    conn.send(("ready", None, None))
    fn, args = None, ()
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        if msg[0] == "setup":
            try:
                fn, args = cloudpickle.loads(msg[1]), msg[2]
            except BaseException:  # noqa: BLE001 - reported with the first job
                fn, args = None, traceback.format_exc()
            continue
        if fn is None:
            conn.send(("error", msg[1], f"the job's function could not be loaded in the worker:\n{args}"))
            continue
        _, i, job = msg

        def progress(*payload, _i=i):
            conn.send(("progress", _i, payload))

        try:
            out = fn(*args, job, progress)
            conn.send(("done", i, {name: save(t) if t else b"" for name, t in out.items()}))
        except BaseException:  # noqa: BLE001 - everything goes back to the parent, which re-raises
            conn.send(("error", i, traceback.format_exc()))


class Pool:
    def __init__(self, n: int, threads_per_worker: int = 1):
        import torch.multiprocessing  # noqa: F401 - registers the shared-memory tensor pickler

        if mp.current_process().daemon:
            raise WorkerStartError("a daemonic process (a multiprocessing pool's worker) cannot start worker "
                                   "processes.")
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        self.n = n
        self.conns, self.procs = [], []
        for _ in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_serve, args=(child, threads_per_worker), daemon=True,
                            name="provenance-worker")
            try:
                p.start()
            except (OSError, RuntimeError) as e:
                self.close(kill=True)
                raise WorkerStartError(f"could not start a worker process ({e}).") from e
            child.close()
            self.conns.append(parent)
            self.procs.append(p)
        for conn, p in zip(self.conns, self.procs):     # each worker says it is up
            ok = False
            try:
                ok = bool(wait([conn, p.sentinel], timeout=START_TIMEOUT_S)) and conn.poll() and conn.recv()[0] == "ready"
            except (EOFError, OSError):
                pass
            if not ok:
                self.close(kill=True)
                raise WorkerStartError(
                    f"training worker {p.pid} did not start (exit code {p.exitcode}). Scripts that train "
                    "CPU convolutional models need the `if __name__ == \"__main__\":` guard (the worker "
                    "processes import the main module); or set PROVENANCE_CPU_WORKERS=threads.")

    def alive(self) -> bool:
        return all(p.is_alive() for p in self.procs)

    def close(self, kill: bool = False) -> None:
        for p in self.procs if kill else ():
            if p.is_alive():
                p.kill()
        for c in self.conns:
            try:
                c.send(("stop",))
            except (OSError, ValueError):
                pass
        for p in self.procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
                p.join()
        for c in self.conns:
            c.close()

    def map(self, fn: Callable, args: tuple, jobs: Sequence, on_progress: Callable | None = None,
            workers: int | None = None) -> list:
        """``[fn(*args, job, progress) for job in jobs]``, run on the workers, in job order.

        ``fn`` returns a dict of {name: {tensor name: tensor}} (each inner dict comes back as
        tensors); ``progress(*payload)`` in a worker calls ``on_progress(job index, *payload)``
        here, on the calling thread.  At most ``workers`` (default: all) work at once."""
        import cloudpickle
        from safetensors.torch import load

        blob = cloudpickle.dumps(fn)
        use = list(range(min(self.n, workers or self.n, len(jobs))))
        for w in use:
            self.conns[w].send(("setup", blob, args))
        todo = deque(enumerate(jobs))
        busy: dict[int, int] = {}            # worker -> job index
        results: list[Any] = [None] * len(jobs)
        for w in use:
            i, job = todo.popleft()
            self.conns[w].send(("job", i, job))
            busy[w] = i
        while busy:
            ready = wait([self.conns[w] for w in busy] + [self.procs[w].sentinel for w in busy])
            for w in list(busy):
                conn = self.conns[w]
                if conn not in ready:
                    if self.procs[w].sentinel in ready and not conn.poll():
                        raise WorkerDied(f"training worker {self.procs[w].pid} exited with code "
                                         f"{self.procs[w].exitcode} while running job {busy[w]}")
                    continue
                try:
                    kind, i, payload = conn.recv()
                except (EOFError, OSError) as e:
                    self.procs[w].join(timeout=1)
                    raise WorkerDied(f"training worker {self.procs[w].pid} exited with code "
                                     f"{self.procs[w].exitcode} while running job {busy[w]}") from e
                if kind == "progress":
                    if on_progress is not None:
                        on_progress(i, *payload)
                elif kind == "error":
                    raise WorkerError(f"job {i} failed in worker {self.procs[w].pid}:\n{payload}")
                else:
                    results[i] = {name: load(b) if b else {} for name, b in payload.items()}
                    del busy[w]
                    if todo:
                        i, job = todo.popleft()
                        conn.send(("job", i, job))
                        busy[w] = i
        return results


_pool: Pool | None = None
_lock = threading.Lock()


def run(fn: Callable, args: tuple, jobs: Sequence, workers: int, on_progress: Callable | None = None) -> list:
    """``Pool.map`` on ``workers`` processes of this process's pool (started on first use and
    kept; a smaller pool is replaced by one of ``workers``, a larger one lends that many).  One
    call at a time per process; a failed call shuts the pool down, so the next one starts clean."""
    global _pool
    with _lock:
        if _pool is not None and (_pool.n < workers or not _pool.alive()):
            _drop_pool(kill=False)
        if _pool is None:
            _pool = Pool(workers)
        try:
            return _pool.map(fn, args, jobs, on_progress, workers)
        except BaseException:
            _drop_pool(kill=True)         # a worker may be mid-job: do not wait for it
            raise


def _drop_pool(kill: bool) -> None:
    """Close the pool (the caller holds ``_lock``)."""
    global _pool
    pool, _pool = _pool, None
    if pool is not None:
        pool.close(kill=kill)


def shutdown() -> None:
    """Stop the worker processes (also done at exit)."""
    with _lock:
        _drop_pool(kill=False)


atexit.register(shutdown)
