"""The robustness study on tiny data: its spec section, its selection (only specs that name it),
and its assets end to end into the warehouse."""
import duckdb
import numpy as np
import polars as pl
import pytest
import yaml
from dagster import AssetSelection, instance_for_test, materialize

from assets import ALL_ASSETS, ALL_CHECKS
from definitions import make_resources
from ops.spec import SpecError, parse_spec

SPEC = {
    "seed": 3,
    "dataset": {"source": "digits", "limit_train": 300, "limit_test": 80},
    "model": {"arch": "mlp", "hidden": 32},
    "training": {"epochs": 8, "batch_size": 32, "lr": 0.05},
    "robustness": {"eps": 0.1, "steps": 3, "eval_steps": 6, "eval_restarts": 1, "eval_examples": 60,
                   "ensemble_sizes": [1, 2], "fusion_epochs": 3,
                   "neural": {"sites": 16, "images": 160, "repeats": 2, "attack_images": 20, "steps": 4,
                              "budgets": [0.5, 2.0]}},
}


def test_the_section_is_validated_with_its_keys_named():
    with pytest.raises(SpecError, match="robustness.norm"):
        parse_spec({"name": "x", "robustness": {"norm": "l1"}})
    with pytest.raises(SpecError, match="robustness.ensemble_sizes"):
        parse_spec({"name": "x", "robustness": {"ensemble_sizes": [0, 2]}})
    with pytest.raises(SpecError, match="robustness.neural.budgets"):
        parse_spec({"name": "x", "robustness": {"neural": {"budgets": []}}})
    with pytest.raises(SpecError, match="robustness.ensemble_sizes: the neural-response proxy needs"):
        parse_spec({"name": "x", "robustness": {"ensemble_sizes": [1]}})
    assert parse_spec({"name": "x", "robustness": {"ensemble_sizes": [1], "neural": {"enabled": False}}})
    with pytest.raises(SpecError, match="robustness.unknown"):
        parse_spec({"name": "x", "robustness": {"unknown": 1}})


def test_only_specs_that_name_the_study_select_it():
    from assets.sources import _graph
    from assets.studies import named, selection_for

    plain = parse_spec({"name": "x"})
    study = parse_spec({"name": "x", "robustness": {}})
    keys = lambda s: {k.to_user_string() for k in selection_for(s).resolve(_graph())}   # noqa: E731
    assert named(plain) == [] and named(study) == ["robustness"]
    assert "robust_models" not in keys(plain) and "warehouse" in keys(plain)
    assert keys(study) - keys(plain) == {"robust_models", "robustness_eval", "neural_response", "robustness_warehouse"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("robustness")
    exp_dir = tmp / "experiments"
    exp_dir.mkdir()
    (exp_dir / "rob.yaml").write_text(yaml.safe_dump(SPEC))
    (exp_dir / "plain.yaml").write_text(yaml.safe_dump({k: v for k, v in SPEC.items() if k != "robustness"}))
    home = tmp / "home"
    data = AssetSelection.assets("raw_dataset", "training_set", "poison_truth", "loader_files")
    results = {}
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("experiments", ["rob", "plain"])
        for name in ("rob", "plain"):
            results[name] = materialize([*ALL_ASSETS, *ALL_CHECKS], partition_key=name, instance=instance,
                                        selection=data | AssetSelection.groups("robustness"),
                                        resources=make_resources(home, exp_dir))
    return results, home


def test_the_study_runs_into_the_warehouse(study):
    results, home = study
    assert results["rob"].success
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        table = conn.sql("SELECT * FROM robustness WHERE experiment = 'rob'").pl()
        curve = conn.sql("SELECT * FROM robustness_curve WHERE experiment = 'rob'").pl()
        neural = conn.sql("SELECT * FROM neural_attacks WHERE experiment = 'rob'").pl()
    # 3 budgets (standard, ε/2, ε) x 2 ensemble sizes x 3 attacks, and two fusions at 2 budgets x 3 attacks
    assert len(table) == 3 * 2 * 3 + 2 * 2 * 3
    assert set(table["scheme"]) == {"ensemble", "fusion", "fusion_at"}
    assert (table["robust_accuracy"] <= table["natural_accuracy"] + 1e-9).all()
    assert table["natural_accuracy"].min() > 0.5                          # the models learned
    # a larger attack never leaves more examples correct (same models, same examples)
    for _, g in table.group_by(["scheme", "eps_train", "k"]):
        acc = g.sort("eps_test")["robust_accuracy"].to_numpy()
        assert (np.diff(acc) <= 1e-9).all()
    # PGD-AT at ε beats the standard model at ε (single models, the curve)
    at = dict(curve.filter(np.isclose(curve["eps"].to_numpy(), 0.1)).select("eps_train", "robust_accuracy").rows())
    assert at[0.1] > at[0.0]
    assert len(neural) == 2 * 2 and np.isfinite(neural.drop("experiment", "surrogate").to_numpy()).all()
    for _, g in neural.group_by("surrogate"):
        g = g.sort("budget")
        assert (np.diff(g["brain_change"]) > 0).all() and (np.diff(g["self_change"]) > 0).all()
    # the claim is checked and recorded, whichever way it went
    meta = next(e for e in results["rob"].get_asset_materialization_events()
                if e.asset_key.to_user_string() == "robustness_eval").materialization.metadata
    assert isinstance(meta["claim"].value["held"], bool)


def test_a_spec_without_the_section_materializes_no_study_asset(study):
    results, home = study
    assert results["plain"].success
    done = {e.asset_key.to_user_string() for e in results["plain"].get_asset_materialization_events()}
    assert "loader_files" in done and not done & {"robust_models", "robustness_eval", "robustness_warehouse"}
    assert not (home / "artifacts" / "plain" / "robust_models").exists()


def assert_study_tables_documented(home, tables) -> None:
    """docs/tables.md's "####" sections of ``tables`` against a study's warehouse in ``home``: the
    same columns and types, rows present, no NULL where the doc allows none, values within "one of"."""
    import re

    from tests.test_lineage import _documented_tables

    doc = {k: v for k, v in _documented_tables("#### ").items() if k in tables}
    assert set(doc) == set(tables)
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        for table, cols in doc.items():
            got = {name: typ for name, typ, *_ in conn.execute(f"DESCRIBE {table}").fetchall()}
            assert got == {c: t for c, (t, _) in cols.items()}, table
            assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] > 0
            for col, (_, meaning) in cols.items():
                if "NULL" not in meaning:
                    assert conn.execute(f"SELECT count(*) FROM {table} WHERE {col} IS NULL").fetchone()[0] == 0
                if "one of" in meaning:
                    allowed = set(re.findall(r"`([^`]+)`", meaning.split("one of", 1)[1].split(":")[0]))
                    values = {r[0] for r in conn.execute(f"SELECT DISTINCT {col} FROM {table}").fetchall()}
                    assert values <= allowed, f"{table}.{col}: {values - allowed}"


def test_the_study_tables_doc_matches_the_warehouse(study):
    """docs/tables.md's study sections against the study's warehouse, as test_lineage checks the core's."""
    from ops.robustness import TABLES

    _, home = study
    assert set(TABLES) == {"robustness", "robustness_curve", "neural_attacks"}
    assert_study_tables_documented(home, TABLES)


def test_the_report_shows_the_study_where_it_ran(study):
    from ops.report import _robustness_lines

    _, home = study
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        lines = _robustness_lines(conn, "rob")
        assert _robustness_lines(conn, "plain") == []
    assert lines[0].startswith("  robustness") and len(lines) == 1 + 3 * 2 + 2 * 2
    assert "ensemble eps_train 0.05   K=2: natural" in "\n".join(lines) and "@0.2 " in lines[-1]


def test_the_study_tables_carry_their_schema_and_row_counts_as_metadata(study):
    results, _ = study
    meta = next(e for e in results["rob"].get_asset_materialization_events()
                if e.asset_key.to_user_string() == "robustness_warehouse").materialization.metadata
    cols = [c.name for c in meta["robustness/columns"].value.columns]
    assert cols[:3] == ["experiment", "scheme", "eps_train"] and "robust_accuracy" in cols
    assert meta["robustness/rows"].value == 3 * 2 * 3 + 2 * 2 * 3
    assert meta["dagster/row_count"].value == sum(meta[f"{t}/rows"].value
                                                  for t in ("robustness", "robustness_curve", "neural_attacks"))
