"""The DuckDB warehouse: one table per result, every row keyed by experiment.

Schemas are fixed here (and documented in docs/tables.md); loading an experiment replaces its
rows in one transaction, so a reader sees the old rows or the new ones, never a mix.

Readers and writers never lock each other out (DuckDB allows one writing process per file, and
no reader while it writes).  A writer (:func:`writing`) takes an exclusive lock on
``warehouse.lock`` (writers queue; nothing is lost when two experiments finish together), copies
the database to a private file, writes there and renames it over ``warehouse.duckdb``.  A reader
(:func:`reader`) opens whatever file is there, read-only: it sees the snapshot of the last
completed write, and one held open for hours never blocks a write (the rename leaves it its file).
"""
from __future__ import annotations

import fcntl
import os
import shutil
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import numpy as np
import polars as pl

from ops.store import ArtifactStore

TABLES: dict[str, str] = {
    "experiments": """experiment VARCHAR, spec_digest VARCHAR, spec_json VARCHAR, source VARCHAR,
        attack VARCHAR, n_train INTEGER, n_test INTEGER, loaded_at TIMESTAMP""",
    "classes": "experiment VARCHAR, label INTEGER, class_name VARCHAR",
    "examples": """experiment VARCHAR, example_id VARCHAR, split VARCHAR, split_index INTEGER,
        label INTEGER, original_label INTEGER, poisoned BOOLEAN""",
    "subset_masks": "experiment VARCHAR, mask_index INTEGER, role VARCHAR, size INTEGER",
    "models": """experiment VARCHAR, model_id INTEGER, role VARCHAR, mask_index INTEGER, seed BIGINT,
        n_train_examples INTEGER, accuracy DOUBLE, attack_success_rate DOUBLE, recipe_hash VARCHAR,
        file VARCHAR, precision VARCHAR""",
    "model_outputs": "experiment VARCHAR, model_id INTEGER, target_index INTEGER, margin DOUBLE",
    "attributions": """experiment VARCHAR, method VARCHAR, target_index INTEGER, target_id VARCHAR,
        rank INTEGER, train_index INTEGER, train_id VARCHAR, score DOUBLE""",
    "datamodel_weights": """experiment VARCHAR, target_index INTEGER, target_id VARCHAR,
        train_index INTEGER, train_id VARCHAR, weight DOUBLE""",
    "lds": """experiment VARCHAR, method VARCHAR, lds DOUBLE, ci95_low DOUBLE, ci95_high DOUBLE,
        n_heldout INTEGER, n_targets INTEGER""",
    "lds_per_target": "experiment VARCHAR, method VARCHAR, target_index INTEGER, spearman DOUBLE",
    "lds_curve": """experiment VARCHAR, method VARCHAR, num_models INTEGER, lds DOUBLE, ci95_low DOUBLE,
        ci95_high DOUBLE""",
    "backdoor_scores": """experiment VARCHAR, method VARCHAR, train_index INTEGER, example_id VARCHAR,
        score DOUBLE, rank INTEGER, flagged BOOLEAN, poisoned BOOLEAN""",
    "queries": """experiment VARCHAR, batch VARCHAR, query_index INTEGER, query_id VARCHAR, source_file VARCHAR,
        label INTEGER, class_name VARCHAR, label_source VARCHAR, predicted INTEGER, margin_full DOUBLE,
        margin_mean DOUBLE, scored_at TIMESTAMP""",
    "query_attributions": """experiment VARCHAR, batch VARCHAR, method VARCHAR, query_index INTEGER,
        query_id VARCHAR, rank INTEGER, train_index INTEGER, train_id VARCHAR, score DOUBLE, source_file VARCHAR""",
    "backdoor_summary": """experiment VARCHAR, method VARCHAR, n_poisoned INTEGER, n_flagged INTEGER,
        precision DOUBLE, recall DOUBLE, recall_at_budget DOUBLE, auroc DOUBLE,
        retrain_accuracy DOUBLE, retrain_attack_success_rate DOUBLE, recall_at_fpr01 DOUBLE,
        flag_rule VARCHAR, seconds DOUBLE, reference_accuracy DOUBLE, reference_attack_success_rate DOUBLE""",
}

# table -> artifact files (asset, name) whose rows it holds
SOURCES: dict[str, list[tuple[str, str]]] = {
    "examples": [("training_set", "examples.parquet")],
    "subset_masks": [("subset_masks", "masks.parquet")],
    "models": [("checkpoints", "models.parquet")],
    "attributions": [],           # every registered method's table (ops/methods), filled in below
    "datamodel_weights": [("datamodel_weights", "weights.parquet")],
    "lds": [("lds_evaluation", "lds.parquet")],
    "lds_per_target": [("lds_evaluation", "lds_per_target.parquet")],
    "lds_curve": [("lds_evaluation", "lds_curve.parquet")],
    "backdoor_scores": [("backdoor_report", "scores.parquet")],
    "backdoor_summary": [("backdoor_report", "summary.parquet")],
}


# What ``./provenance sql`` may do: read the warehouse, nothing else on the machine -- no files
# read or written (COPY, read_csv, EXPORT), no ATTACH, no INSTALL/LOAD of extensions from disk, and
# no setting changed (the configuration is locked).
SANDBOX = {"enable_external_access": False, "autoload_known_extensions": False,
           "autoinstall_known_extensions": False, "allow_community_extensions": False,
           "lock_configuration": True}


@contextmanager
def reader(db: str | os.PathLike, sandbox: bool = False):
    """A read-only connection to the last completed snapshot of the warehouse."""
    import duckdb

    db = Path(db)
    if not db.exists():
        raise FileNotFoundError(f"{db} does not exist yet: run an experiment first")
    conn = duckdb.connect(str(db), read_only=True, config=dict(SANDBOX) if sandbox else {})
    try:
        yield conn
    finally:
        conn.close()


@contextmanager
def writing(db: str | os.PathLike) -> Iterator:
    """A connection to a private copy of the warehouse, published by an atomic rename when the
    block ends without an error (an error leaves the warehouse as it was).  Writers take turns."""
    import duckdb

    db = Path(db)
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.parent / f"{db.stem}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        tmp = db.parent / f".{db.name}.{os.getpid()}.tmp"
        wal = Path(f"{db}.wal")
        for stale in (tmp, Path(f"{tmp}.wal")):
            stale.unlink(missing_ok=True)
        try:
            if db.exists():
                shutil.copyfile(db, tmp)
                if wal.exists():      # a writer that died before checkpointing: replay its log too
                    shutil.copyfile(wal, f"{tmp}.wal")
            conn = duckdb.connect(str(tmp))
            try:
                yield conn
                conn.execute("CHECKPOINT")
            finally:
                conn.close()
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.replace(tmp, db)
            wal.unlink(missing_ok=True)
        finally:
            for leftover in (tmp, Path(f"{tmp}.wal")):
                leftover.unlink(missing_ok=True)
            fcntl.flock(lock, fcntl.LOCK_UN)


@contextmanager
def _transaction(conn):
    """One DuckDB transaction: committed if the block finishes, rolled back if it raises."""
    conn.execute("BEGIN TRANSACTION")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise


def ensure_table(conn, name: str, cols: str) -> None:
    """Create ``name`` with ``cols`` (DDL columns) if missing, and add the columns a newer schema
    has to a table an earlier version created."""
    conn.execute(f"CREATE TABLE IF NOT EXISTS {name} ({cols})")
    have = {r[0] for r in conn.execute(f"DESCRIBE {name}").fetchall()}
    for col in (c.strip() for c in cols.split(",")):
        col_name, col_type = col.split(None, 1)
        if col_name not in have:
            conn.execute(f"ALTER TABLE {name} ADD COLUMN {col_name} {col_type}")


def create_tables(conn) -> None:
    """Create missing tables, and add columns that a newer schema has to existing ones."""
    for name, cols in TABLES.items():
        ensure_table(conn, name, cols)


def load_experiment(conn, store: ArtifactStore, exp: str, spec) -> dict[str, int]:
    """Replace every table's rows for ``exp`` with the artifacts' rows. Returns row counts."""
    margins = np.asarray(store.load_npy(exp, "model_outputs", "margins_test.npy"))
    outputs = pl.DataFrame({"experiment": exp, "model_id": np.repeat(np.arange(margins.shape[0]), margins.shape[1]),
                            "target_index": np.tile(np.arange(margins.shape[1]), margins.shape[0]),
                            "margin": margins.ravel().astype(np.float64)})
    examples = store.load_table(exp, "training_set", "examples.parquet")
    meta = store.load_json(exp, "training_set", "meta.json")
    experiments = pl.DataFrame([{
        "experiment": exp, "spec_digest": spec.digest(), "spec_json": spec.model_dump_json(),
        "source": spec.dataset.source, "attack": spec.attack.kind,
        "n_train": int((examples["split"] == "train").sum()), "n_test": int((examples["split"] == "test").sum()),
        "loaded_at": datetime.now(timezone.utc).replace(tzinfo=None)}])
    classes = pl.DataFrame({"experiment": exp, "label": np.arange(len(meta["classes"]), dtype=np.int64),
                            "class_name": [str(c) for c in meta["classes"]]})
    from ops.methods import METHODS, Context

    paths = {t: [str(store.require(exp, a, f)) for a, f in files] for t, files in SOURCES.items()}
    ctx = Context(spec, store, exp)
    paths["attributions"] = [str(m.top_table(ctx)) for m in METHODS.values()]
    create_tables(conn)
    counts = {}
    with _transaction(conn):
        for table in (t for t in TABLES if t not in QUERY_TABLES):   # query batches are not the run's
            conn.execute(f"DELETE FROM {table} WHERE experiment = ?", [exp])
            if table in paths:
                conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM read_parquet(?)", [paths[table]])
            else:
                _insert(conn, table, {"experiments": experiments, "model_outputs": outputs,
                                      "classes": classes}[table])
            counts[table] = conn.execute(f"SELECT count(*) FROM {table} WHERE experiment = ?", [exp]).fetchone()[0]
    return counts


QUERY_TABLES = ("queries", "query_attributions")


def _insert(conn, table: str, df: pl.DataFrame) -> None:
    """Append a polars DataFrame's rows to ``table`` by column name; DuckDB scans its Arrow
    buffers in place (``to_arrow`` shares them), no copy through pandas or Python rows."""
    conn.register("incoming", df.to_arrow())
    try:
        conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming")
    finally:
        conn.unregister("incoming")


def load_query_batch(conn, exp: str, batch: str, queries: pl.DataFrame, top: pl.DataFrame) -> dict[str, int]:
    """Add one batch of scored query examples (ops/newdata.py): its rows replace that batch's
    earlier rows, if any; every other row -- the experiment's own targets, other batches -- is
    untouched."""
    create_tables(conn)
    counts = {}
    with _transaction(conn):
        for table, df in (("queries", queries), ("query_attributions", top)):
            conn.execute(f"DELETE FROM {table} WHERE experiment = ? AND batch = ?", [exp, batch])
            _insert(conn, table, df)
            counts[table] = len(df)
    return counts


def load_study_tables(conn, exp: str, schemas: dict[str, str], frames: dict) -> dict[str, int]:
    """A study's own tables (``schemas``: name -> columns, in the study's ops module): each table's
    rows for ``exp`` replaced by ``frames[name]``, in one transaction."""
    counts = {}
    for name, cols in schemas.items():
        ensure_table(conn, name, cols)
    with _transaction(conn):
        for name, df in frames.items():
            conn.execute(f"DELETE FROM {name} WHERE experiment = ?", [exp])
            _insert(conn, name, df)
            counts[name] = len(df)
    return counts


def table_schemas(conn, tables) -> dict[str, list[tuple[str, str]]]:
    """(column, DuckDB type) of each table, as DESCRIBE gives them (for the assets' metadata)."""
    return {t: [(r[0], r[1]) for r in conn.execute(f"DESCRIBE {t}").fetchall()] for t in tables}


def delete_experiment(conn, exp: str) -> dict[str, int]:
    """Removes every row of ``exp`` from every table with an ``experiment`` column (the core's,
    query batches and the studies'). Returns the counts."""
    have = sorted({r[0] for r in conn.execute(
        "SELECT table_name FROM information_schema.columns WHERE column_name = 'experiment'").fetchall()})
    counts = {}
    with _transaction(conn):
        for table in have:
            counts[table] = conn.execute(f"SELECT count(*) FROM {table} WHERE experiment = ?", [exp]).fetchone()[0]
            conn.execute(f"DELETE FROM {table} WHERE experiment = ?", [exp])
    return counts
