import gzip
import io
import struct

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from ops.sources import SourceError, load_source, train_label_counts
from ops.spec import DatasetSpec


def test_digits_split_is_stratified_and_deterministic():
    ds = DatasetSpec(source="digits", test_fraction=0.2)
    a, b = load_source(ds, 0), load_source(ds, 0)
    np.testing.assert_array_equal(a.is_test, b.is_test)
    assert a.images.shape[1:] == (8, 8, 1) and a.images.dtype == np.uint8
    assert abs(a.is_test.mean() - 0.2) < 0.01
    frac = [a.is_test[a.labels == c].mean() for c in range(10)]
    assert max(frac) - min(frac) < 0.05
    assert not np.array_equal(load_source(ds, 1).is_test, a.is_test)
    assert len(set(a.ids)) == len(a.ids)
    lim = load_source(DatasetSpec(source="digits", limit_train=100, limit_test=30), 0)
    assert (~lim.is_test).sum() == 100 and lim.is_test.sum() == 30


def _idx(path, arr):
    header = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}I", *arr.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + arr.astype(np.uint8).tobytes())


def test_fashion_mnist_idx_files(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _idx(tmp_path / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)))
        _idx(tmp_path / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    raw = load_source(DatasetSpec(source="fashion_mnist", path=str(tmp_path)), 0)
    assert raw.images.shape == (40, 28, 28, 1) and raw.is_test.sum() == 10
    assert raw.ids[0] == "fmnist-train-00000" and raw.ids[-1] == "fmnist-test-00009"
    # a truncated file is an error, not short data
    p = tmp_path / "t10k-labels-idx1-ubyte.gz"
    data = gzip.decompress(p.read_bytes())
    with gzip.open(p, "wb") as f:
        f.write(data[:-3])
    with pytest.raises(SourceError, match="truncated"):
        load_source(DatasetSpec(source="fashion_mnist", path=str(tmp_path)), 0)


def _png(color, size=6):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, format="PNG")
    return buf.getvalue()


def test_image_folder(tmp_path):
    for cls, color in (("cat", (255, 0, 0)), ("dog", (0, 0, 255))):
        (tmp_path / "train" / cls).mkdir(parents=True)
        for i in range(5):
            (tmp_path / "train" / cls / f"{i}.png").write_bytes(_png(color))
    ds = DatasetSpec(source="image_folder", path=str(tmp_path / "train"), test_fraction=0.2)
    raw = load_source(ds, 0)
    assert raw.classes == ["cat", "dog"] and raw.images.shape == (10, 6, 6, 3)
    assert (raw.images[raw.labels == 0][..., 0] == 255).all()
    assert train_label_counts(ds, 0) == {0: 4, 1: 4}
    (tmp_path / "train" / "dog" / "big.png").write_bytes(_png((0, 0, 255), size=9))
    with pytest.raises(SourceError, match="set image_size"):
        load_source(ds, 0)
    raw = load_source(DatasetSpec(source="image_folder", path=str(tmp_path / "train"), image_size=4, channels=1), 0)
    assert raw.images.shape == (11, 4, 4, 1)


def test_parquet_with_and_without_truth(tmp_path):
    n = 12
    table = pa.table({"image": [_png((i * 20, 0, 0)) for i in range(n)], "label": ["a", "b"] * 6,
                      "id": [f"ex{i}" for i in range(n)], "poisoned": [i < 2 for i in range(n)]})
    pq.write_table(table, tmp_path / "train.parquet")
    test = table.drop_columns(["poisoned", "id"]).slice(0, 4)
    pq.write_table(test.append_column("id", pa.array([f"t{i}" for i in range(4)])), tmp_path / "test.parquet")
    ds = DatasetSpec(source="parquet", path=str(tmp_path / "train.parquet"), test_path=str(tmp_path / "test.parquet"))
    raw = load_source(ds, 0)
    assert raw.classes == ["a", "b"] and raw.is_test.sum() == 4
    assert raw.poisoned[~raw.is_test].tolist() == [1, 1] + [0] * 10
    assert (raw.poisoned[raw.is_test] == -1).all()
    # train and test may each number their ids from their own start: ids are unique per split
    pq.write_table(test.append_column("id", pa.array([f"ex{i}" for i in range(4)])), tmp_path / "test.parquet")
    raw = load_source(ds, 0)
    assert raw.ids[raw.is_test].tolist() == ["ex0", "ex1", "ex2", "ex3"] and "ex0" in raw.ids[~raw.is_test]
    twice = table.slice(0, 6).set_column(2, "id", pa.array(["a", "b", "c", "b", "d", "e"]))
    pq.write_table(twice, tmp_path / "test.parquet")
    with pytest.raises(SourceError, match=r"dataset.test_path: the id column has duplicate values \(row 3: 'b'\)"):
        load_source(ds, 0)
    pq.write_table(table.drop_columns(["label"]), tmp_path / "nolabel.parquet")
    with pytest.raises(SourceError, match="no column 'label'"):
        load_source(DatasetSpec(source="parquet", path=str(tmp_path / "nolabel.parquet")), 0)
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(SourceError, match="not a readable Parquet"):
        load_source(DatasetSpec(source="parquet", path=str(tmp_path / "junk.parquet")), 0)
