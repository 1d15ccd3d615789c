"""The streaming stacker (kernels/stacked.py) against torch.stack + safetensors' own writer, and
collect_models refusing model files that are not the model of their key."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kernels.stacked import StackError, write_stacked, write_stacked_reference


def _sources(tmp_path, m, seed=0):
    g = torch.Generator().manual_seed(seed)
    paths = []
    for i in range(m):
        t = {"w": torch.randn(3, 5, generator=g), "half": torch.randn(7, generator=g).half(),
             "bf": torch.randn(2, 2, generator=g).bfloat16(), "count": torch.tensor(i, dtype=torch.int64),
             "flags": torch.rand(4, generator=g) > 0.5, "empty": torch.zeros(0, 3)}
        p = tmp_path / f"m{i}.safetensors"
        save_file(t, str(p), metadata={"i": str(i)})
        paths.append(p)
    return paths


def _load(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.mark.parametrize("m", [1, 2, 5])
def test_stacked_file_equals_the_in_memory_stack(tmp_path, m):
    paths = _sources(tmp_path, m, seed=m)
    layout = write_stacked(paths, tmp_path / "fast.safetensors", {"models": m, "arch": "x"})
    write_stacked_reference(paths, tmp_path / "ref.safetensors", {"models": m, "arch": "x"})
    fast, fmeta = _load(tmp_path / "fast.safetensors")
    ref, rmeta = _load(tmp_path / "ref.safetensors")
    assert fmeta == rmeta == {"models": str(m), "arch": "x"}
    assert set(fast) == set(ref) == set(layout)
    for k in ref:
        assert fast[k].dtype == ref[k].dtype and fast[k].shape == ref[k].shape, k
        assert torch.equal(fast[k], ref[k]), k
    assert fast["count"].tolist() == list(range(m))


def test_keys_and_a_callback_per_source(tmp_path):
    paths = _sources(tmp_path, 3)
    seen = []
    write_stacked(paths, tmp_path / "w.safetensors", keys=["w"], on_source=lambda i, f: seen.append(
        (i, int(f.get_tensor("count")))))
    out, _ = _load(tmp_path / "w.safetensors")
    assert set(out) == {"w"} and out["w"].shape == (3, 3, 5) and seen == [(0, 0), (1, 1), (2, 2)]


def test_a_source_of_another_layout_is_named(tmp_path):
    paths = _sources(tmp_path, 3)
    save_file({**_load(paths[1])[0], "w": torch.zeros(5, 3)}, str(paths[1]))
    with pytest.raises(StackError, match=r"m1.safetensors: tensor 'w' is F32 \[5, 3\], the other models' is F32 \[3, 5\]"):
        write_stacked(paths, tmp_path / "out.safetensors")
    save_file({k: v for k, v in _load(paths[0])[0].items() if k != "half"}, str(paths[1]))
    with pytest.raises(StackError, match="m1.safetensors: tensor 'half' is missing"):
        write_stacked(paths, tmp_path / "out.safetensors")
    paths[2].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(StackError, match="m2.safetensors: not a readable safetensors file"):
        write_stacked(paths[:1] + paths[2:], tmp_path / "out.safetensors")


TINY = {"name": "st", "seed": 0, "dataset": {"source": "digits", "limit_train": 120, "limit_test": 40},
        "model": {"arch": "mlp", "hidden": 8}, "training": {"epochs": 1, "batch_size": 32},
        "subsets": {"num_models": 3, "num_heldout": 2}, "trak": {"num_models": 2, "proj_dim": 16}}


def _trained(tmp_path, spec_dict):
    from ops import data as D
    from ops import training as T
    from ops.spec import parse_spec
    from ops.store import ArtifactStore

    spec, store = parse_spec(spec_dict), ArtifactStore(tmp_path)
    for stage in (D.raw_dataset, D.training_set, D.loader_files, D.subset_masks):
        stage(spec, store, "st")
    for jobs in T.plan_shards(spec, store, "st", lambda s: None):
        T.train_shard(spec, store, "st", jobs, torch.device("cpu"), lambda s: None)
    return spec, store


def test_collect_streams_the_models_and_bad_files_are_named_and_trained_again(tmp_path):
    """A model file copied under another key, one of another shape and a truncated one: collection
    refuses each, naming the file; planning lists them to train again, saying why; after the
    retraining the experiment collects, and nothing else was retrained."""
    from ops import training as T
    from ops.store import ArtifactError, ArtifactStore

    spec, store = _trained(tmp_path, TINY)
    T.collect_models(spec, store, "st", lambda s: None)
    jobs = T._experiment_jobs(spec, store, "st")
    margins = np.asarray(store.load_npy("st", "model_outputs", "margins_train.npy"))
    for j in jobs:                       # the stacked file and the margins hold each model as stored
        own, _ = store.load_tensors("st", T.CKPT, j["file"])
        member = T.load_member(spec, store, "st", j["model_id"])
        assert all(torch.equal(member[k], own[k]) for k in member)
        assert np.array_equal(margins[j["model_id"]], own["margins_train"].numpy())
    paths = [store.path("st", T.CKPT, j["file"]) for j in jobs]
    paths[0].write_bytes(paths[1].read_bytes())        # right shape, wrong key
    with pytest.raises(ArtifactError, match=rf"{paths[0].name}: its metadata says seed {jobs[1]['seed']}, but "
                                            rf"the file is stored under seed {jobs[0]['seed']}: it is not the model "
                                            r"of this key: re-materialize checkpoints to train it again"):
        T.collect_models(spec, store, "st", lambda s: None)
    tensors, meta = store.load_tensors("st", T.CKPT, jobs[2]["file"])
    key = next(k for k, v in tensors.items() if v.ndim == 2)
    store.save_tensors("st", T.CKPT, jobs[2]["file"], {**tensors, key: torch.zeros(3, 3)}, meta)   # another shape
    paths[3].write_bytes(paths[3].read_bytes()[:-100])                                           # truncated
    with pytest.raises(ArtifactError, match=rf"{paths[0].name}: .* \(and 2 more\)"):
        T.collect_models(spec, store, "st", lambda s: None)
    said = []
    shards = T.plan_shards(spec, store, "st", said.append)
    assert sorted(j["model_id"] for shard in shards for j in shard) == [0, 2, 3]
    assert any(f"{paths[2].name}: tensor '{key}' is [3, 3], the spec's model needs" in s for s in said), said
    assert any(f"{paths[3].name}: unreadable" in s for s in said), said
    # a model of another architecture under this key (metadata and shapes of a wider MLP)
    other, _ = _trained(tmp_path / "other", {**TINY, "model": {"arch": "mlp", "hidden": 16}})
    wide = T._experiment_jobs(other, ArtifactStore(tmp_path / "other"), "st")[4]
    paths[4].write_bytes(ArtifactStore(tmp_path / "other").path("st", T.CKPT, wide["file"]).read_bytes())
    said = []
    shards = T.plan_shards(spec, store, "st", said.append)
    assert sorted(j["model_id"] for shard in shards for j in shard) == [0, 2, 3, 4]
    assert any(f"{paths[4].name}: its metadata says recipe_hash" in s for s in said), said
    untouched = paths[1].stat().st_mtime_ns
    for shard in shards:
        T.train_shard(spec, store, "st", shard, torch.device("cpu"), lambda s: None)
    T.collect_models(spec, store, "st", lambda s: None)
    assert paths[1].stat().st_mtime_ns == untouched and T.plan_shards(spec, store, "st", lambda s: None) == []
