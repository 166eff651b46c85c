"""fastml's native Parquet decoder (csrc/data/parquet.cpp) against pyarrow.

The decoder reads flat INT32/INT64/FLOAT/DOUBLE column chunks (PLAIN,
dictionary and BYTE_STREAM_SPLIT encodings, data pages v1 and v2, uncompressed
or Snappy); everything else falls back to pyarrow. Every decoded chunk must be
bit-identical to pyarrow's reading of the same file, corrupt bytes must raise
(never crash), and the loader must give the same batches either way.
"""

from __future__ import annotations

import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from _hyp import examples
from _parquet_paths import force_decode_path
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import fastml
from fastml import _core, data
from fastml.data._sources import parquet_chunk_table, parquet_footer

NATIVE_DTYPES = [
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "int64",
    "uint32",
    "uint64",
    "float32",
    "float64",
    "bool",
]


def _decode_chunks(path) -> list[tuple[int, int, int, str, np.ndarray | None]]:
    """Every column chunk of `path` through the native decoder:
    (row group, column, status, message, values)."""
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    table = parquet_chunk_table(pf, names, footer=parquet_footer(str(path)))
    mf = _core.MappedFile(str(path))
    out = []
    for g in range(table.shape[0]):
        for j, name in enumerate(names):
            row = table[g, j]
            if row[2] < 0:
                out.append((g, j, -1, "not eligible", None))
                continue
            dtype = np.dtype(pf.schema_arrow.field(name).type.to_pandas_dtype())
            buf = np.empty(int(row[4]), dtype=dtype)
            chunks = np.concatenate([[0], row]).astype(np.int64)[None, :]
            ((status, msg),) = _core.parquet_decode([mf], chunks, [buf])
            out.append((g, j, status, msg, buf))
    return out


def _reference(path, g: int, name: str) -> np.ndarray:
    col = pq.ParquetFile(path).read_row_group(g, columns=[name]).column(0)
    if col.null_count:
        return col.to_numpy(zero_copy_only=False)
    return col.to_numpy()


def _assert_same(got: np.ndarray, ref: np.ndarray) -> None:
    assert got.dtype == ref.dtype
    if got.dtype.kind == "f":
        # Bit-identical, NaN payloads included, except that nulls are NaN.
        np.testing.assert_array_equal(np.isnan(got), np.isnan(ref))
        ok = ~np.isnan(ref)
        assert np.array_equal(got[ok].view(f"u{got.itemsize}"), ref[ok].view(f"u{got.itemsize}"))
    else:
        np.testing.assert_array_equal(got, ref)


def _columns(rng: np.random.Generator, n: int, dtypes: list[str], distinct: int, nulls: float):
    cols = {}
    for k, dt in enumerate(dtypes):
        kind = np.dtype(dt).kind
        if kind == "b":
            cols[f"c{k}_{dt}"] = pa.array(rng.random(n) < rng.random())
            continue
        if kind == "f":
            pool = rng.standard_normal(distinct).astype(dt)
            pool[: min(2, distinct)] = [np.inf, -0.0][: min(2, distinct)]
            v = pool[rng.integers(0, distinct, n)]
            mask = rng.random(n) < nulls if nulls else None
            cols[f"c{k}_{dt}"] = pa.array(v, mask=mask)
        else:
            info = np.iinfo(dt)
            pool = rng.integers(info.min, info.max, distinct, dtype=dt, endpoint=True)
            cols[f"c{k}_{dt}"] = pa.array(pool[rng.integers(0, distinct, n)])
    return pa.table(cols)


@settings(
    max_examples=examples(60),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    n=st.integers(1, 3000),
    dtypes=st.lists(st.sampled_from(NATIVE_DTYPES), min_size=1, max_size=4),
    distinct=st.sampled_from([1, 2, 7, 300, 5000]),
    nulls=st.sampled_from([0.0, 0.0, 0.1, 1.0]),
    compression=st.sampled_from(["snappy", "none"]),
    dictionary=st.booleans(),
    page_version=st.sampled_from(["1.0", "2.0"]),
    page_size=st.sampled_from([64, 1000, 1 << 20]),
    dict_limit=st.sampled_from([256, 1 << 20]),
    row_group=st.sampled_from([100, 1024, 5000]),
    split=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_native_chunks_match_pyarrow(
    tmp_path,
    n,
    dtypes,
    distinct,
    nulls,
    compression,
    dictionary,
    page_version,
    page_size,
    dict_limit,
    row_group,
    split,
    seed,
):
    rng = np.random.default_rng(seed)
    table = _columns(rng, n, dtypes, distinct, nulls)
    path = tmp_path / "t.parquet"
    floats = [c for c in table.column_names if "float" in c]
    kwargs = {}
    if split and floats and not dictionary:
        kwargs["column_encoding"] = {c: "BYTE_STREAM_SPLIT" for c in floats}
    pq.write_table(
        table,
        path,
        compression=compression,
        use_dictionary=dictionary,
        data_page_version=page_version,
        data_page_size=page_size,
        dictionary_pagesize_limit=dict_limit,
        row_group_size=row_group,
        **kwargs,
    )
    names = table.column_names
    for g, j, status, msg, got in _decode_chunks(path):
        assert status == 0, (g, names[j], msg)
        _assert_same(got, _reference(path, g, names[j]))


def test_loader_reads_native_and_fallback_columns_like_pyarrow(tmp_path):
    rng = np.random.default_rng(5)
    n = 5000
    table = pa.table(
        {
            "f32": pa.array(rng.random(n).astype(np.float32), mask=rng.random(n) < 0.05),
            "f64": rng.standard_normal(n),
            "i64": rng.integers(-(2**40), 2**40, n),
            "u32": rng.integers(0, 2**32 - 1, n, dtype=np.uint32),
            "i8": rng.integers(-100, 100, n).astype(np.int8),  # INT32 physical, narrowed
            "b": rng.random(n) < 0.5,  # BOOLEAN
            "h": rng.random(n).astype(np.float16),  # FIXED_LEN_BYTE_ARRAY: pyarrow path
            "d": pa.array(rng.integers(0, 5, n).astype(np.int32)).dictionary_encode(),
        }
    )
    path = tmp_path / "mixed.parquet"
    pq.write_table(table, path, row_group_size=700, data_page_size=2000)
    eligible = (
        parquet_chunk_table(
            pq.ParquetFile(path), table.column_names, footer=parquet_footer(str(path))
        )[:, :, 2]
        >= 0
    )
    # An Arrow dictionary of int32 is stored as int32 values (pyarrow reads it back so).
    assert eligible[:, [0, 1, 2, 3, 4, 5, 7]].all() and not eligible[:, 6].any()  # float16: pyarrow
    ds = data.Dataset.from_parquet(path)
    loader = data.Loader(ds, batch_size=333, shuffle=False, shuffle_buffer=1400)
    got = {c: np.concatenate([b[c] for b in loader]) for c in table.column_names}
    ref = pq.read_table(path)
    for c in table.column_names:
        np.testing.assert_array_equal(got[c], ref.column(c).to_numpy(zero_copy_only=False))
    # Shuffled epochs are the same permutation of the same rows, with batches kept alive
    # across windows (window buffers are reused: kept batches must not change).
    ids = pa.table({"id": np.arange(n, dtype=np.int64), "x": np.arange(n, dtype=np.float64) * 2})
    path2 = tmp_path / "ids.parquet"
    pq.write_table(ids, path2, row_group_size=500)
    loader = data.Loader(data.Dataset.from_parquet(path2), batch_size=64, shuffle_buffer=1000)
    for _ in range(2):
        kept = list(loader)
        order = np.concatenate([b["id"] for b in kept])
        assert sorted(order.tolist()) == list(range(n))
        for b in kept:
            np.testing.assert_array_equal(b["x"], b["id"] * 2.0)


def test_fallbacks_for_other_codecs_and_encodings(tmp_path):
    rng = np.random.default_rng(1)
    n = 3000
    table = pa.table({"i": rng.integers(0, 1000, n), "x": rng.random(n)})
    cases = {
        "zstd": {"compression": "zstd"},
        "gzip": {"compression": "gzip"},
        "delta": {"use_dictionary": False, "column_encoding": {"i": "DELTA_BINARY_PACKED"}},
    }
    for name, kwargs in cases.items():
        path = tmp_path / f"{name}.parquet"
        pq.write_table(table, path, row_group_size=1000, **kwargs)
        results = _decode_chunks(path)
        if name == "delta":
            assert {s for _, j, s, _, _ in results if j == 0} == {1}  # unsupported encoding
            assert {s for _, j, s, _, _ in results if j == 1} == {0}
        else:
            assert {r[2] for r in results} == {-1}  # codec not read natively
        loader = data.Loader(data.Dataset.from_parquet(path), batch_size=256, shuffle=False)
        got = list(loader)
        np.testing.assert_array_equal(np.concatenate([b["i"] for b in got]), table["i"].to_numpy())
        np.testing.assert_array_equal(np.concatenate([b["x"] for b in got]), table["x"].to_numpy())


def test_nulls_in_an_integer_column_name_the_column(tmp_path):
    path = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"k": pa.array([1, None, 3] * 100, type=pa.int64())}), path)
    ((_, _, status, msg, _),) = _decode_chunks(path)
    assert status == 3 and "null" in msg
    loader = data.Loader(data.Dataset.from_parquet(path), batch_size=10, shuffle=False)
    with pytest.raises(ValueError, match=r"column 'k' has null values.*nulls\.parquet"):
        list(loader)


def _valid_file(tmp_path, compression: str, version: str, dictionary: bool, checksum=False):
    rng = np.random.default_rng(0)
    n = 2000
    table = pa.table(
        {
            "x": pa.array(rng.standard_normal(n).astype(np.float32), mask=rng.random(n) < 0.1),
            "i": rng.integers(0, 50, n),
        }
    )
    path = tmp_path / f"v_{compression}_{version}_{dictionary}_{checksum}.parquet"
    pq.write_table(
        table,
        path,
        compression=compression,
        data_page_version=version,
        use_dictionary=dictionary,
        data_page_size=1500,
        row_group_size=1000,
        write_page_checksum=checksum,
    )
    return path


@pytest.mark.parametrize("compression", ["snappy", "none"])
@pytest.mark.parametrize("version", ["1.0", "2.0"])
@pytest.mark.parametrize("dictionary", [True, False])
@pytest.mark.parametrize("checksum", [False, True], ids=["no_crc", "crc"])
def test_corrupt_chunks_raise_and_never_crash(tmp_path, compression, version, dictionary, checksum):
    path = _valid_file(tmp_path, compression, version, dictionary, checksum)
    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    table = parquet_chunk_table(pf, names, footer=parquet_footer(str(path)))
    raw = path.read_bytes()
    # A fixed seed per configuration (never hash(), which Python salts per process).
    rng = np.random.default_rng(zlib.crc32(f"{compression}/{version}/{dictionary}".encode()))
    corrupt_path = tmp_path / "corrupt.parquet"
    clean_mf = _core.MappedFile(str(path))

    def decode(mf, row, dtype):
        out = np.empty(int(row[4]), dtype=dtype)
        chunks = np.concatenate([[0], row]).astype(np.int64)[None, :]
        ((status, msg),) = _core.parquet_decode([mf], chunks, [out])
        return status, msg, out

    seen = set()
    for trial in range(150):
        buf = bytearray(raw)
        g, j = int(rng.integers(table.shape[0])), int(rng.integers(len(names)))
        off, size = int(table[g, j, 0]), int(table[g, j, 1])
        for _ in range(int(rng.integers(1, 6))):
            k = off + int(rng.integers(size))
            buf[k] = int(rng.integers(256)) if trial % 2 else buf[k] ^ (1 << int(rng.integers(8)))
        corrupt_path.write_bytes(bytes(buf))
        mf = _core.MappedFile(str(corrupt_path))
        row = table[g, j]
        dtype = np.float32 if names[j] == "x" else np.int64
        status, msg, out = decode(mf, row, dtype)
        assert status in (0, 1, 2, 3), msg
        seen.add(status)
        if checksum and status == 0:
            # With page checksums a decoded chunk is the original, never silent garbage
            # (a mutation that decodes hit a header field that does not change values).
            _, _, clean = decode(clean_mf, row, dtype)
            assert out.tobytes() == clean.tobytes(), f"trial {trial}: corrupt values decoded"
    # Corruption was detected, as IOError-class failures. Without page checksums a
    # flipped value byte of an uncompressed PLAIN page is undetectable by anyone;
    # the headers, levels and Snappy streams the mutations also hit are checked.
    assert 2 in seen
    # Truncated chunks: every prefix length of one chunk is reported, never read past.
    mf = _core.MappedFile(str(path))
    row = table[0, 0].copy()
    for cut in list(range(0, 64)) + list(range(64, int(row[1]), 97)):
        row[1] = cut
        out = np.empty(int(row[4]), dtype=np.float32)
        chunks = np.concatenate([[0], row]).astype(np.int64)[None, :]
        ((status, _),) = _core.parquet_decode([mf], chunks, [out])
        assert status == 2


def test_corrupt_native_chunk_in_the_loader_names_file_row_group_and_column(tmp_path):
    path = _valid_file(tmp_path, "snappy", "1.0", True)
    pf = pq.ParquetFile(path)
    cc = pf.metadata.row_group(1).column(1)
    raw = bytearray(path.read_bytes())
    raw[cc.dictionary_page_offset] = 0xFF  # the page header's first byte
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(bytes(raw))
    loader = data.Loader(
        data.Dataset.from_parquet(bad), batch_size=100, shuffle=False, shuffle_buffer=1000
    )
    with pytest.raises(fastml.FormatError, match=r"bad\.parquet.*row group 1, column 'i'"):
        list(loader)


def test_decode_argument_errors(tmp_path):
    path = _valid_file(tmp_path, "snappy", "1.0", True)
    table = parquet_chunk_table(pq.ParquetFile(path), ["x", "i"], footer=parquet_footer(str(path)))
    mf = _core.MappedFile(str(path))
    row = np.concatenate([[0], table[0, 0]]).astype(np.int64)[None, :]
    with pytest.raises(ValueError, match="outs"):
        _core.parquet_decode([mf], row, [np.empty(5, np.float32)])
    with pytest.raises(ValueError, match="outs"):
        _core.parquet_decode([mf], row, [])
    far = row.copy()
    far[0, 1] = mf.size - 3
    with pytest.raises(OSError, match="outside the file"):
        _core.parquet_decode([mf], far, [np.empty(1000, np.float32)])
    with pytest.raises(ValueError, match="chunks"):
        _core.parquet_decode([], row, [np.empty(1000, np.float32)])
    shared = np.empty(1000, np.float32)
    with pytest.raises(ValueError, match="overlap"):
        _core.parquet_decode([mf], np.concatenate([row, row]), [shared, shared])
    with pytest.raises(FileNotFoundError, match="missing"):
        _core.MappedFile(str(tmp_path / "missing.parquet"))
    with pytest.raises(OSError, match="not a regular file"):
        _core.MappedFile(str(tmp_path))


@pytest.mark.parametrize("shuffle", [False, True])
def test_chunks_the_decoder_rejects_are_read_by_pyarrow(tmp_path, monkeypatch, shuffle):
    """A chunk reported corrupt or unsupported is retried with pyarrow; the
    loader fails only when pyarrow fails too (it is never stricter). Shuffled,
    with the row groups stored in their shuffled order as they are decoded,
    the chunks pyarrow reads are put in the same order: the same batches."""
    rng = np.random.default_rng(2)
    n = 4000
    table = pa.table({"i": rng.integers(0, 99, n), "x": rng.random(n).astype(np.float32)})
    path = tmp_path / "ok.parquet"
    pq.write_table(table, path, row_group_size=1000)
    force_decode_path(monkeypatch, "stored")  # every window stored shuffled
    kw = dict(batch_size=300, shuffle=shuffle, shuffle_buffer=2000, seed=3)
    want = list(data.Loader(data.Dataset.from_parquet(path), **kw))
    real = _core.parquet_decode
    calls = []

    def flaky(files, chunks, outs, perms=None):
        res = real(files, chunks, outs, perms)
        calls.append(len(res))
        # Every other chunk "fails": alternately corrupt and unsupported.
        return [
            (2 if k % 4 == 0 else 1, "injected") if k % 2 == 0 else r for k, r in enumerate(res)
        ]

    monkeypatch.setattr(_core, "parquet_decode", flaky)
    loader = data.Loader(data.Dataset.from_parquet(path), **kw)
    got = list(loader)
    assert calls
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g["i"], w["i"])
        np.testing.assert_array_equal(g["x"], w["x"])
    if not shuffle:
        np.testing.assert_array_equal(np.concatenate([b["i"] for b in got]), table["i"].to_numpy())
    assert loader.stats()["row_groups_read"] == 4


def test_column_subset_and_many_files_through_the_native_path(tmp_path):
    rng = np.random.default_rng(4)
    parts = []
    for k, n in enumerate([700, 1300, 1]):
        t = pa.table(
            {
                "a": rng.standard_normal(n),
                "skip": rng.integers(0, 5, n).astype(np.int8),
                "b": pa.array(rng.integers(0, 9, n).astype(np.int32), mask=None),
                "c": rng.random(n).astype(np.float32),
            }
        )
        pq.write_table(
            t,
            tmp_path / f"p{k}.parquet",
            row_group_size=500,
            compression="snappy" if k != 1 else "none",
        )
        parts.append(t)
    ds = data.Dataset.from_parquet(str(tmp_path / "p*.parquet"), columns=["c", "a"])
    assert ds.columns == ["c", "a"]
    loader = data.Loader(ds, batch_size=128, shuffle=False, shuffle_buffer=600)
    got = list(loader)
    for c in ("c", "a"):
        ref = np.concatenate([t[c].to_numpy() for t in parts])
        np.testing.assert_array_equal(np.concatenate([b[c] for b in got]), ref)
    assert set(got[0]) == {"c", "a"}
    # Shuffled: the same rows, each batch's columns consistent with each other.
    loader = data.Loader(ds, batch_size=100, shuffle=True, seed=3, shuffle_buffer=600)
    pairs = np.concatenate([np.stack([b["a"], b["c"].astype(np.float64)], 1) for b in loader])
    ref = np.stack(
        [
            np.concatenate([t["a"].to_numpy() for t in parts]),
            np.concatenate([t["c"].to_numpy() for t in parts]).astype(np.float64),
        ],
        1,
    )
    assert sorted(map(tuple, pairs)) == sorted(map(tuple, ref))


@pytest.mark.parametrize("compression", ["snappy", "uncompressed"])
def test_files_written_by_polars(tmp_path, compression):
    """polars writes Parquet with its own (Rust) writer: other page layouts."""
    pl = pytest.importorskip("polars")
    rng = np.random.default_rng(9)
    n = 30_000
    df = pl.DataFrame(
        {
            "f32": rng.standard_normal(n).astype(np.float32),
            "f64": rng.standard_normal(n),
            "i64": rng.integers(-1000, 1000, n),
            "i32": rng.integers(0, 7, n).astype(np.int32),
            "u32": rng.integers(0, 2**32 - 1, n, dtype=np.uint32),
            "u64": rng.integers(0, 2**63, n, dtype=np.uint64),
        }
    )
    df = df.with_columns(
        pl.when(pl.col("i32") == 3).then(None).otherwise(pl.col("f32")).alias("f32_nulls")
    )
    for stats in (True, False):
        path = tmp_path / f"polars_{stats}.parquet"
        df.write_parquet(
            path,
            compression=compression,
            statistics=stats,
            row_group_size=12_000,
            data_page_size=8192,
        )
        names = pq.ParquetFile(path).schema_arrow.names
        for g, j, status, msg, got in _decode_chunks(path):
            assert status == 0, (names[j], msg)
            _assert_same(got, _reference(path, g, names[j]))


@pytest.mark.parametrize("compression", ["snappy", "none"])
def test_page_checksums_catch_value_corruption_in_the_loader(tmp_path, compression):
    """A value byte flipped in a PLAIN page: undetectable without page checksums;
    with them (write_page_checksum=True) both the native decoder and the pyarrow
    fallback refuse the page, so the loader raises instead of returning it."""
    t = pa.table({"x": np.arange(1000, dtype=np.float32)})
    for checksum in (False, True):
        path = tmp_path / f"crc_{checksum}.parquet"
        pq.write_table(
            t, path, compression=compression, use_dictionary=False, write_page_checksum=checksum
        )
        cc = pq.ParquetFile(path).metadata.row_group(0).column(0)
        raw = bytearray(path.read_bytes())
        raw[cc.data_page_offset + cc.total_compressed_size - 10] ^= 0x01
        path.write_bytes(bytes(raw))
        ds = data.Dataset.from_parquet(path)
        batches = lambda ds=ds: list(data.Loader(ds, batch_size=1000, shuffle=False))  # noqa: E731
        if not checksum and compression == "none":
            assert not np.array_equal(batches()[0]["x"], t.column("x").to_numpy())
        elif checksum:
            with pytest.raises(fastml.FormatError, match=r"crc_True\.parquet.*CRC"):
                batches()


@pytest.mark.parametrize("dtype", ["int8", "int16", "int32", "int64", "float32", "float64"])
def test_decode_into_a_permuted_order(tmp_path, dtype):
    """parquet_decode(perms=...): out[j] = value[perm[j]] (the Parquet reader
    stores shuffled row groups this way); bad orders are refused."""
    rng = np.random.default_rng(5)
    n = 3001
    v = (rng.random(n) * 100).astype(dtype)
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"v": v}), path, row_group_size=n)
    pf = pq.ParquetFile(path)
    table = parquet_chunk_table(pf, ["v"], footer=parquet_footer(str(path)))
    row = table[0, 0]
    assert row[2] >= 0
    chunks = np.concatenate([[0], row]).astype(np.int64)[None, :]
    mf = _core.MappedFile(str(path))
    perm = rng.permutation(n).astype(np.int64)
    out = np.empty(n, dtype=dtype)
    ((status, _msg),) = _core.parquet_decode([mf], chunks, [out], [perm])
    assert status == 0
    assert out.tobytes() == v[perm].tobytes()
    plain = np.empty(n, dtype=dtype)
    _core.parquet_decode([mf], chunks, [plain], [None])
    assert plain.tobytes() == v.tobytes()
    with pytest.raises(ValueError, match="perms"):
        _core.parquet_decode([mf], chunks, [out], [perm[:-1]])
    bad = perm.copy()
    bad[7] = n
    with pytest.raises(ValueError, match="outside"):
        _core.parquet_decode([mf], chunks, [out], [bad])
    with pytest.raises(ValueError, match="one entry per chunk"):
        _core.parquet_decode([mf], chunks, [out], [perm, perm])
