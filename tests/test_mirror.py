"""The artifact store on shared storage (ops/mirror.py, ``PROVENANCE_STORE_URL``): files mirrored
by relative path, only changes moved, and two "machines" (two local working copies) running
different stages of one experiment against one shared store."""
import numpy as np
import pytest
import yaml
from dagster import AssetSelection, instance_for_test, materialize

from assets import ALL_ASSETS, ALL_CHECKS
from definitions import make_resources
from ops.mirror import MirrorError, StoreMirror
from ops.store import ArtifactStore


def _tree(root, files):
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)


def test_push_pull_move_only_what_changed(tmp_path):
    url = (tmp_path / "shared").as_uri()
    a, b = tmp_path / "a", tmp_path / "b"
    _tree(a, {"e/raw/x.npy": b"1" * 10, "e/raw/y.json": b"{}", "e/raw/.x.npy.123.tmp": b"partial",
              "other/raw/z": b"z"})
    ma, mb = StoreMirror(url, a), StoreMirror(url, b)
    assert ma.push("e/") == 2                                   # the temporary file stays home
    assert not (tmp_path / "shared" / "other").exists()         # only the prefix
    assert mb.pull("e/") == 2 and (b / "e/raw/x.npy").read_bytes() == b"1" * 10
    assert mb.pull("e/") == 0                                   # nothing changed: nothing moved
    before = ma.snapshot("e/")
    (a / "e/raw/x.npy").write_bytes(b"2" * 12)
    assert ma.push("e/", before) == 1                           # only the changed file
    assert mb.pull("e/") == 1 and (b / "e/raw/x.npy").read_bytes() == b"2" * 12
    assert ma.pull("e/") == 0                                   # its own upload is not downloaded again
    mb.delete("e/")
    assert not (tmp_path / "shared" / "e").exists() and StoreMirror(url, tmp_path / "c").pull("e/") == 0
    with pytest.raises(MirrorError, match="PROVENANCE_STORE_URL=nosuchprotocol://x"):
        StoreMirror("nosuchprotocol://x/y", a)


def test_two_machines_run_one_experiment_through_a_shared_store(tmp_path, monkeypatch):
    """Machine A materializes the data stages; machine B, with an empty working copy, materializes
    the loader files and masks from what A pushed; a third sees all of it."""
    spec = {"seed": 2, "dataset": {"source": "digits", "limit_train": 200, "limit_test": 40},
            "attack": {"kind": "badnets", "target_class": 0, "poison_count": 10, "patch_size": 3}}
    exp = tmp_path / "experiments"
    exp.mkdir()
    (exp / "m.yaml").write_text(yaml.safe_dump(spec))
    shared = tmp_path / "shared"
    monkeypatch.setenv("PROVENANCE_STORE_URL", shared.as_uri())
    with instance_for_test() as instance:
        instance.add_dynamic_partitions("experiments", ["m"])
        first = materialize([*ALL_ASSETS, *ALL_CHECKS], partition_key="m", instance=instance,
                            selection=AssetSelection.assets("raw_dataset", "training_set", "poison_truth"),
                            resources=make_resources(tmp_path / "a", exp))
        assert first.success
        assert (shared / "m" / "training_set" / "train_images.npy").is_file()
        assert not (tmp_path / "b").exists()
        second = materialize([*ALL_ASSETS, *ALL_CHECKS], partition_key="m", instance=instance,
                             selection=AssetSelection.assets("loader_files", "subset_masks"),
                             resources=make_resources(tmp_path / "b", exp))
        assert second.success
    # B read A's training set (pulled), and what B wrote is on the shared store for anyone
    b = ArtifactStore(tmp_path / "b" / "artifacts")
    np.testing.assert_array_equal(b.load_npy("m", "training_set", "train_labels.npy"),
                                  ArtifactStore(tmp_path / "a" / "artifacts").load_npy("m", "training_set",
                                                                                       "train_labels.npy"))
    assert (shared / "m" / "subset_masks" / "masks.npy").is_file()
    c = StoreMirror(shared.as_uri(), tmp_path / "c")
    assert c.pull("m/") >= 5
    assert ArtifactStore(tmp_path / "c").load_table("m", "subset_masks", "masks.parquet").height > 0
