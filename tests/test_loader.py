import numpy as np
import pytest

from kernels.loader import LoaderFile, LoaderFileError, convert, write_loader_file


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


def test_bytes_field_refuses_numbers(tmp_path):
    """A list of ints is not a bytes field (bytes(3) is three zero bytes): refused, not garbled."""
    with pytest.raises(LoaderFileError, match="pass numbers as a NumPy array"):
        write_loader_file(tmp_path / "a.pvl", {"label": [0, 1, 2, 3]})
    p = write_loader_file(tmp_path / "b.pvl", {"id": ["a", b"bc", bytearray(b"d")]})
    assert LoaderFile(p).take_bytes("id", [0, 1, 2]) == [b"a", b"bc", b"d"]


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


def _read_pvl_reference(path):
    """The reference reader printed in docs/formats.md, taken from the docs and run as written."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "formats.md").read_text()
    start = doc.index("```python", doc.index("Reference reader")) + len("```python")
    ns: dict = {}
    exec(doc[start:doc.index("```", start)], ns)
    return ns["read_pvl"](path)


def test_documented_reference_reader_agrees(tmp_path):
    f = _fields(37)
    blobs = [bytes(range(i % 7)) * i for i in range(37)]
    p = write_loader_file(tmp_path / "a.pvl", {**f, "blob": blobs})
    ref = _read_pvl_reference(p)
    fast = LoaderFile(p)
    assert ref.keys() == {*f, "blob"}
    for name in f:
        np.testing.assert_array_equal(ref[name], fast.array(name))
    assert ref["blob"] == blobs == fast.take_bytes("blob", np.arange(37))


def test_variable_size_fields_and_ids(tmp_path):
    ids = [f"ex-{i}" for i in range(20)]
    blobs = [b"x" * (i * 3) for i in range(20)]
    p = write_loader_file(tmp_path / "v.pvl", {"id": ids, "blob": blobs, "label": np.arange(20)})
    r = LoaderFile(p)
    assert r.fields["blob"].kind == "bytes" and r.version == 2
    assert r.take_bytes("blob", [19, 0, 5]) == [blobs[19], blobs[0], blobs[5]]
    np.testing.assert_array_equal(r.index_of(["ex-7", "ex-2"]), [7, 2])
    with pytest.raises(LoaderFileError, match="no example with id 'nope'"):
        r.index_of(["nope"])
    with pytest.raises(LoaderFileError, match="use take_bytes"):
        r.array("blob")
    # corrupting the variable-size data or its offsets is caught
    data = bytearray(p.read_bytes())
    off = r.fields["blob"].offset
    data[off + 10] ^= 1
    (tmp_path / "bad.pvl").write_bytes(bytes(data))
    with pytest.raises(LoaderFileError, match="checksum mismatch in field 'blob'"):
        LoaderFile(tmp_path / "bad.pvl")
    data = bytearray(p.read_bytes())
    data[r.fields["blob"].index_offset + 9] ^= 1
    (tmp_path / "bad2.pvl").write_bytes(bytes(data))
    with pytest.raises(LoaderFileError, match="offsets of 'blob'"):
        LoaderFile(tmp_path / "bad2.pvl")


def test_parallel_convert_of_an_indexable_dataset(tmp_path):
    import io

    from PIL import Image

    class Dataset:   # torchvision-style: (PIL image, label)
        def __len__(self):
            return 300

        def __getitem__(self, i):
            return Image.fromarray(np.full((6, 5, 3), i % 256, np.uint8)), i % 10

    def raw(item):
        img, label = item
        return {"image": np.asarray(img), "label": np.int64(label)}

    def png(item):
        img, label = item
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        return {"image": buf.getvalue(), "label": np.int64(label)}

    r = LoaderFile(convert(Dataset(), tmp_path / "raw.pvl", raw, workers=2, chunk=64))
    assert r.array("image").shape == (300, 6, 5, 3) and (r.array("image")[123] == 123).all()
    np.testing.assert_array_equal(r.array("label"), np.arange(300) % 10)
    e = LoaderFile(convert(Dataset(), tmp_path / "png.pvl", png, workers=2, attrs={"decoded_shape": {"image": [6, 5, 3]}}))
    first = Image.open(io.BytesIO(e.take_bytes("image", [77])[0]))
    assert (np.asarray(first) == 77).all()
