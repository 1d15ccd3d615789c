"""The two-regimes study on tiny data: its section's validation, its selection, the assets end to
end into the warehouse, the claims recorded, the report's lines."""
import duckdb
import numpy as np
import polars as pl
import pytest
import yaml
from dagster import AssetSelection, instance_for_test, materialize

from assets import ALL_ASSETS, ALL_CHECKS
from definitions import make_resources
from ops.spec import SpecError, parse_spec
from tests.test_robustness import assert_study_tables_documented

SPEC = {
    "seed": 4,
    "dataset": {"source": "digits", "limit_train": 300, "limit_test": 100},
    "model": {"arch": "mlp", "hidden": 32},
    "training": {"epochs": 4, "batch_size": 32, "lr": 0.1},
    "regimes": {"seeds": 2, "small_lr": 0.01, "momenta": [0.9], "equivalence_epochs": 3},
}


def test_the_section_is_validated_with_its_keys_named():
    with pytest.raises(SpecError, match="regimes.schedules"):
        parse_spec({"name": "x", "regimes": {"schedules": ["cosine"]}})
    with pytest.raises(SpecError, match="regimes.momenta"):
        parse_spec({"name": "x", "regimes": {"momenta": [1.0]}})
    with pytest.raises(SpecError, match="regimes.seeds"):
        parse_spec({"name": "x", "regimes": {"seeds": 0}})
    with pytest.raises(SpecError, match="regimes.unknown"):
        parse_spec({"name": "x", "regimes": {"unknown": 1}})


def test_only_specs_that_name_the_study_select_it():
    from assets.sources import _graph
    from assets.studies import named, selection_for

    keys = lambda s: {k.to_user_string() for k in selection_for(s).resolve(_graph())}   # noqa: E731
    plain, study = parse_spec({"name": "x"}), parse_spec({"name": "x", "regimes": {}})
    assert named(study) == ["regimes"]
    assert keys(study) - keys(plain) == {"regimes_runs", "regimes_warehouse"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("regimes")
    exp_dir = tmp / "experiments"
    exp_dir.mkdir()
    (exp_dir / "reg.yaml").write_text(yaml.safe_dump(SPEC))
    home = tmp / "home"
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("experiments", ["reg"])
        result = materialize([*ALL_ASSETS, *ALL_CHECKS], partition_key="reg", instance=instance,
                             selection=AssetSelection.assets("raw_dataset", "training_set", "poison_truth",
                                                             "loader_files") | AssetSelection.groups("regimes"),
                             resources=make_resources(home, exp_dir))
    return result, home


def test_the_study_runs_into_the_warehouse(study):
    result, home = study
    assert result.success
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        runs = conn.sql("SELECT * FROM regimes").pl()
        curve = conn.sql("SELECT * FROM regimes_curve").pl()
        eq = conn.sql("SELECT * FROM momentum_equivalence").pl()
    assert sorted(runs["schedule"].unique().to_list()) == ["small_only", "step", "triangular", "two_regime"]
    assert len(runs) == 4 * 2 and (runs["epochs"] == 4).all()
    assert runs["test_accuracy"].min() > 0.3                   # every schedule learned (chance 0.1)
    # the schedules trained differently: their loss curves are not one curve
    per_run = curve.filter(pl.col("run").is_in(["step", "triangular", "two_regime", "small_only"]))
    assert per_run.group_by("epoch").agg(pl.col("train_loss").n_unique())["train_loss"].min() == 4
    # four schedules x 4 epochs, plain SGD and momentum 0.9 corrected / uncorrected x 3 epochs
    assert len(curve) == 4 * 4 + 3 * 3 and np.isfinite(curve["train_loss"].to_numpy()).all()
    assert len(eq) == 3 and eq.filter(pl.col("momentum") == 0)["curve_gap"].item() == 0.0
    corrected = eq.filter(pl.col("corrected") & (pl.col("momentum") > 0))
    assert corrected["lr"].item() == pytest.approx(0.1 * (1 - 0.9))
    meta = next(e for e in result.get_asset_materialization_events()
                if e.asset_key.to_user_string() == "regimes_runs").materialization.metadata
    claims = meta["claims"].value
    assert {"two_regime_matches_step", "small_steps_alone_generalize_worse",
            "momentum_equivalent_with_lr_correction"} <= set(claims)
    assert all(isinstance(c["held"], bool) for c in claims.values())
    assert "data:image/png;base64," in meta["loss_curves"].value


def test_the_study_tables_doc_matches_the_warehouse(study):
    from ops.regimes import TABLES

    _, home = study
    assert_study_tables_documented(home, TABLES)


def test_the_report_shows_the_study(study):
    from ops.report import _regimes_lines

    _, home = study
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        lines = _regimes_lines(conn, "reg")
        assert _regimes_lines(conn, "other") == []
    assert lines[0].startswith("  regimes") and len(lines) == 1 + 4


def test_the_schedules_differ_where_the_paper_says(study):
    """two_regime's loss before its switch sits above its final loss (plain SGD at a large constant
    rate does not settle; the small steps do)."""
    _, home = study
    from ops.store import ArtifactStore

    claims = ArtifactStore(home / "artifacts").load_json("reg", "regimes_runs", "claims.json")
    c = claims["large_step_loss_plateaus_then_drops"]
    assert c["final_loss"] < c["loss_before_switch"]
