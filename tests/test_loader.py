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
    assert r.fields["blob"].kind == "bytes" and r.version == 3
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


# ---------------------------------------------------------------- property-based: valid files and corruptions
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

_DTYPES = ["?", "i1", "u1", "<i2", ">u2", "<i4", "<u4", ">i8", "<u8", "<f2", ">f4", "<f8", "<c8"]


@st.composite
def loader_contents(draw):
    """{name: fixed array or list of bytes} with one row count, and attrs."""
    n = draw(st.integers(0, 12))
    names = draw(st.lists(st.text(st.characters(codec="utf-8", exclude_characters="#"), min_size=1, max_size=6),
                          min_size=1, max_size=4, unique=True))
    fields = {}
    for name in names:
        if draw(st.booleans()):
            dtype = np.dtype(draw(st.sampled_from(_DTYPES)))
            shape = (n, *draw(st.lists(st.integers(0, 3), max_size=3)))
            fields[name] = draw(hnp.arrays(dtype, shape))
        else:
            fields[name] = draw(st.lists(st.binary(max_size=20), min_size=n, max_size=n))
    attrs = draw(st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=3))
    return fields, attrs


def _read_all(path):
    r = LoaderFile(path)
    out = {}
    for name, info in r.fields.items():
        out[name] = (np.array(r.array(name)) if info.kind == "fixed"
                     else r.take_bytes(name, np.arange(len(r))))
    return out, r.attrs, len(r)


def _same(read, fields, attrs) -> bool:
    got, got_attrs, n = read
    if got_attrs != attrs or set(got) != set(fields):
        return False
    for name, value in fields.items():
        if isinstance(value, np.ndarray):
            g = got[name]
            if g.dtype != value.dtype.newbyteorder("<") or g.shape != value.shape or \
                    g.tobytes() != value.astype(value.dtype.newbyteorder("<")).tobytes():
                return False
        elif got[name] != [bytes(v) for v in value]:
            return False
    return True


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(contents=loader_contents(), how=st.sampled_from(["flip", "overwrite", "truncate", "extend"]),
       where=st.floats(0, 1), bit=st.integers(0, 7), junk=st.binary(min_size=1, max_size=16))
def test_any_corruption_reads_back_exactly_or_raises_the_format_error(tmp_path, contents, how, where, bit, junk):
    fields, attrs = contents
    p = write_loader_file(tmp_path / "f.pvl", fields, attrs)
    assert _same(_read_all(p), fields, attrs)                   # a valid file reads back exactly
    data = bytearray(p.read_bytes())
    at = min(len(data) - 1, int(where * len(data)))
    if how == "flip":
        data[at] ^= 1 << bit
    elif how == "overwrite":
        data[at:at + len(junk)] = junk
    elif how == "truncate":
        data = data[:at]
    else:
        data += junk
    bad = tmp_path / "bad.pvl"
    bad.write_bytes(bytes(data))
    try:
        read = _read_all(bad)
    except LoaderFileError as e:
        assert str(bad) in str(e)
        return
    assert _same(read, fields, attrs), f"{how} at {at} returned other data than was written"


def _rewrite_header(path, edit):
    """Edit the header JSON and recompute its checksum: what a hostile or careless editor does."""
    import json
    import struct
    import zlib

    raw = bytearray(path.read_bytes())
    _, _, hlen, _ = struct.unpack("<8sHII", raw[:18])
    header = json.loads(raw[18:18 + hlen])
    edit(header)
    text = json.dumps(header).encode()
    text = text + b" " * max(0, hlen - len(text))
    if len(text) != hlen:                        # longer: the blocks stay where they are
        raw[10:14] = struct.pack("<I", len(text))
    raw[14:18] = struct.pack("<I", zlib.crc32(text))
    raw[18:18 + hlen] = text
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("edit, match", [
    (lambda h: h["fields"][0].update(dtype="|O"), "dtype '|O'"),
    (lambda h: h["fields"][0].update(dtype=">f4"), "dtype '>f4'"),
    (lambda h: h["fields"][0].update(dtype="<V4"), "dtype '<V4'"),
    (lambda h: h["fields"][0].update(shape=[8, 3, 8]), "checksum mismatch in field 'image'"),
    (lambda h: h["fields"][0].update(shape=[-1, 8, 24]), "a shape entry is -1"),
    (lambda h: h["fields"][0].update(shape=[1] * 20), "at most 16"),
    (lambda h: h["fields"][1].update(name="image"), "field 'image' appears twice"),
    (lambda h: h["fields"][1].update(offset=h["fields"][0]["offset"]), "overlap"),
    (lambda h: h["fields"][1].update(offset=h["fields"][1]["offset"] + 8), "not a multiple of 64"),
    (lambda h: h["fields"][0].update(offset=0), "not a multiple of 64 after the header"),
    (lambda h: h["fields"][0].update(nbytes=True), "nbytes is True"),
    (lambda h: h["fields"][0].update(crc32=2 ** 40), "crc32"),
    (lambda h: h["fields"][0].update(extra=1), "has keys"),
    (lambda h: h.update(num_examples=h["num_examples"] * 2), "declares"),
    (lambda h: h.update(num_examples="50"), "num_examples"),
    (lambda h: h.update(fields={}), "fields is not a non-empty list"),
    (lambda h: h.update(attrs=[1]), "attrs is a list"),
    (lambda h: h["fields"][0].update(kind="pickle"), "unknown kind 'pickle'"),
    (lambda h: h["fields"][3].update(index_nbytes=8), "malformed offsets block"),
])
def test_edited_headers_are_refused_even_with_a_valid_checksum(tmp_path, edit, match):
    p = write_loader_file(tmp_path / "a.pvl", {**_fields(), "id": [f"e{i}" for i in range(50)]})
    _rewrite_header(p, edit)
    with pytest.raises(LoaderFileError, match=match):
        LoaderFile(p)


def test_an_older_version_without_a_header_checksum_is_refused(tmp_path):
    import struct

    p = write_loader_file(tmp_path / "a.pvl", _fields())
    raw = bytearray(p.read_bytes())
    raw[8:10] = struct.pack("<H", 2)
    p.write_bytes(bytes(raw))
    with pytest.raises(LoaderFileError, match="format version 2.*no header checksum"):
        LoaderFile(p)


@pytest.mark.parametrize("edit", [
    lambda h: h["fields"][1].update(dtype="<u8"),              # same itemsize: the bytes read as another type
    lambda h: h["fields"][0].update(shape=[3, 8, 8]),          # same size: the image read in another layout
    lambda h: h["fields"][1].update(name="weight2"),           # renamed
])
def test_a_header_edited_to_reinterpret_the_data_fails_the_field_checksum(tmp_path, edit):
    p = write_loader_file(tmp_path / "a.pvl", _fields())
    _rewrite_header(p, edit)
    with pytest.raises(LoaderFileError, match="checksum mismatch in field"):
        LoaderFile(p)
