import numpy as np
import pytest

from ops.store import ArtifactError, ArtifactStore


def test_atomic_write_leaves_old_artifact_on_crash(tmp_path):
    store = ArtifactStore(tmp_path)
    store.save_npy("e", "a", "x.npy", np.arange(3))
    with pytest.raises(RuntimeError):
        with store.atomic("e", "a", "x.npy") as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash mid-write")
    np.testing.assert_array_equal(store.load_npy("e", "a", "x.npy"), np.arange(3))
    assert [p.name for p in (tmp_path / "e" / "a").iterdir()] == ["x.npy"]


def test_missing_artifact_names_the_asset(tmp_path):
    with pytest.raises(ArtifactError, match="materialize 'checkpoints' for experiment 'e'"):
        ArtifactStore(tmp_path).load_npy("e", "checkpoints", "m.npy")


def test_tensors_roundtrip_without_pickle(tmp_path):
    import torch

    store = ArtifactStore(tmp_path)
    store.save_tensors("e", "c", "m.safetensors", {"w": torch.ones(2, 3)}, {"arch": "mlp"})
    t, meta = store.load_tensors("e", "c", "m.safetensors")
    assert meta == {"arch": "mlp"} and torch.equal(t["w"], torch.ones(2, 3))


def test_open_npy_is_atomic(tmp_path):
    store = ArtifactStore(tmp_path)
    with store.open_npy("e", "f", "big.npy", (3, 4), np.float32) as arr:
        arr[1] = 7
    np.testing.assert_array_equal(store.load_npy("e", "f", "big.npy")[1], np.full(4, 7, np.float32))
    with pytest.raises(ValueError):
        with store.open_npy("e", "f", "other.npy", (3, 4), np.float32) as arr:
            raise ValueError("crash while filling")
    assert not store.path("e", "f", "other.npy").exists()
    assert sorted(p.name for p in store.path("e", "f").iterdir()) == ["big.npy"]
