import numpy as np
import pytest

from kernels.loader import LoaderFile, LoaderFileError, iterate_batches, write_loader_file


def _fields(n=50):
    rng = np.random.default_rng(0)
    return {"image": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
            "label": rng.integers(0, 10, n).astype(np.int64),
            "weight": rng.standard_normal((n, 4)).astype(np.float32)}


def test_roundtrip_and_random_access(tmp_path):
    f = _fields()
    p = write_loader_file(tmp_path / "a.pvl", f, attrs={"split": "train"})
    r = LoaderFile(p)
    assert len(r) == 50 and r.attrs == {"split": "train"}
    for name, arr in f.items():
        np.testing.assert_array_equal(r.array(name), arr)
    idx = np.array([49, 0, 7, 7])
    np.testing.assert_array_equal(r.take("image", idx), f["image"][idx])
    # every block starts 64-byte aligned
    assert all(info.offset % 64 == 0 for info in r.fields.values())
    assert not list(tmp_path.glob(".*tmp"))


def test_truncated_file_is_refused(tmp_path):
    p = write_loader_file(tmp_path / "a.pvl", _fields())
    data = p.read_bytes()
    p.write_bytes(data[:-300])
    with pytest.raises(LoaderFileError, match="truncated"):
        LoaderFile(p)
    p.write_bytes(data[:10])
    with pytest.raises(LoaderFileError, match="truncated"):
        LoaderFile(p)


def test_corrupted_bytes_fail_the_checksum(tmp_path):
    p = write_loader_file(tmp_path / "a.pvl", _fields())
    r = LoaderFile(p)
    off = r.fields["label"].offset
    del r
    data = bytearray(p.read_bytes())
    data[off + 3] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(LoaderFileError, match="checksum mismatch in field 'label'"):
        LoaderFile(p)


def test_not_a_loader_file(tmp_path):
    p = tmp_path / "x.pvl"
    p.write_bytes(b"hello world, this is not it")
    with pytest.raises(LoaderFileError, match="magic"):
        LoaderFile(p)
    with pytest.raises(LoaderFileError, match="no such"):
        LoaderFile(tmp_path / "missing.pvl")


def test_schema_mismatch_and_index_out_of_range(tmp_path):
    r = LoaderFile(write_loader_file(tmp_path / "a.pvl", _fields()))
    with pytest.raises(LoaderFileError, match="schema mismatch in 'image'"):
        r.check_schema({"image": ("uint8", (32, 32, 3))})
    with pytest.raises(LoaderFileError, match="'mask' is missing"):
        r.check_schema({"mask": ("bool", ())})
    with pytest.raises(LoaderFileError, match="index 50 out of range"):
        r.take("label", np.array([1, 50]))
    with pytest.raises(LoaderFileError, match="no field"):
        r.array("nope")


def test_writer_rejects_ragged_fields(tmp_path):
    with pytest.raises(LoaderFileError, match="rows"):
        write_loader_file(tmp_path / "a.pvl", {"a": np.zeros(3), "b": np.zeros(4)})
    assert not (tmp_path / "a.pvl").exists()


def test_batches_cover_subset_once_and_are_seeded():
    subset = np.arange(0, 100, 3)
    batches = list(iterate_batches(100, 8, indices=subset, seed=1, epoch=0))
    assert sorted(np.concatenate(batches).tolist()) == subset.tolist()
    again = list(iterate_batches(100, 8, indices=subset, seed=1, epoch=0))
    other = list(iterate_batches(100, 8, indices=subset, seed=1, epoch=1))
    assert all((a == b).all() for a, b in zip(batches, again))
    assert any((a != b).any() for a, b in zip(batches, other))
    assert sum(len(b) for b in iterate_batches(100, 8, indices=subset, drop_last=True)) == 32


def _read_pvl_reference(path):
    """The reference reader printed in docs/formats.md, verbatim in behaviour."""
    import json
    import struct
    import zlib

    raw = open(path, "rb").read()
    magic, version, hlen = struct.unpack("<8sHI", raw[:14])
    assert magic == b"PVLOADER" and version == 1
    header = json.loads(raw[14:14 + hlen])
    out = {}
    for f in header["fields"]:
        block = raw[f["offset"]:f["offset"] + f["nbytes"]]
        assert len(block) == f["nbytes"] and zlib.crc32(block) == f["crc32"]
        out[f["name"]] = np.frombuffer(block, np.dtype(f["dtype"])).reshape(header["num_examples"], *f["shape"])
    return out


def test_documented_reference_reader_agrees(tmp_path):
    f = _fields(37)
    p = write_loader_file(tmp_path / "a.pvl", f)
    ref = _read_pvl_reference(p)
    fast = LoaderFile(p)
    assert ref.keys() == f.keys()
    for name in f:
        np.testing.assert_array_equal(ref[name], fast.array(name))
