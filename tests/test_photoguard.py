"""The PhotoGuard study on tiny data: its section's validation, its selection, the assets end to end
into the warehouse (models trained, images immunized within their budgets, edits measured, the
ordering checked), the tables doc, the report's lines, and a user's diffusers checkpoint on disk
immunizing a folder of the user's own images with nothing trained."""
import duckdb
import numpy as np
import pytest
import yaml
from dagster import AssetSelection, instance_for_test, materialize

from assets import ALL_ASSETS, ALL_CHECKS
from definitions import make_resources
from ops.spec import SpecError, parse_spec
from tests.test_robustness import assert_study_tables_documented

# 16x16 images, models of a few thousand parameters, a handful of steps: the plumbing, not the numbers
TINY = {"image_size": 16, "vae_channels": [8, 16], "unet_channels": [16, 32], "vae_steps": 30, "unet_steps": 30,
        "batch_size": 16, "classifier_epochs": 2, "classifier_hidden": 8, "quality_images": 10, "n_images": 3,
        "batch": 3, "encoder": {"iters": 5}, "diffusion": {"iters": 2, "grad_reps": 2, "num_steps": 2},
        "edit": {"num_steps": 4}}
SPEC = {"seed": 3, "dataset": {"source": "digits", "limit_train": 300, "limit_test": 60}, "photoguard": TINY}
DATA = ("raw_dataset", "training_set", "poison_truth", "loader_files")


def _run(tmp, spec: dict, name: str):
    exp_dir = tmp / "experiments"
    exp_dir.mkdir(parents=True, exist_ok=True)
    (exp_dir / f"{name}.yaml").write_text(yaml.safe_dump(spec))
    home = tmp / "home"
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("experiments", [name])
        result = materialize([*ALL_ASSETS, *ALL_CHECKS], partition_key=name, instance=instance,
                             selection=AssetSelection.assets(*DATA) | AssetSelection.groups("photoguard"),
                             resources=make_resources(home, exp_dir))
    return result, home


def _meta(result, asset):
    return next(e for e in result.get_asset_materialization_events()
                if e.asset_key.to_user_string() == asset).materialization.metadata


def test_the_section_is_validated_with_its_keys_named(tmp_path):
    def refused(section, key):
        with pytest.raises(SpecError, match=f"photoguard.{key}"):
            parse_spec({"name": "x", "photoguard": section})

    refused({"image_size": 20}, "image_size")
    refused({"image_size": 8}, "image_size")
    refused({"encoder": {"eps": 0}}, "encoder.eps")
    refused({"diffusion": {"norm": "l1"}}, "diffusion.norm")
    refused({"edit": {"strength": 1.5}}, "edit.strength")
    refused({"condition": -1}, "condition")
    refused({"condition": "cat"}, "condition")
    refused({"n_images": 1}, "n_images")
    refused({"unet_channels": [12]}, "unet_channels")
    refused({"checkpoint": str(tmp_path / "none")}, "checkpoint")
    (tmp_path / "half" / "vae").mkdir(parents=True)
    refused({"checkpoint": str(tmp_path / "half")}, "checkpoint: .* no unet/, scheduler/")
    refused({"images": str(tmp_path / "half")}, "images: .* holds no image")
    refused({"context": "x.npy"}, "context")
    refused({"steps": 3}, "steps: unknown key")
    s = parse_spec({"name": "x", "photoguard": {"image_size": 64, "diffusion": {"norm": "linf"}}}).photoguard
    assert (s.noise_budget, s.diffusion_eps, s.diffusion_step) == (0.06, 0.1, 0.006)
    s = parse_spec({"name": "x", "photoguard": {"image_size": 64}}).photoguard
    assert (s.diffusion_eps, s.diffusion_step) == (2.0, 0.125)       # the paper's l2 budget, scaled from 512 px


def test_only_specs_that_name_the_study_select_it():
    from assets.sources import _graph
    from assets.studies import named, selection_for

    keys = lambda s: {k.to_user_string() for k in selection_for(s).resolve(_graph())}   # noqa: E731
    plain, study = parse_spec({"name": "x"}), parse_spec({"name": "x", "photoguard": {}})
    assert named(study) == ["photoguard"]
    assert keys(study) - keys(plain) == {"photoguard_models", "photoguard_immunize", "photoguard_edits",
                                         "photoguard_warehouse"}


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("photoguard"), SPEC, "pg")


def test_the_study_runs_into_the_warehouse(study):
    result, home = study
    assert result.success
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        models = {(m, k): (src, steps, v, c) for m, src, steps, k, v, c in conn.execute(
            "SELECT model, source, train_steps, metric, value, chance FROM photoguard_models").fetchall()}
        images = conn.execute("SELECT method, count(*), count(DISTINCT image), bool_and(label = condition), "
                              "max(linf), count(seconds), count(psnr), count(agrees) FROM photoguard_images "
                              "GROUP BY method").fetchall()
        metrics = {r[0]: r[1:] for r in conn.execute(
            "SELECT method, images, psnr, ssim, fid, agreement, seconds_per_image FROM photoguard_metrics").fetchall()}
        reach = {r[0]: r[1:] for r in conn.execute(
            "SELECT method, encoder_reach, diffusion_drop FROM photoguard_metrics").fetchall()}
        objectives = conn.execute("SELECT method, count(encoder_objective), count(diffusion_objective), "
                                  "min(encoder_objective) FROM photoguard_images GROUP BY method").fetchall()
        ordering = conn.execute("SELECT metric, direction, held FROM photoguard_ordering ORDER BY metric").fetchall()
    assert set(models) == {("vae", "reconstruction_psnr"), ("unet", "generation_agreement"),
                           ("unet", "inpaint_agreement"), ("classifier", "test_accuracy")}
    assert models["vae", "reconstruction_psnr"][:2] == ("trained", 30) and models["vae", "reconstruction_psnr"][2] > 5
    assert models["unet", "generation_agreement"][3] == pytest.approx(0.1)          # 10 digit classes
    assert models["classifier", "test_accuracy"][2] > 0.2
    by = {r[0]: r[1:] for r in images}
    assert set(by) == {"clean", "reseed", "swap", "noise", "encoder", "diffusion"}
    for method, (n, distinct, own, linf, secs, psnr, agrees) in by.items():
        assert (n, distinct, own, agrees) == (3, 3, True, 3)                 # conditioned on each image's class
        assert secs == (3 if method in ("noise", "encoder", "diffusion") else 0)
        assert psnr == (0 if method == "clean" else 3)
    assert by["clean"][3] == 0 and by["reseed"][3] == 0 and 0 < by["encoder"][3] <= 0.06 + 1e-6
    assert by["swap"][3] > 0.5                                           # another image's kept region
    # each attack's own objective, on the same draws for every version: measured for the clean
    # image and the immunizations only; the clean image is the zero of reach and drop
    assert {m: tuple(c[:2]) for m, *c in objectives} == {"clean": (3, 3), "reseed": (0, 0), "swap": (0, 0), "noise": (3, 3),
                                                   "encoder": (3, 3), "diffusion": (3, 3)}
    assert all(c[2] > 0 for m, *c in objectives if m != "reseed" and m != "swap")
    assert reach["clean"] == (0.0, 0.0) and reach["reseed"] == (None, None) and reach["swap"] == (None, None)
    assert reach["encoder"][0] > max(reach["noise"][0], 0)               # the encoder attack moves its latent most
    assert metrics["clean"][1] is None and metrics["clean"][3] is None
    for m in ("noise", "encoder", "diffusion"):
        assert metrics[m][0] == 3 and metrics[m][1] > 0 and 0 < metrics[m][2] <= 1 and metrics[m][3] >= 0
    assert [r[:2] for r in ordering] == [("agreement", "lower"), ("fid", "higher"), ("psnr", "lower"),
                                         ("ssim", "lower")]
    meta = _meta(result, "photoguard_edits")
    assert "data:image/png;base64," in meta["grid"].value
    assert "the paper's ordering" in meta["ordering"].value["summary"] and "held" in meta["ordering_table"].value
    assert "data:image/png;base64," in _meta(result, "photoguard_models")["training"].value


def test_immunized_images_keep_their_budgets_and_the_mask(study):
    from ops.store import ArtifactStore

    _, home = study
    store = ArtifactStore(home / "artifacts")
    load = lambda name: np.asarray(store.load_npy("pg", "photoguard_immunize", f"{name}.npy"))   # noqa: E731
    x, masks = load("clean"), load("masks")
    assert x.shape == (3, 3, 16, 16) and masks.shape == (3, 1, 16, 16) and masks.mean() == pytest.approx(0.25)
    for name, norm, eps in (("noise", "linf", 0.06), ("encoder", "linf", 0.06), ("diffusion", "l2", 0.5)):
        d = load(name) - x
        size = np.abs(d).reshape(3, -1).max(1) if norm == "linf" else np.sqrt((d.reshape(3, -1) ** 2).sum(1))
        assert (size <= eps + 1e-5).all() and (size > 0).all(), name
        assert np.abs(d * masks).max() == 0, name                # the repainted region is left alone
    assert (load("encoder").min(), load("encoder").max()) >= (-1, -1) and load("encoder").max() <= 1


def test_the_study_tables_doc_matches_the_warehouse(study):
    from ops.photoguard import TABLES

    _, home = study
    assert set(TABLES) == {"photoguard_models", "photoguard_images", "photoguard_metrics", "photoguard_ordering"}
    assert_study_tables_documented(home, TABLES)


def test_the_report_shows_the_study(study):
    from ops.report import _photoguard_lines

    _, home = study
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        lines = _photoguard_lines(conn, "pg")
        assert _photoguard_lines(conn, "other") == []
    assert lines[0].startswith("  photoguard (3 images") and len(lines) == 1 + 6 + 3
    assert [ln.split()[0] for ln in lines[1:7]] == ["clean", "reseed", "swap", "noise", "encoder", "diffusion"]
    assert "noise < encoder < diffusion" in lines[-3] and "own objectives" in lines[-2]
    assert "VAE reconstruction" in lines[-1]


def test_a_checkpoint_on_disk_immunizes_the_users_images(tmp_path):
    """A diffusers inpainting folder laid out like Stable Diffusion's (a text-conditioned UNet,
    random weights) and a folder of PNGs of any size: nothing is trained, the user's images are
    immunized and edited, class measures are left out (no labels, no classifier)."""
    from PIL import Image

    from kernels import photoguard as pg
    from ops.store import ArtifactStore

    small = dict(block_out_channels=(8, 16), norm_num_groups=8)
    pg.save_inpainting_dir(tmp_path / "sd", pg.tiny_vae(16, **small, seed=1),
                           pg.tiny_inpaint_unet(8, conditioning="text", cross_attention_dim=16, seed=2, **small),
                           pg.tiny_scheduler())
    photos = tmp_path / "photos"
    photos.mkdir()
    rng = np.random.default_rng(0)
    for name, size in (("b.png", (40, 24)), ("a.png", (16, 16)), ("c.jpg", (20, 20))):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(photos / name)
    (photos / "notes.txt").write_text("not an image")
    section = {k: v for k, v in TINY.items() if k not in ("vae_steps", "unet_steps", "classifier_epochs")}
    spec = {"seed": 1, "dataset": {"source": "digits", "limit_train": 100, "limit_test": 20},
            "photoguard": {**section, "checkpoint": str(tmp_path / "sd"), "images": str(photos), "n_images": 8}}
    result, home = _run(tmp_path, spec, "mine")
    assert result.success
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        models = conn.execute("SELECT model, source, train_steps, seconds, metric, value FROM photoguard_models "
                              "ORDER BY model, metric").fetchall()
        names = conn.execute("SELECT DISTINCT image, name, label, condition, predicted FROM photoguard_images "
                             "ORDER BY image").fetchall()
        metrics = {r[0]: r[1:] for r in conn.execute(
            "SELECT method, psnr, fid, agreement FROM photoguard_metrics").fetchall()}
    assert [m[:4] for m in models] == [("unet", "checkpoint", 0, 0.0)] * 2 + [("vae", "checkpoint", 0, 0.0)]
    assert [m[5] is None for m in models] == [True, True, False]          # no classifier: no agreement
    assert names == [(0, "a.png", None, None, None), (1, "b.png", None, None, None), (2, "c.jpg", None, None, None)]
    assert metrics["diffusion"][0] > 0 and metrics["diffusion"][1] is None and metrics["diffusion"][2] is None
    store = ArtifactStore(home / "artifacts")
    assert not store.path("mine", "photoguard_models", "model").exists()                 # nothing trained
    assert not store.path("mine", "photoguard_models", "classifier.safetensors").exists()
    x = np.asarray(store.load_npy("mine", "photoguard_immunize", "clean.npy"))
    enc = np.asarray(store.load_npy("mine", "photoguard_immunize", "encoder.npy"))
    assert x.shape == (3, 3, 16, 16) and 0 < np.abs(enc - x).max() <= 0.06 + 1e-6
    edits = _meta(result, "photoguard_edits")
    assert "data:image/png;base64," in edits["grid"].value


def test_a_warehouse_from_before_the_objective_columns_takes_the_new_rows(study, tmp_path):
    """photoguard_metrics as an earlier version created it (no encoder_reach, diffusion_drop): the
    study's load adds the columns instead of failing, and the report reads the old rows."""
    from ops.photoguard import EDITS, MODELS, TABLES
    from ops.report import _photoguard_lines
    from ops.store import ArtifactStore
    from ops.warehouse import load_study_tables

    _, home = study
    store = ArtifactStore(home / "artifacts")
    frames = {name: store.load_table("pg", MODELS if name == "photoguard_models" else EDITS, f"{name}.parquet")
              for name in TABLES}
    old = TABLES["photoguard_metrics"].replace(", encoder_reach DOUBLE,\n        diffusion_drop DOUBLE", "")
    assert "encoder_reach" not in old and old != TABLES["photoguard_metrics"]
    with duckdb.connect(str(tmp_path / "w.duckdb")) as conn:
        conn.execute(f"CREATE TABLE photoguard_metrics ({old})")
        conn.execute(f"CREATE TABLE photoguard_ordering ({TABLES['photoguard_ordering']})")
        conn.execute("INSERT INTO photoguard_metrics (experiment, method, images, psnr) VALUES ('earlier', 'noise', 2, 40)")
        assert _photoguard_lines(conn, "earlier")[1].split()[:3] == ["noise", "PSNR", "40.00"]
        counts = load_study_tables(conn, "pg", TABLES, frames)
        assert counts["photoguard_metrics"] == 6
        got = dict(conn.execute("SELECT method, encoder_reach FROM photoguard_metrics WHERE experiment = 'pg'").fetchall())
        assert got["clean"] == 0.0 and got["encoder"] > 0
        assert conn.execute("SELECT encoder_reach FROM photoguard_metrics WHERE experiment = 'earlier'").fetchall() == [(None,)]
        assert any("own objectives" in ln for ln in _photoguard_lines(conn, "pg"))
