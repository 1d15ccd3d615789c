"""Sources and their digests (ops/versions.py), pinned specs (ops/spec.py), and through the command
line: a spec edit makes exactly the assets it affects stale, ``run --stale`` runs only those, and
``delete`` removes an experiment with its artifacts, rows and partition."""
import os
import subprocess
import sys
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from ops.spec import Spec, SpecError, load_pinned, load_spec_file, parse_spec, pin_for_run, pin_spec
from ops.versions import READERS, SECTIONS, FileDigests, section_digests, source_digest, versions

ROOT = Path(__file__).resolve().parents[1]


def test_sections_cover_every_spec_field_once():
    covered = [f for fields in SECTIONS.values() for f in fields]
    assert sorted(covered) == sorted(set(Spec.model_fields) - {"name"})     # a new field must be placed
    assert len(covered) == len(set(covered))
    assert set(READERS) == {"dataset_source"} | {f"spec/{s}" for s in SECTIONS}


def test_an_edit_changes_only_its_sections_digest():
    base = parse_spec({"name": "x", "seed": 1})
    before = section_digests(base)
    for edit, section in [({"detector": {"restarts": 3}}, "detector"), ({"seed": 2}, "dataset"),
                          ({"trak": {"proj_dim": 64}}, "trak"), ({"model": {"hidden": 7}}, "training"),
                          ({"description": "hello"}, "other"), ({"attack": {"kind": "badnets", "poison_count": 3}},
                                                               "attack")]:
        after = section_digests(parse_spec({"name": "x", "seed": 1, **edit}))
        assert {k for k in before if before[k] != after[k]} == {f"spec/{section}"}, edit


def _parquet(path, n, seed=0):
    from io import BytesIO

    from PIL import Image

    rng = np.random.default_rng(seed)
    blobs = []
    for _ in range(n):
        buf = BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8)).save(buf, format="PNG")
        blobs.append(buf.getvalue())
    pq.write_table(pa.table({"image": blobs, "label": [i % 2 for i in range(n)]}), path)


def test_the_source_digest_follows_content_not_timestamps(tmp_path):
    data = tmp_path / "d.parquet"
    _parquet(data, 20)
    ds = parse_spec({"name": "x", "dataset": {"source": "parquet", "path": str(data)}}).dataset
    cache = tmp_path / "cache.json"
    first = source_digest(ds, cache)
    assert cache.exists()
    st = os.stat(data)
    os.utime(data, ns=(st.st_atime_ns, st.st_mtime_ns + 5 * 10**9))      # touched: same content
    assert source_digest(ds, cache) == first
    _parquet(data, 21)                                                    # a new row
    assert source_digest(ds, cache) != first
    _parquet(data, 20)                                                    # the same rows again
    assert source_digest(ds, cache) == first

    # an image folder: a new file, and a file moved to another class, change it
    root = tmp_path / "imgs"
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        (root / c / "1.png").write_bytes(c.encode() * 10)
    ds = parse_spec({"name": "x", "dataset": {"source": "image_folder", "path": str(root)}}).dataset
    d0 = source_digest(ds)
    (root / "a" / "2.png").write_bytes(b"zz")
    d1 = source_digest(ds)
    os.replace(root / "a" / "2.png", root / "b" / "2.png")
    d2 = source_digest(ds)
    (root / "b" / "notes.txt").write_text("not an image")                  # not part of the dataset
    assert len({d0, d1, d2}) == 3 and source_digest(ds) == d2


def test_the_file_digest_cache_rehashes_a_changed_file_and_survives_damage(tmp_path):
    f = tmp_path / "f.bin"
    f.write_bytes(b"one")
    cache = tmp_path / "c.json"
    d = FileDigests(cache)
    a = d(f)
    d.save()
    f.write_bytes(b"two!")                 # another size: another key
    assert FileDigests(cache)(f) != a
    cache.write_text("{not json")
    assert FileDigests(cache)(f) == FileDigests(None)(f)


def test_pinned_specs_round_trip_and_a_run_keeps_its_first_read(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "p.yaml").write_text(yaml.safe_dump({"seed": 4, "detector": {"restarts": 5}}))
    spec = load_spec_file(exp / "p.yaml")
    digest = pin_spec(spec, tmp_path / "pins")
    assert load_pinned("p", digest, tmp_path / "pins") == spec
    assert pin_spec(spec, tmp_path / "pins") == digest                     # idempotent

    first = pin_for_run(exp / "p.yaml", "p", "run-1", tmp_path / "pins")
    (exp / "p.yaml").write_text(yaml.safe_dump({"seed": 4, "detector": {"restarts": 9}}))   # edited mid-run
    assert pin_for_run(exp / "p.yaml", "p", "run-1", tmp_path / "pins") == first
    assert first.detector.restarts == 5
    assert pin_for_run(exp / "p.yaml", "p", "run-2", tmp_path / "pins").detector.restarts == 9

    path = tmp_path / "pins" / ".pins" / "p" / f"{digest}.json"
    path.write_text(path.read_text().replace('"seed": 4', '"seed": 5'))
    with pytest.raises(SpecError, match="does not match its digest"):
        load_pinned("p", digest, tmp_path / "pins")
    with pytest.raises(SpecError, match="is missing"):
        load_pinned("p", "0" * 16, tmp_path / "pins")


SMALL = {
    "seed": 2,
    "dataset": {"source": "digits", "limit_train": 240, "limit_test": 50},
    "attack": {"kind": "badnets", "target_class": 1, "poison_count": 12, "patch_size": 3},
    "model": {"arch": "mlp", "hidden": 16},
    "training": {"epochs": 5, "batch_size": 32},
    "subsets": {"num_models": 14, "num_heldout": 6},
    "trak": {"num_models": 3, "proj_dim": 16, "top_k": 3},
    "datamodels": {"n_lambdas": 3, "tol": 1e-4},
    "detector": {"restarts": 6},
    "lds": {"min_heldout": 5, "bootstrap": 50},
}


def test_cli_stale_lists_what_an_edit_affects_run_stale_runs_it_and_delete_removes_it(tmp_path):
    exps, home = tmp_path / "experiments", tmp_path / "home"
    exps.mkdir()
    spec_file = exps / "st.yaml"
    spec_file.write_text(yaml.safe_dump(SMALL))
    env = {**os.environ, "PROVENANCE_HOME": str(home), "PROVENANCE_EXPERIMENTS": str(exps),
           "PROVENANCE_DEVICE": "cpu"}

    def cli(*args):
        return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, env=env, capture_output=True, text=True)

    assert "stale or missing: " in cli("run", "st", "--stale", "--log-level", "WARNING").stderr   # all missing
    out = cli("stale", "st")
    assert out.returncode == 0 and "every asset is up to date" in out.stdout, out.stdout + out.stderr

    spec_file.write_text(yaml.safe_dump({**SMALL, "detector": {"restarts": 4}}))
    out = cli("stale", "st")
    assert "changed since last observed: spec/detector" in out.stdout
    listed = [line.split()[0] for line in out.stdout.splitlines()[1:]]
    assert listed == ["backdoor_report"], out.stdout                       # the models are not stale

    models = {p: p.stat().st_mtime_ns for p in (home / "artifacts" / "st" / "checkpoints").rglob("*.safetensors")}
    out = cli("run", "st", "--stale", "--log-level", "WARNING")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "stale or missing: backdoor_report" in out.stderr
    assert all(p.stat().st_mtime_ns == t for p, t in models.items())
    assert "every asset is up to date" in cli("stale", "st").stdout
    assert "nothing is stale" in cli("run", "st", "--stale").stdout

    # delete: refused while the spec exists, a dry run without --yes, then everything goes
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        assert conn.execute("SELECT count(*) FROM attributions WHERE experiment = 'st'").fetchone()[0] > 0
    out = cli("delete", "st")
    assert out.returncode == 2 and "still exists" in out.stderr
    out = cli("delete", "st", "--spec")
    assert out.returncode == 1 and "pass --yes" in out.stderr and (home / "artifacts" / "st").exists()
    out = cli("delete", "st", "--spec", "--yes")
    assert out.returncode == 0, out.stderr
    assert not (home / "artifacts" / "st").exists() and not spec_file.exists()
    assert not (home / "artifacts" / ".pins" / "st").exists()
    with duckdb.connect(str(home / "warehouse.duckdb"), read_only=True) as conn:
        tables = [r[0] for r in conn.execute("SELECT table_name FROM information_schema.tables").fetchall()]
        assert all(conn.execute(f"SELECT count(*) FROM {t} WHERE experiment = 'st'").fetchone()[0] == 0
                   for t in tables)
    from dagster import DagsterInstance

    with DagsterInstance.from_config(str(home / "dagster")) as instance:
        assert not instance.has_dynamic_partition("experiments", "st")
    out = cli("delete", "st", "--yes")
    assert out.returncode == 2 and "no experiment 'st'" in out.stderr


def test_the_observe_job_records_the_same_digests_as_the_sensor(tmp_path):
    """What the UI's observation (observe_sources_job, or "Observe" on a source) records is
    ops.versions' digests: the same data versions the sensor and ./provenance run record."""
    from dagster import Definitions, instance_for_test

    from assets import ALL_ASSETS, ALL_CHECKS, observe_sources_job
    from assets.sources import recorded_versions
    from definitions import make_resources

    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "o.yaml").write_text(yaml.safe_dump({"seed": 5, "detector": {"restarts": 3}}))
    defs = Definitions(assets=ALL_ASSETS, asset_checks=ALL_CHECKS, jobs=[observe_sources_job],
                       resources=make_resources(tmp_path / "home", tmp_path / "exp"))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("experiments", ["o"])
        result = defs.resolve_job_def("observe_sources_job").execute_in_process(partition_key="o", instance=instance)
        assert result.success
        assert recorded_versions(instance, "o") == versions(load_spec_file(tmp_path / "exp" / "o.yaml"))


def test_a_section_added_to_the_schema_changes_no_digest(monkeypatch):
    """A run pinned before a new optional section (or a new field with a default) was added keeps
    its pin: the digest covers what the spec says, not the schema's defaults."""
    from ops import spec as S

    spec = S.parse_spec({"name": "d", "seed": 3, "training": {"epochs": 2}})
    before = spec.digest()
    explicit = S.parse_spec({"name": "d", "seed": 3, "training": {"epochs": 2, "batch_size": spec.training.batch_size}})
    assert explicit.digest() == before                      # defaults spelled out: the same spec
    assert S.parse_spec({"name": "d", "seed": 4, "training": {"epochs": 2}}).digest() != before
    fields = dict(S.Spec.model_fields)
    from typing import Optional

    from pydantic import create_model

    Wider = create_model("Wider", __base__=S.Spec, future_study=(Optional[dict], None))
    assert Wider(**spec.model_dump()).digest() == before
    assert set(fields) == set(S.Spec.model_fields)


def test_a_stale_pin_under_the_same_digest_is_rewritten(tmp_path):
    """A pin written in an older format (or damaged) under a digest is replaced when the spec is
    pinned again, so the new run finds a pin that matches its digest."""
    spec = parse_spec({"name": "p", "seed": 2})
    digest = pin_spec(spec, tmp_path / "pins")
    path = tmp_path / "pins" / ".pins" / "p" / f"{digest}.json"
    path.write_text(parse_spec({"name": "p", "seed": 5}).model_dump_json())
    with pytest.raises(SpecError, match="does not match its digest"):
        load_pinned("p", digest, tmp_path / "pins")
    assert pin_spec(spec, tmp_path / "pins") == digest
    assert load_pinned("p", digest, tmp_path / "pins") == spec
