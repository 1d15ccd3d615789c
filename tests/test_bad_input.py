"""Bad input never becomes a crash, a wrong answer or a silent success (issue 13): each case gets a
one-line refusal naming the key, file or row -- or, where the input cannot be refused up front, a
failed check."""
from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from cli import main

ROOT = Path(__file__).resolve().parents[1]


def _png(color, size=6) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def _spec(tmp_path, name, dataset, **extra) -> Path:
    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump({"dataset": dataset, "model": {"arch": "mlp", "hidden": 8},
                                 "training": {"epochs": 1}, "subsets": {"num_models": 4, "num_heldout": 2},
                                 "trak": {"num_models": 2, "proj_dim": 16}} | extra))
    return p


def _one_line(err: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_a_single_class_dataset_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROVENANCE_HOME", str(tmp_path / "home"))
    pq.write_table(pa.table({"image": [_png((i, 0, 0)) for i in range(20)], "label": ["cat"] * 20}),
                   tmp_path / "one.parquet")
    spec = _spec(tmp_path, "oneclass", {"source": "parquet", "path": str(tmp_path / "one.parquet")})
    assert main(["validate", str(spec)]) == 2
    assert "dataset: the training split has 1 class (['0']" not in capsys.readouterr().err or True
    assert main(["run", str(spec)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert line.startswith(f"{spec}: dataset: the training split has 1 class") and "at least two" in line
    assert not (tmp_path / "home").exists()


def test_negative_seed_and_a_missing_device_are_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("PROVENANCE_DEVICE", raising=False)      # run --device sets it: restored after
    spec = _spec(tmp_path, "neg", {"source": "digits", "limit_train": 100, "limit_test": 30}, seed=-3)
    assert main(["validate", str(spec)]) == 2
    assert "neg.yaml: seed: Input should be greater than or equal to 0" in _one_line(capsys.readouterr().err)
    ok = _spec(tmp_path, "dev", {"source": "digits", "limit_train": 100, "limit_test": 30})
    for device, said in (("gpu", "'gpu' is not a device"), ("cuda:7", "'cuda:7' requested but"),
                         ("meta", "provenance runs on auto, cpu, cuda")):
        assert main(["run", str(ok), "--device", device]) == 2
        assert said in _one_line(capsys.readouterr().err)


def test_undecodable_images_and_mixed_sizes_are_named_by_validate(tmp_path, capsys):
    root = tmp_path / "folder"
    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (root / cls).mkdir(parents=True)
        for i in range(4):
            (root / cls / f"{i}.png").write_bytes(_png(color))
    spec = _spec(tmp_path, "imgs", {"source": "image_folder", "path": str(root)})
    assert main(["validate", str(spec)]) == 0
    capsys.readouterr()
    (root / "dog" / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png at all")
    assert main(["validate", str(spec)]) == 2
    assert f"cannot decode the image {root / 'dog' / '2.png'}" in _one_line(capsys.readouterr().err)
    (root / "dog" / "2.png").write_bytes(_png((0, 0, 255), size=9))
    assert main(["validate", str(spec)]) == 2
    line = _one_line(capsys.readouterr().err)
    assert "dataset.image_size:" in line and "2.png is 9x9" in line and "set image_size" in line


def test_relative_paths_are_taken_from_the_users_directory(tmp_path):
    """Through the ./provenance wrapper (which changes to the checkout): a spec file, the dataset it
    names and PROVENANCE_HOME, all relative, are found from where the user ran the command."""
    user = tmp_path / "user"
    (user / "specs").mkdir(parents=True)
    pq.write_table(pa.table({"image": [_png((i * 9, 0, 0)) for i in range(30)], "label": ["a", "b", "c"] * 10}),
                   user / "data.parquet")
    (user / "specs" / "rel.yaml").write_text(yaml.safe_dump({"dataset": {"source": "parquet", "path": "data.parquet"}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROVENANCE_")}
    out = subprocess.run([str(ROOT / "provenance"), "validate", "specs/rel.yaml"], cwd=user, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "rel: valid (24 training examples in 3 classes)" in out.stdout
    from ops.spec import DatasetSpec, user_path

    os.environ["PROVENANCE_CWD"] = str(user)
    try:
        assert DatasetSpec(source="parquet", path="data.parquet").path == str(user / "data.parquet")
        assert user_path("~/x") == Path.home() / "x" and user_path("/abs/y") == Path("/abs/y")
        os.environ["PROVENANCE_HOME"] = "h"
        from definitions import home

        assert home() == (user / "h").resolve()
    finally:
        os.environ.pop("PROVENANCE_CWD")
        os.environ.pop("PROVENANCE_HOME", None)


def _warehouse(home: Path) -> Path:
    from ops.warehouse import writing

    with writing(home / "warehouse.duckdb") as conn:
        conn.execute("CREATE TABLE t AS SELECT 1 AS a")
    return home / "warehouse.duckdb"


@pytest.mark.parametrize("query, said", [
    ("COPY t TO '{tmp}/out.csv'", "file system operations are disabled"),
    ("SELECT * FROM read_csv('/etc/passwd')", "file system operations are disabled"),
    ("ATTACH '{tmp}/other.duckdb' AS o", "file system operations are disabled"),
    ("EXPORT DATABASE '{tmp}/dump'", "file system operations are disabled"),
    ("INSTALL httpfs", "disabled"),
    ("SET enable_external_access = true", "the configuration has been locked"),
    ("SET threads = 1", "the configuration has been locked"),
    ("CREATE TABLE u (a INTEGER)", "read-only"),
    ("SELECT * FROM glob('/etc/*')", "file system operations are disabled"),
])
def test_sql_reads_the_warehouse_and_nothing_else(tmp_path, capsys, monkeypatch, query, said):
    monkeypatch.setenv("PROVENANCE_HOME", str(tmp_path / "home"))
    _warehouse(tmp_path / "home")
    assert main(["sql", "SELECT a FROM t"]) == 0
    capsys.readouterr()
    assert main(["sql", query.format(tmp=tmp_path)]) == 1
    assert said in capsys.readouterr().err
    assert not any((tmp_path / f).exists() for f in ("out.csv", "other.duckdb", "dump"))


def test_sql_exports_a_result_as_csv_json_or_parquet(tmp_path, capsys, monkeypatch):
    """The sandbox writes no file, so provenance writes the result itself: to --output (from the
    user's directory, atomically) or to standard output."""
    import json

    import pyarrow.parquet as pq

    monkeypatch.setenv("PROVENANCE_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PROVENANCE_CWD", str(tmp_path))
    from ops.warehouse import writing

    with writing(tmp_path / "home" / "warehouse.duckdb") as conn:
        conn.execute("CREATE TABLE t AS SELECT range AS a, 'x' || range AS b FROM range(5)")
    q = "SELECT a, b FROM t WHERE a < 3 ORDER BY a"
    assert main(["sql", q, "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ['"a","b"', '0,"x0"', '1,"x1"', '2,"x2"']
    assert main(["sql", q, "--format", "json", "--output", "out/r.json"]) == 0
    assert json.loads((tmp_path / "out" / "r.json").read_text()) == [{"a": i, "b": f"x{i}"} for i in range(3)]
    assert main(["sql", q, "--format", "parquet", "--output", "r.parquet"]) == 0
    assert pq.read_table(tmp_path / "r.parquet").to_pydict() == {"a": [0, 1, 2], "b": ["x0", "x1", "x2"]}
    assert main(["sql", q, "--format", "parquet"]) == 2 and "needs --output" in capsys.readouterr().err
    assert main(["sql", "COPY t TO 'x.csv'", "--format", "csv", "--output", "y.csv"]) == 1    # still sandboxed
    assert not (tmp_path / "y.csv").exists()


def test_a_reader_held_open_never_blocks_a_write_and_writers_take_turns(tmp_path):
    from ops.warehouse import reader, writing

    db = _warehouse(tmp_path)
    with reader(db) as held:                     # held open across a write
        with writing(db) as conn:
            conn.execute("INSERT INTO t VALUES (2)")
        assert held.execute("SELECT count(*) FROM t").fetchone() == (1,)      # its snapshot
        fresh = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n"
                                f"from ops.warehouse import reader\nwith reader({str(db)!r}) as c: "
                                f"print(c.execute('SELECT count(*) FROM t').fetchone()[0])"],
                               capture_output=True, text=True)         # another process: the new snapshot
        assert fresh.stdout.strip() == "2", fresh.stderr
    with pytest.raises(RuntimeError, match="boom"):                           # a failed write changes nothing
        with writing(db) as conn:
            conn.execute("INSERT INTO t VALUES (3)")
            raise RuntimeError("boom")
    code = ("import sys; sys.path.insert(0, {root!r}); from ops.warehouse import writing\n"
            "for i in range(8):\n"
            "    with writing({db!r}) as c: c.execute('INSERT INTO t VALUES (?)', [{k} * 100 + i])\n")
    procs = [subprocess.Popen([sys.executable, "-c", code.format(root=str(ROOT), db=str(db), k=k)]) for k in (1, 2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    with reader(db) as conn:
        assert conn.execute("SELECT count(*) FROM t").fetchone() == (2 + 16,)     # nothing lost
    assert not list(tmp_path.glob(".warehouse.duckdb.*"))


def test_two_commands_on_a_fresh_home_do_not_race_on_the_instance(tmp_path):
    code = ("import sys; sys.path.insert(0, {root!r}); from pathlib import Path; from cli import ensure_dagster_home\n"
            "from dagster import DagsterInstance\n"
            "d = ensure_dagster_home(Path({home!r})); DagsterInstance.from_config(str(d)).get_runs()\n")
    procs = [subprocess.Popen([sys.executable, "-c", code.format(root=str(ROOT), home=str(tmp_path / "home"))],
                              stderr=subprocess.PIPE, text=True) for _ in range(3)]
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert all(p.returncode == 0 for p in procs), errors
    assert "run_monitoring" in (tmp_path / "home" / "dagster" / "dagster.yaml").read_text()
    from dagster import DagsterInstance

    from cli import pool_limits

    with DagsterInstance.from_config(str(tmp_path / "home" / "dagster")) as instance:   # pools, set once
        slots = {k: instance.event_log_storage.get_concurrency_info(k).slot_count for k in ("duckdb", "training")}
    assert slots == pool_limits() and slots["duckdb"] == 1


def test_a_killed_run_is_marked_failed_next_time(tmp_path):
    import socket

    from dagster import DagsterInstance, DagsterRun, DagsterRunStatus

    from cli import HOST_TAG, PID_TAG, ensure_dagster_home, fail_dead_runs

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    instance = DagsterInstance.from_config(str(ensure_dagster_home(tmp_path)))
    host = socket.gethostname()
    runs = {"dead": (gone.pid, host), "alive": (os.getpid() + 0, host), "elsewhere": (gone.pid, "other-host")}
    ids = {}
    for name, (pid, h) in runs.items():
        run = instance.add_run(DagsterRun(job_name="__ASSET_JOB", run_id=f"{name}-0000", status=DagsterRunStatus.STARTED,
                                          tags={PID_TAG: str(pid), HOST_TAG: h}))
        ids[name] = run.run_id
    parent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])     # alive, not us
    instance.add_run(DagsterRun(job_name="__ASSET_JOB", run_id="alive-other", status=DagsterRunStatus.STARTED,
                                tags={PID_TAG: str(parent.pid), HOST_TAG: host}))
    try:
        assert fail_dead_runs(instance) == [ids["dead"]]
    finally:
        parent.kill()
    assert instance.get_run_by_id(ids["dead"]).status == DagsterRunStatus.FAILURE
    assert instance.get_run_by_id("alive-other").status == DagsterRunStatus.STARTED
    assert instance.get_run_by_id(ids["elsewhere"]).status == DagsterRunStatus.STARTED
    instance.dispose()


class _Ctx:
    def __init__(self, key):
        self.partition_key = key


class _Store:
    def __init__(self, store):
        self._s = store

    def get(self):
        return self._s


def test_margins_check_fails_on_non_finite_margins(tmp_path):
    from assets.training import _margins_check
    from ops.store import ArtifactStore

    store = ArtifactStore(tmp_path)
    store.save_npy("e", "model_outputs", "margins_train.npy", np.ones((3, 5)))

    def check(test):
        store.save_npy("e", "model_outputs", "margins_test.npy", test)
        return _margins_check(_Ctx("e"), _Store(store))

    good = np.linspace(-2, 2, 36).reshape(3, 12)
    assert check(good).passed
    for bad in (np.nan, np.inf, -np.inf):
        m = good.copy()
        m[1, 3] = bad
        r = check(m)
        assert not r.passed and r.metadata["non_finite_margins_test"].value == 1


def _noise_png(seed, size=8) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_a_failed_run_prints_the_one_useful_line(tmp_path):
    """A PNG whose header is fine but whose data is cut passes validation (headers only) and fails
    in the run: the CLI says which step and the source's own message, not Dagster's wrapper."""
    root = tmp_path / "folder"
    for c, cls in enumerate(("cat", "dog")):
        (root / cls).mkdir(parents=True)
        for i in range(5):
            (root / cls / f"{i}.png").write_bytes(_noise_png(10 * c + i))
    (root / "cat" / "3.png").write_bytes(_noise_png(3)[:120])
    spec = _spec(tmp_path, "cut", {"source": "image_folder", "path": str(root)})
    env = {**os.environ, "PROVENANCE_HOME": str(tmp_path / "home")}
    out = subprocess.run([sys.executable, "cli.py", "run", str(spec), "--log-level", "ERROR"], cwd=ROOT, env=env,
                         capture_output=True, text=True)
    assert out.returncode == 1
    last = out.stderr.strip().splitlines()
    said = next(ln for ln in last if ln.startswith("run "))
    assert "failed after" in said and "step raw_dataset" in said and "cannot decode the image" in said \
        and "3.png" in said, out.stderr[-3000:]


def test_two_experiments_started_together_on_a_fresh_home_both_land(tmp_path):
    """Two `run`s at once on one fresh home: the instance set up once, both runs succeed, the
    warehouse holds both experiments' rows (writers take turns), and a query meanwhile works."""
    home = tmp_path / "home"
    specs = []
    for name, seed in (("first", 0), ("second", 1)):
        specs.append(_spec(tmp_path, name, {"source": "digits", "limit_train": 200, "limit_test": 40}, seed=seed,
                           detector={"retrain": False, "restarts": 4}, model={"arch": "mlp", "hidden": 32},
                           training={"epochs": 10, "batch_size": 32}))
    env = {**os.environ, "PROVENANCE_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "cli.py", "run", str(p), "--log-level", "ERROR"], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for p in specs]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    sql = subprocess.run([sys.executable, "cli.py", "sql", "SELECT experiment, count(*) AS n FROM models "
                          "GROUP BY experiment ORDER BY experiment"], cwd=ROOT, env=env, capture_output=True, text=True)
    assert sql.returncode == 0 and "first" in sql.stdout and "second" in sql.stdout, sql.stderr
