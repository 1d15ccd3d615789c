"""End to end: materialize the whole lineage for tiny specs and check the warehouse."""
import io
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from dagster import materialize

from assets import ALL_ASSETS, ALL_CHECKS
from definitions import make_resources

TINY = {
    "seed": 1,
    "dataset": {"source": "digits", "limit_train": 300, "limit_test": 60},
    "attack": {"kind": "badnets", "target_class": 0, "poison_count": 20, "patch_size": 3},
    "model": {"arch": "mlp", "hidden": 32},
    "training": {"epochs": 10, "batch_size": 32, "save_epochs": [5]},
    "subsets": {"num_models": 24, "num_heldout": 8},
    "trak": {"num_models": 4, "proj_dim": 32, "top_k": 5, "checkpoint_epochs": [5]},   # from save_epochs
    "datamodels": {"n_lambdas": 4, "tol": 1e-4},
    "detector": {"restarts": 16},
    "lds": {"min_heldout": 5},
}
TINY_TRAK = {"num_models": 4, "proj_dim": 32, "top_k": 5}     # for specs that keep no intermediate epochs
TINY_CNN = {**TINY, "model": {"arch": "small_cnn", "hidden": 8}, "training": {"epochs": 15, "batch_size": 32},
            "trak": TINY_TRAK}


def run(tmp_path, name, spec, home="home"):
    from dagster import instance_for_test

    exp_dir = tmp_path / "experiments"
    exp_dir.mkdir(exist_ok=True)
    (exp_dir / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("experiments", [name])
        result = materialize([*ALL_ASSETS, *ALL_CHECKS], partition_key=name, instance=instance, raise_on_error=False,
                             resources=make_resources(tmp_path / home, exp_dir))
        checks = {e.check_name: e.passed for e in result.get_asset_check_evaluations()}
    return result, checks, tmp_path / home


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lineage")
    result, checks, home = run(tmp, "tiny", TINY)
    assert result.success
    return tmp, checks, home


def q(home, sql):
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        return conn.execute(sql).fetchall()


def test_warehouse_holds_every_stage(tiny):
    _, checks, home = tiny
    assert q(home, "SELECT split, count(*), count(*) FILTER (WHERE poisoned) FROM examples "
                   "WHERE experiment = 'tiny' GROUP BY split ORDER BY split") == [
        ("test", 60, 0), ("test_triggered", q(home, "SELECT count(*) FROM examples WHERE split = 'test' "
                                                   "AND label <> 0")[0][0], q(home, "SELECT count(*) FROM "
                                                   "examples WHERE split = 'test' AND label <> 0")[0][0]),
        ("train", 300, 20)]
    # poisons carry the target label and remember their original one
    assert q(home, "SELECT count(*) FROM examples WHERE poisoned AND split = 'train' "
                   "AND (label <> 0 OR original_label = 0)") == [(0,)]
    roles = dict(q(home, "SELECT role, count(*) FROM models GROUP BY role"))
    assert roles == {"train": 24, "heldout": 8, "full": 1}
    assert q(home, "SELECT min(accuracy) > 0.3 FROM models") == [(True,)]
    assert q(home, "SELECT attack_success_rate > 0.5 FROM models WHERE role = 'full'") == [(True,)]
    assert q(home, "SELECT count(*) FROM subset_masks") == [(32,)]
    assert q(home, "SELECT count(*) FROM model_outputs") == [(33 * 60,)]
    # top-5 attributions per target and method, ranks 1..5, scores non-increasing
    assert q(home, "SELECT method, count(DISTINCT target_index), count(*) FROM attributions "
                   "GROUP BY method ORDER BY method") == [(m, 60, 300) for m in ("datamodels", "repsim", "tracin", "trak")]
    assert q(home, "SELECT count(*) FROM (SELECT target_index, method, score, "
                   "lag(score) OVER (PARTITION BY method, target_index ORDER BY rank) AS prev "
                   "FROM attributions) WHERE prev < score") == [(0,)]
    assert q(home, "SELECT count(*) > 0, bool_and(weight <> 0) FROM datamodel_weights") == [(True, True)]
    lds = dict(q(home, "SELECT method, lds FROM lds"))
    assert set(lds) == {"trak", "datamodels", "tracin", "repsim"} and lds["trak"] > 0.1
    assert q(home, "SELECT DISTINCT n_heldout FROM lds") == [(8,)]
    assert q(home, "SELECT count(*) FROM lds WHERE NOT (ci95_low <= lds AND lds <= ci95_high)") == [(0,)]
    # LDS against the number of models: TRAK's 8 checkpoints (4 models x 2 epochs) rescored, datamodels refitted
    curve = q(home, "SELECT method, list(num_models ORDER BY num_models) FROM lds_curve GROUP BY method ORDER BY method")
    assert curve[0][0] == "datamodels" and curve[1] == ("trak", [1, 2, 5, 8])
    assert q(home, "SELECT lds FROM lds_curve WHERE method = 'trak' AND num_models = 8")[0][0] == pytest.approx(lds["trak"])
    assert q(home, "SELECT method, count(*) FROM backdoor_scores GROUP BY method ORDER BY method") == [
        ("activation_clustering", 300), ("spectral_signatures", 300), ("spectre", 300), ("strongest_feature", 300)]
    sf = q(home, "SELECT auroc, n_poisoned, recall_at_fpr01 FROM backdoor_summary WHERE method = 'strongest_feature'")[0]
    assert sf[0] > 0.8 and sf[1] == 20 and 0 <= sf[2] <= 1
    # every method that flagged something was retrained without its flagged set; the reference without the truth
    for method, nf, racc, ref in q(home, "SELECT method, n_flagged, retrain_accuracy, reference_accuracy "
                                         "FROM backdoor_summary"):
        assert (racc is not None) == (nf > 0), method
        assert ref is not None and 0.5 < ref <= 1
    assert (home / "artifacts" / "tiny" / "backdoor_report" / "top_flagged.png").read_bytes()[:4] == b"\x89PNG"
    assert (home / "artifacts" / "tiny" / "backdoor_report" / "scores.png").read_bytes()[:4] == b"\x89PNG"
    assert set(checks) == {"models_above_chance", "margins_finite", "features_finite", "scores_finite",
                           "baseline_scores_finite", "enough_heldout_models", "lds_defined",
                           "detector_flagged_something"}
    assert all(passed for name, passed in checks.items() if name != "detector_flagged_something")


def test_every_model_has_its_own_file_and_intermediate_checkpoint(tiny):
    from safetensors import safe_open

    _, _, home = tiny
    ck = home / "artifacts" / "tiny" / "checkpoints"
    files = sorted((ck / "models").rglob("*.safetensors"))
    assert len([f for f in files if "-e5" in f.name]) == 33 and len(files) == 66
    with safe_open(str(ck / "models-epoch5.safetensors"), "pt") as f:
        assert f.get_tensor("fc1.weight").shape[0] == 33 and f.metadata()["epoch"] == "5"
    with safe_open(str(next(f for f in files if "-e5" not in f.name)), "pt") as f:
        meta = f.metadata()
        assert {"seed", "recipe_hash", "accuracy", "mask_index", "role"} <= set(meta)
        assert f.get_tensor("margins_test").shape == (60,)
    assert q(home, "SELECT count(DISTINCT file) FROM models") == [(33,)]
    assert q(home, "SELECT DISTINCT precision FROM models") == [("fp32",)]      # an MLP: float32 under "auto"


def test_trak_ensembles_the_intermediate_checkpoints(tiny):
    _, _, home = tiny
    feats = np.load(home / "artifacts" / "tiny" / "gradient_features" / "train.npy", mmap_mode="r")
    assert feats.shape == (8, 300, 32)            # 4 models x (final + epoch 5)
    assert not np.allclose(feats[0], feats[4])    # the epoch-5 member is not the final model again


def test_cnn_lineage_same_spec_same_artifacts(tmp_path):
    """The CPU CNN path (one model per core, channels-last, numba pool, bf16 where native) through
    the whole lineage, twice: the checkpoints agree bit for bit."""
    from kernels.train import cpu_has_native_bf16

    homes = []
    for home in ("a", "b"):
        result, checks, h = run(tmp_path, "tinycnn", TINY_CNN, home=home)
        assert result.success and checks["models_above_chance"]
        homes.append(h)
    precision = "bf16" if cpu_has_native_bf16() else "fp32"
    assert q(homes[0], "SELECT DISTINCT precision FROM models") == [(precision,)]
    from safetensors.numpy import load_file

    ta, tb = (load_file(h / "artifacts" / "tinycnn" / "checkpoints" / "models.safetensors") for h in homes)
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


def test_readme_queries_answer(tiny):
    _, _, home = tiny
    top = q(home, """SELECT rank, train_id, score FROM attributions
                     WHERE experiment = 'tiny' AND method = 'trak' AND target_index = 42
                     ORDER BY rank LIMIT 10""")
    assert [r[0] for r in top] == [1, 2, 3, 4, 5]
    hits = q(home, """SELECT count(*) FILTER (WHERE flagged AND poisoned), count(*) FILTER (WHERE flagged)
                      FROM backdoor_scores WHERE experiment = 'tiny' AND method = 'strongest_feature'""")[0]
    p, n_flagged = q(home, "SELECT precision, n_flagged FROM backdoor_summary "
                           "WHERE experiment = 'tiny' AND method = 'strongest_feature'")[0]
    assert hits[1] == n_flagged and (n_flagged == 0 or hits[0] == round(p * n_flagged))


def test_same_spec_same_artifacts(tiny):
    tmp, _, home = tiny
    result, _, home2 = run(tmp, "tiny", TINY, home="home2")
    assert result.success
    a, b = home / "artifacts" / "tiny", home2 / "artifacts" / "tiny"
    for rel in ("subset_masks/masks.npy", "training_set/train_images.npy", "attribution_scores/test_x_train.npy",
                "datamodel_weights/weight.npy", "model_outputs/margins_test.npy"):
        np.testing.assert_allclose(np.load(a / rel), np.load(b / rel), rtol=1e-6, atol=1e-7, err_msg=rel)
    from safetensors.numpy import load_file

    ta, tb = load_file(a / "checkpoints" / "models.safetensors"), load_file(b / "checkpoints" / "models.safetensors")
    assert ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)


def _png(v):
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), v, np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def test_users_own_data_without_truth(tmp_path):
    """A Parquet table with no poison truth and no attack: the lineage runs, the detector still
    ranks, and precision/recall are left empty.  Too few held-out models fails the LDS check."""
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 150)
    images = [_png(int(40 + 80 * c + rng.integers(0, 30))) for c in labels]
    pq.write_table(pa.table({"image": images, "label": labels.tolist()}), tmp_path / "mine.parquet")
    spec = {"dataset": {"source": "parquet", "path": str(tmp_path / "mine.parquet"), "channels": 1},
            "model": {"arch": "logreg"}, "training": {"epochs": 5, "batch_size": 16},
            "subsets": {"num_models": 12, "num_heldout": 4}, "trak": {"num_models": 2, "proj_dim": 16},
            "datamodels": {"n_lambdas": 3, "tol": 1e-4}, "detector": {"restarts": 4, "retrain": False},
            "lds": {"min_heldout": 10}}
    result, checks, home = run(tmp_path, "mine", spec)
    assert result.success
    assert checks["enough_heldout_models"] is False
    assert q(home, "SELECT count(*), count(poisoned) FROM examples WHERE split = 'train'") == [(120, 0)]
    summary = q(home, "SELECT method, precision, recall, auroc, recall_at_fpr01 FROM backdoor_summary ORDER BY method")
    assert summary == [(m, None, None, None, None) for m in ("activation_clustering", "spectral_signatures", "spectre",
                                                             "strongest_feature")]
    assert q(home, "SELECT count(*), count(DISTINCT rank) FROM backdoor_scores WHERE method = 'strongest_feature'") \
        == [(120, 120)]
    assert q(home, "SELECT count(*) FROM examples WHERE split = 'test_triggered'") == [(0,)]


def test_refused_spec_writes_nothing(tmp_path):
    bad = dict(TINY, attack={"kind": "badnets", "source_class": 3, "poison_count": 10_000})
    result, _, home = run(tmp_path, "bad", bad)
    assert not result.success
    assert not (home / "artifacts" / "bad").exists()
    assert not (home / "warehouse.duckdb").exists()


def test_checkpoint_of_another_model_is_refused(tiny):
    from ops.spec import parse_spec
    from ops.store import ArtifactError, ArtifactStore
    from ops.training import load_member, model_factory

    _, _, home = tiny
    store = ArtifactStore(home / "artifacts")
    spec = parse_spec({**TINY, "name": "tiny"})
    make_model, meta = model_factory(spec, store, "tiny")
    assert meta["arch"] == "mlp" and meta["models"] == "33"
    one = load_member(spec, store, "tiny", 32)
    assert {k: tuple(v.shape) for k, v in one.items()} == {k: tuple(v.shape) for k, v in make_model().state_dict().items()}
    with pytest.raises(ArtifactError, match="holds 33 models; model 33"):
        load_member(spec, store, "tiny", 33)
    other = parse_spec({**TINY, "name": "tiny", "model": {"arch": "mlp", "hidden": 64}})
    with pytest.raises(ArtifactError, match="holds mlp \\(hidden=32\\) models but the spec asks for mlp \\(hidden=64\\)"):
        model_factory(other, store, "tiny")


def _training_run(tmp_path, spec):
    """Materialize the lineage up to the checkpoints; the checkpoints' trained/reused counts."""
    from dagster import AssetKey, AssetSelection, instance_for_test

    exp_dir = tmp_path / "experiments"
    exp_dir.mkdir(exist_ok=True)
    (exp_dir / "retrain.yaml").write_text(yaml.safe_dump(spec))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("experiments", ["retrain"])
        result = materialize(ALL_ASSETS, partition_key="retrain", instance=instance,
                             selection=AssetSelection.assets("checkpoints").upstream().required_multi_asset_neighbors(),
                             resources=make_resources(tmp_path / "home", exp_dir))
        meta = next(e.materialization.metadata for e in result.get_asset_materialization_events()
                    if e.asset_key == AssetKey("checkpoints"))
    return meta["trained_this_run"].value, meta["reused"].value


def test_models_are_reused_for_the_same_data_and_retrained_for_new_data(tmp_path):
    """The store keys a model by recipe, data, mask and seed: re-running the same spec trains
    nothing, but an attack that changes the training data trains every model again."""
    spec = {**TINY, "training": {"epochs": 2, "batch_size": 32}, "subsets": {"num_models": 6, "num_heldout": 2},
            "trak": TINY_TRAK}
    assert _training_run(tmp_path, spec) == (9, 0)
    assert _training_run(tmp_path, spec) == (0, 9)
    changed = {**spec, "attack": {**spec["attack"], "poison_count": 10}}
    assert _training_run(tmp_path, changed) == (9, 0)


def test_baselines_and_new_targets_match_their_written_out_scores(tiny):
    """TracIn = sum over checkpoints of (Q ⊙ Φ) φ(z); new targets scored against the stored
    training features (ops.attribution.score_targets) reproduce the test split's rows."""
    from kernels.npyio import NpyFile
    from ops.attribution import score_targets
    from ops.spec import load_spec_file
    from ops.store import ArtifactStore

    tmp, _, home = tiny
    store = ArtifactStore(home / "artifacts")
    train = np.load(store.path("tiny", "gradient_features", "train.npy")).astype(np.float64)
    test = np.load(store.path("tiny", "gradient_features", "test.npy")).astype(np.float64)
    q = np.load(store.path("tiny", "gradient_features", "out_to_loss.npy")).astype(np.float64)
    want = np.sum([test[m] @ (train[m] * q[m][:, None]).T for m in range(len(train))], 0)
    got = np.load(store.path("tiny", "baseline_attributions", "tracin/test_x_train.npy"))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6 * np.abs(want).max())
    spec = load_spec_file(tmp / "experiments" / "tiny.yaml")
    rows = [3, 7, 11]
    with NpyFile.create(tmp / "new.npy", (len(train), len(rows), train.shape[2]), np.float32) as new:
        for m in range(len(train)):
            new.write_rows(m, 0, test[m, rows])
    with NpyFile(tmp / "new.npy") as new:
        assert score_targets(spec, store, "tiny", new, tmp / "new_scores.npy", "cpu") == (3, 300)
    full = np.load(store.path("tiny", "attribution_scores", "test_x_train.npy"))
    np.testing.assert_allclose(np.load(tmp / "new_scores.npy"), full[rows], rtol=1e-4, atol=1e-5 * np.abs(full).max())
    with NpyFile.create(tmp / "bad.npy", (len(train), 2, train.shape[2] - 1), np.float32) as bad:   # narrower than k
        pass
    with NpyFile(tmp / "bad.npy") as bad, pytest.raises(Exception, match="bad.npy: target features of shape"):
        score_targets(spec, store, "tiny", bad, tmp / "x.npy", "cpu")


def test_auto_projection_dimension_and_ridge_are_chosen_on_held_out_models(tmp_path):
    """trak.proj_dim/lam: auto -- features at the largest k of the grid, (k, λ) chosen by LDS on a
    share of the held-out models, LDS of every method reported on the others; the factored
    projector runs the same lineage with a fixed k."""
    import json

    spec = {**TINY_CNN, "attack": {"kind": "none"}, "subsets": {"num_models": 16, "num_heldout": 10},
            "trak": {"num_models": 4, "proj_dim": "auto", "lam": "auto", "proj_dim_grid": [16, 64],
                     "lam_grid": [0.01, 1.0], "select_fraction": 0.4, "top_k": 5},
            "detector": {"restarts": 8, "retrain": False}}
    result, checks, home = run(tmp_path, "auto", spec)
    assert result.success
    chosen = json.loads((home / "artifacts" / "auto" / "attribution_scores" / "selection.json").read_text())
    assert len(chosen["grid"]) == 4 and (chosen["proj_dim"], chosen["lam"]) in {(16, 0.01), (16, 1.0), (64, 0.01),
                                                                                 (64, 1.0)}
    assert len(chosen["select_models"]) == 4 and len(chosen["eval_models"]) == 6
    assert not set(chosen["select_models"]) & set(chosen["eval_models"])
    assert np.load(home / "artifacts" / "auto" / "gradient_features" / "train.npy", mmap_mode="r").shape[2] == 64
    assert np.load(home / "artifacts" / "auto" / "attribution_scores" / "train_features.npy",
                   mmap_mode="r").shape[2] == chosen["proj_dim"]
    assert q(home, "SELECT DISTINCT n_heldout FROM lds") == [(6,)]
    fact = {**spec, "trak": {"num_models": 4, "proj_dim": 64, "projector": "factored", "top_k": 5}}
    result, _, home = run(tmp_path, "factored", fact, home="home2")
    assert result.success
    assert q(home, "SELECT count(DISTINCT method) FROM lds") == [(4,)]


_QUERIES: dict = {}


def _scored_queries(tiny, tmp_path_factory):
    """Five of tiny's own test images as PNG query files (four labelled by their class subfolder,
    one not), scored through ``./provenance score`` (once per module)."""
    if "out" in _QUERIES:
        return _QUERIES["out"]
    from PIL import Image

    import os
    import subprocess
    import sys

    tmp, _, home = tiny
    art = home / "artifacts" / "tiny" / "training_set"
    images, labels = np.load(art / "test_images.npy"), np.load(art / "test_labels.npy")
    folder = tmp_path_factory.mktemp("queries")
    for i in range(5):
        dest = folder / (str(labels[i]) if i < 4 else "") / f"q{i}.png"
        dest.parent.mkdir(parents=True, exist_ok=True)
        img = images[i][..., 0] if images.shape[-1] == 1 else images[i]
        Image.fromarray(img).save(dest)
    env = {**os.environ, "PROVENANCE_HOME": str(home), "PROVENANCE_EXPERIMENTS": str(tmp / "experiments")}
    root = Path(__file__).resolve().parents[1]
    before = q(home, "SELECT count(*), sum(score) FROM attributions")
    out = subprocess.run([sys.executable, "cli.py", "score", "tiny", str(folder), "--top", "3"], cwd=root, env=env,
                         capture_output=True, text=True)
    _QUERIES["out"] = (out, folder, before, labels[:5])
    return _QUERIES["out"]


def test_new_queries_are_scored_without_retraining(tiny, tmp_path_factory):
    """A query equal to a test example gets that example's TRAK scores (same features, same stored
    training features); the batch lands in the warehouse and earlier rows are untouched."""
    from kernels.npyio import NpyFile

    out, folder, before, labels = _scored_queries(tiny, tmp_path_factory)
    _, _, home = tiny
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tiny: scored 5 queries" in out.stdout and "q4.png  [" in out.stdout and "predicted" in out.stdout
    assert q(home, "SELECT count(*), sum(score) FROM attributions") == before          # untouched
    rows = q(home, "SELECT query_id, label, label_source, batch FROM queries ORDER BY query_index")
    assert [r[0] for r in rows] == sorted(f"{labels[i]}/q{i}.png" for i in range(4)) + ["q4.png"]
    test_index = [int(r[0].split("/q")[-1].split("q")[-1].split(".")[0]) for r in rows]   # which test image
    assert [r[1] for r in rows[:4]] == [int(labels[i]) for i in test_index[:4]]
    assert [r[2] for r in rows] == ["given"] * 4 + ["predicted"]
    batch = rows[0][3]
    with NpyFile(home / "artifacts" / "tiny" / "queries" / batch / "trak_scores.npy") as f, \
            NpyFile(home / "artifacts" / "tiny" / "attribution_scores" / "test_x_train.npy") as t:
        got, want = f.read(0, 4), t.read(0, 5)[test_index[:4]]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
    top = q(home, "SELECT query_index, rank, train_index FROM query_attributions WHERE rank = 1 AND method = 'trak' "
                  "ORDER BY query_index")
    assert [r[2] for r in top[:4]] == [int(np.argmax(want[i])) for i in range(4)]
    # the other methods that can score unseen examples give a query its test example's scores too
    for method in ("tracin", "repsim"):
        with NpyFile(home / "artifacts" / "tiny" / "queries" / batch / f"{method}_scores.npy") as f, \
                NpyFile(home / "artifacts" / "tiny" / "baseline_attributions" / method / "test_x_train.npy") as t:
            got, want = f.read(0, 4), t.read(0, 5)[test_index[:4]]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max(), err_msg=method)
    methods = q(home, "SELECT DISTINCT method FROM query_attributions ORDER BY method")
    assert methods == [("repsim",), ("tracin",), ("trak",)]                     # datamodels cannot


def test_a_bad_query_file_is_named(tiny, tmp_path, capsys, monkeypatch):
    tmp, _, home = tiny
    monkeypatch.setenv("PROVENANCE_HOME", str(home))
    monkeypatch.setenv("PROVENANCE_EXPERIMENTS", str(tmp / "experiments"))
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    from cli import main

    assert main(["score", "tiny", str(tmp_path / "broken.png")]) == 2
    assert f"{tmp_path / 'broken.png'}: cannot decode the image" in capsys.readouterr().err
    assert main(["score", "tiny", str(tmp_path / "nothing-here")]) == 2
    assert "no such file or folder" in capsys.readouterr().err


def _documented_tables(level: str = "### ") -> dict[str, dict[str, tuple[str, str]]]:
    """docs/tables.md parsed: {table: {column: (type, meaning)}} from every "### name" section's
    markdown table (a row may list several columns and their types, comma-separated); the studies'
    tables are "#### name" sections (``level="#### "``)."""
    import re

    doc = (Path(__file__).resolve().parents[1] / "docs" / "tables.md").read_text()
    out: dict = {}
    for section in re.split(rf"^{level}", doc, flags=re.M)[1:]:
        section = re.split(r"^#{1,4} ", section, flags=re.M)[0]      # up to the next heading
        name, body = section.split("\n", 1)
        cols = {"experiment": ("VARCHAR", "")}
        for line in body.splitlines():
            cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
            if len(cells) != 3 or cells[0] in ("column", "---") or set(cells[0]) <= {"-"}:
                continue
            names, types = [c.strip() for c in cells[0].split(",")], [t.strip() for t in cells[1].split(",")]
            types = types * len(names) if len(types) == 1 else types
            assert len(types) == len(names), line
            cols.update({n: (t, cells[2]) for n, t in zip(names, types)})
        out[name.strip()] = cols
    return out


def test_tables_doc_matches_the_warehouse(tiny, tmp_path_factory):
    """Every table and column of docs/tables.md against the suite's warehouse: the same tables, the
    same columns with the same types; a column whose meaning does not mention NULL holds no NULL;
    a column whose meaning says "one of" holds only the values listed after it."""
    import re

    _, _, home = tiny
    _scored_queries(tiny, tmp_path_factory)          # the query tables are filled by ./provenance score
    doc = _documented_tables()
    tables = {r[0] for r in q(home, "SELECT table_name FROM information_schema.tables")}
    assert tables == set(doc), f"documented but missing: {set(doc) - tables}; undocumented: {tables - set(doc)}"
    for table, cols in doc.items():
        got = {name: typ for name, typ, *_ in q(home, f"DESCRIBE {table}")}
        assert got == {c: t for c, (t, _) in cols.items()}, table
        assert q(home, f"SELECT count(*) FROM {table}")[0][0] > 0, f"{table} is empty in the suite's warehouse"
        for col, (_, meaning) in cols.items():
            if "NULL" not in meaning:
                assert q(home, f"SELECT count(*) FROM {table} WHERE {col} IS NULL") == [(0,)], f"{table}.{col}"
            if "one of" in meaning:
                allowed = set(re.findall(r"`([^`]+)`", meaning.split("one of", 1)[1].split(":")[0]))
                values = {r[0] for r in q(home, f"SELECT DISTINCT {col} FROM {table}")}
                assert values <= allowed, f"{table}.{col}: {values - allowed} not documented"
    # the class names of the labels
    assert q(home, "SELECT label, class_name FROM classes WHERE experiment = 'tiny' ORDER BY label") == \
        [(i, str(i)) for i in range(10)]


def test_a_baseline_detector_that_cannot_run_is_recorded_not_fatal(tiny, tmp_path, monkeypatch):
    """SPECTRE's robust covariance raises on data without variance: the report records the baseline
    as failed (and why) and goes on; the strongest-feature detector's own failure still fails it."""
    import shutil

    import torch

    from ops import detectors
    from ops.backdoor import backdoor_report
    from ops.spec import parse_spec
    from ops.store import ArtifactStore

    _, _, home = tiny
    shutil.copytree(home / "artifacts" / "tiny", tmp_path / "tiny")
    store = ArtifactStore(tmp_path)
    spec = parse_spec({**TINY, "name": "tiny", "detector": {**TINY.get("detector", {}), "retrain": False,
                                                            "methods": ["strongest_feature", "spectre"]}})

    def degenerate(inp):
        raise ValueError("The covariance matrix of the support data is equal to 0")
    monkeypatch.setitem(detectors.DETECTORS, "spectre", degenerate)
    said = []
    out = backdoor_report(spec, store, "tiny", torch.device("cpu"), said.append)
    assert out["failed_detectors"] == {"spectre": "ValueError: The covariance matrix of the support data is equal to 0"}
    summary = {r["method"]: r for r in store.load_table("tiny", "backdoor_report", "summary.parquet").to_dicts()}
    assert summary["spectre"]["flag_rule"].startswith("failed: ValueError") and summary["spectre"]["n_flagged"] == 0
    assert set(store.load_table("tiny", "backdoor_report", "scores.parquet")["method"]) == {"strongest_feature"}
    assert any("spectre: failed on this data" in s for s in said)
    monkeypatch.setitem(detectors.DETECTORS, "strongest_feature", degenerate)
    with pytest.raises(ValueError, match="covariance"):
        backdoor_report(spec, store, "tiny", torch.device("cpu"), said.append)


def test_inbox_sensor_scores_each_new_file_once(tiny, tmp_path_factory):
    """A new file in tiny's inbox -> one run request; the same file on the next tick -> none; a
    file that is not an image -> a skip reason naming it; the requested run scores the file into
    the warehouse without touching the experiment's own rows."""
    from dagster import DagsterInstance, SkipReason, build_sensor_context
    from PIL import Image

    from assets.inbox import inbox_sensor, score_queries_job

    tmp, _, home = tiny
    resources = make_resources(home, tmp / "experiments")
    inbox = home / "artifacts" / "tiny" / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    img = np.load(home / "artifacts" / "tiny" / "training_set" / "test_images.npy")[7]
    Image.fromarray(np.roll(img, 1, axis=0)[..., 0] if img.shape[-1] == 1 else img).save(inbox / "new.png")
    with DagsterInstance.ephemeral() as instance:
        instance.add_dynamic_partitions("experiments", ["tiny"])
        sensor_resources = {k: resources[k] for k in ("experiments", "store")}
        with build_sensor_context(instance=instance, resources=sensor_resources) as ctx:
            first = inbox_sensor(ctx)
        assert len(first.run_requests) == 1
        request = first.run_requests[0]
        assert request.tags["inbox_file"] == "new.png" and request.run_key.startswith("tiny:new.png:")
        with build_sensor_context(instance=instance, resources=sensor_resources, cursor=first.cursor) as ctx:
            again = inbox_sensor(ctx)
        assert not again.run_requests
        (inbox / "notes.png").write_bytes(b"not an image at all")
        with build_sensor_context(instance=instance, resources=sensor_resources, cursor=again.cursor) as ctx:
            bad = inbox_sensor(ctx)
        assert not bad.run_requests and "notes.png" in bad.skip_reason.skip_message \
            and "cannot decode" in bad.skip_reason.skip_message
        (inbox / "notes.png").unlink()
        before = q(home, "SELECT count(*), sum(score) FROM attributions")
        result = score_queries_job.execute_in_process(run_config=request.run_config, resources=resources,
                                                      instance=instance)
        assert result.success
    assert q(home, "SELECT count(*), sum(score) FROM attributions") == before
    assert q(home, "SELECT count(*) FROM queries WHERE query_id = 'new.png'") == [(1,)]


def test_a_run_reads_the_spec_it_was_started_with(tiny):
    """Every asset of a run reads the pinned spec named by its tag, not the file as edited since;
    a run without the tag (launched from the UI) pins the file as its first step reads it."""
    from dagster import AssetSelection, instance_for_test

    from ops.spec import SPEC_TAG, parse_spec, pin_spec

    tmp, _, home = tiny
    spec_file = tmp / "experiments" / "tiny.yaml"
    original = spec_file.read_text()
    pinned = pin_spec(parse_spec({**TINY, "name": "tiny", "description": "as started"}), home / "artifacts")
    try:
        spec_file.write_text(yaml.safe_dump({**TINY, "description": "edited during the run"}))
        with instance_for_test() as instance:
            instance.add_dynamic_partitions("experiments", ["tiny"])
            for tags, want in (({SPEC_TAG: pinned}, "as started"), ({}, "edited during the run")):
                result = materialize([*ALL_ASSETS, *ALL_CHECKS], partition_key="tiny", instance=instance, tags=tags,
                                     selection=AssetSelection.assets("warehouse"),
                                     resources=make_resources(home, tmp / "experiments"))
                assert result.success
                spec_json = q(home, "SELECT spec_json FROM experiments WHERE experiment = 'tiny'")[0][0]
                assert f'"description":"{want}"' in spec_json.replace(": ", ":"), spec_json[:200]
                if not tags:
                    marker = home / "artifacts" / ".pins" / "tiny" / "runs" / result.run_id
                    assert marker.is_file()
    finally:
        spec_file.write_text(original)
