"""The DuckDB warehouse: one table per result, every row keyed by experiment.

Schemas are fixed here (and documented in docs/tables.md); loading an experiment replaces its
rows in one transaction, so a reader sees the old rows or the new ones, never a mix.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from ops.store import ArtifactStore

TABLES: dict[str, str] = {
    "experiments": """experiment VARCHAR, spec_digest VARCHAR, spec_json VARCHAR, source VARCHAR,
        attack VARCHAR, n_train INTEGER, n_test INTEGER, loaded_at TIMESTAMP""",
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


def create_tables(conn) -> None:
    """Create missing tables, and add columns that a newer schema has to existing ones."""
    for name, cols in TABLES.items():
        conn.execute(f"CREATE TABLE IF NOT EXISTS {name} ({cols})")
        have = {r[0] for r in conn.execute(f"DESCRIBE {name}").fetchall()}
        for col in (c.strip() for c in cols.split(",")):
            col_name, col_type = col.split(None, 1)
            if col_name not in have:
                conn.execute(f"ALTER TABLE {name} ADD COLUMN {col_name} {col_type}")


def load_experiment(conn, store: ArtifactStore, exp: str, spec) -> dict[str, int]:
    """Replace every table's rows for ``exp`` with the artifacts' rows. Returns row counts."""
    margins = np.asarray(store.load_npy(exp, "model_outputs", "margins_test.npy"))
    outputs = pd.DataFrame({"experiment": exp, "model_id": np.repeat(np.arange(margins.shape[0]), margins.shape[1]),
                            "target_index": np.tile(np.arange(margins.shape[1]), margins.shape[0]),
                            "margin": margins.ravel().astype(np.float64)})
    examples = store.load_table(exp, "training_set", "examples.parquet")
    experiments = pd.DataFrame([{
        "experiment": exp, "spec_digest": spec.digest(), "spec_json": spec.model_dump_json(),
        "source": spec.dataset.source, "attack": spec.attack.kind,
        "n_train": int((examples["split"] == "train").sum()), "n_test": int((examples["split"] == "test").sum()),
        "loaded_at": pd.Timestamp.now(tz="UTC").tz_localize(None)}])
    from ops.methods import METHODS, Context

    paths = {t: [str(store.require(exp, a, f)) for a, f in files] for t, files in SOURCES.items()}
    ctx = Context(spec, store, exp)
    paths["attributions"] = [str(m.top_table(ctx)) for m in METHODS.values()]
    create_tables(conn)
    counts = {}
    conn.execute("BEGIN TRANSACTION")
    try:
        for table in TABLES:
            conn.execute(f"DELETE FROM {table} WHERE experiment = ?", [exp])
            if table in paths:
                conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM read_parquet(?)", [paths[table]])
            else:
                conn.register("incoming", {"experiments": experiments, "model_outputs": outputs}[table])
                conn.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming")
                conn.unregister("incoming")
            counts[table] = conn.execute(f"SELECT count(*) FROM {table} WHERE experiment = ?", [exp]).fetchone()[0]
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return counts
