"""The Smallify study on tiny data: its section's validation, its selection, the assets end to end
into the warehouse, the comparison with the static width grid, the report's lines."""
import duckdb
import pytest
import yaml
from dagster import AssetSelection, instance_for_test, materialize

from assets import ALL_ASSETS, ALL_CHECKS
from definitions import make_resources
from ops.spec import SpecError, parse_spec
from tests.test_robustness import assert_study_tables_documented

SPEC = {
    "seed": 5,
    "dataset": {"source": "digits", "limit_train": 400, "limit_test": 150},
    "smallify": {"hidden": [32, 32], "lambdas": [0.0, 0.05], "width_grid": [0.125, 1.0], "epochs": 12,
                 "batch_size": 32, "prune_every": 20, "latency_repeats": 3},
}


def test_the_section_is_validated_with_its_keys_named():
    with pytest.raises(SpecError, match="smallify.width_grid"):
        parse_spec({"name": "x", "smallify": {"width_grid": [0.5]}})
    with pytest.raises(SpecError, match="smallify.lambdas"):
        parse_spec({"name": "x", "smallify": {"lambdas": [-1.0]}})
    with pytest.raises(SpecError, match="smallify.hidden"):
        parse_spec({"name": "x", "smallify": {"hidden": [0]}})
    with pytest.raises(SpecError, match="smallify.arch"):
        parse_spec({"name": "x", "smallify": {"arch": "vit"}})
    assert parse_spec({"name": "x", "smallify": {"arch": "cnn"}}).smallify.hidden == [128]


def test_only_specs_that_name_the_study_select_it():
    from assets.sources import _graph
    from assets.studies import named, selection_for

    keys = lambda s: {k.to_user_string() for k in selection_for(s).resolve(_graph())}   # noqa: E731
    plain, study = parse_spec({"name": "x"}), parse_spec({"name": "x", "smallify": {}})
    assert named(study) == ["smallify"]
    assert keys(study) - keys(plain) == {"smallify_runs", "smallify_warehouse"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smallify")
    exp_dir = tmp / "experiments"
    exp_dir.mkdir()
    (exp_dir / "small.yaml").write_text(yaml.safe_dump(SPEC))
    home = tmp / "home"
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("experiments", ["small"])
        result = materialize([*ALL_ASSETS, *ALL_CHECKS], partition_key="small", instance=instance,
                             selection=AssetSelection.assets("raw_dataset", "training_set", "poison_truth",
                                                             "loader_files") | AssetSelection.groups("smallify"),
                             resources=make_resources(home, exp_dir))
    return result, home


def test_the_study_runs_into_the_warehouse(study):
    result, home = study
    assert result.success
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        rows = {(k, lam, f): (w, p, acc, ratio, sim) for k, lam, f, w, p, acc, ratio, sim in conn.execute(
            "SELECT kind, lam, width_frac, widths, params, test_accuracy, params_ratio, similar_accuracy "
            "FROM smallify").fetchall()}
        hist = conn.execute("SELECT lam, min(params), max(params), count(*) FROM smallify_history GROUP BY lam "
                            "ORDER BY lam").fetchall()
    assert len(rows) == 2 + 2
    full = rows[("static", 0.0, 1.0)]
    eighth = rows[("static", 0.0, 0.125)]
    assert full[0] == "32,32" and eighth[0] == "4,4" and eighth[1] < full[1] / 10
    # the penalty removed units: a smaller network than the full one, that still learned
    pruned = rows[("smallify", 0.05, next(f for k, lam, f in rows if k == "smallify" and lam == 0.05))]
    assert sum(map(int, pruned[0].split(","))) < 64 and pruned[2] > 0.5
    unpenalized = next(v for (k, lam, _), v in rows.items() if k == "smallify" and lam == 0.0)
    assert unpenalized[0] == "32,32"                                     # λ = 0 removes nothing
    # ratios are against the most accurate static network, which itself has ratio 1
    best = max((v for (k, *_), v in rows.items() if k == "static"), key=lambda v: v[2])
    assert best[3] == pytest.approx(1.0) and best[4]
    assert pruned[3] == pytest.approx(best[1] / pruned[1])
    (_, lo0, hi0, n0), (_, lo, hi, n) = hist
    assert lo0 == hi0 and lo < hi and n > 1                              # history shows the removals
    meta = next(e for e in result.get_asset_materialization_events()
                if e.asset_key.to_user_string() == "smallify_runs").materialization.metadata
    claim = meta["claim"].value
    assert claim["paper"] == {"params_ratio": 35.0, "speedup": 6.0} and isinstance(claim["held"], bool)
    assert "data:image/png;base64," in meta["accuracy_vs_size"].value


def test_the_study_tables_doc_matches_the_warehouse(study):
    from ops.smallify import TABLES

    _, home = study
    assert_study_tables_documented(home, TABLES)


def test_the_report_shows_the_study(study):
    from ops.report import _smallify_lines

    _, home = study
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        lines = _smallify_lines(conn, "small")
    assert lines[0].startswith("  smallify") and len(lines) == 1 + 4
