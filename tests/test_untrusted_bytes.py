"""Every file and byte string fastml reads, mutated at every byte position.

The contract (docs/development.md, "Untrusted input"): a loader either reads
the mutated input (and what it built then works) or raises exactly one
``fastml.FormatError`` (a ``ValueError``) that names the source. No other
exception type, no crash, no hang, no half-built object. The mutations are
exhaustive and deterministic (no random draws): each byte replaced by a few
values, each prefix (truncation), and for the checksummed formats the same
edits with the checksum recomputed, so the field validators are reached.
"""

from __future__ import annotations

import json
import struct
import zlib
from collections.abc import Callable, Iterator

import numpy as np
import pytest

import fastml
from fastml import data, drift
from fastml.infer import Forest

xgb = pytest.importorskip("xgboost")
lgb = pytest.importorskip("lightgbm")

FormatError = fastml.FormatError
_X = np.random.default_rng(0).normal(size=(16, 3))


def _train_data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 3))
    X[:, 2] = rng.integers(0, 4, 200)
    y = (X[:, 0] + (X[:, 2] == 1) > 0.3).astype(float)
    return X, y


@pytest.fixture(scope="module")
def sources() -> dict[str, bytes]:
    X, y = _train_data()
    b = xgb.train(
        {"objective": "binary:logistic", "max_depth": 2, "nthread": 1}, xgb.DMatrix(X, y), 2
    )
    lb = lgb.train(
        {
            "objective": "binary",
            "num_leaves": 4,
            "verbose": -1,
            "num_threads": 1,
            "min_data_per_group": 5,
        },
        lgb.Dataset(X, y, categorical_feature=[2]),
        2,
    )
    cols = {"a": X[:60, 0], "c": np.array(["x", "yy", "z"] * 20)}
    return {
        "xgb_json": bytes(b.save_raw("json")),
        "xgb_ubj": bytes(b.save_raw("ubj")),
        # Up to "end of trees": the importances and parameters after it are not read.
        "lgb_text": lb.model_to_string().split("end of trees")[0].encode() + b"end of trees\n",
        "forest": Forest.from_xgboost(b).to_bytes(),
        "profile_exact": drift.Profile.from_data(cols).to_bytes(),
        "profile_sketch": drift.Profile.from_data(cols, mode="sketch", sketch_k=8).to_bytes(),
    }


def _edits(raw: bytes, values: tuple[int, ...] = (0x00, 0xFF)) -> Iterator[bytes]:
    """Each byte xor-ed with 0x80 and replaced by each of ``values``; then every prefix."""
    for i in range(len(raw)):
        for v in {raw[i] ^ 0x80, *values} - {raw[i]}:
            yield raw[:i] + bytes([v]) + raw[i + 1 :]
    for n in range(len(raw)):
        yield raw[:n]


def _expect_clean(load: Callable[[bytes], object], mutated: Iterator[bytes], source: str) -> int:
    """Load every mutation; returns how many loaded. Anything but a FormatError
    naming ``source`` fails the test with the mutation that caused it."""
    loaded = 0
    for blob in mutated:
        try:
            obj = load(blob)
        except FormatError as e:
            assert source in str(e), f"the error does not name {source!r}: {e}"
            continue
        except Exception as e:  # pragma: no cover - the failure report
            raise AssertionError(f"{type(e).__name__} for input {blob!r}: {e}") from e
        loaded += 1
        repr(obj)
    return loaded


# ---------------------------------------------------------------------------- forest files


def _forest_ok(f: Forest) -> Forest:
    repr(f)
    if f.num_features == 3:
        f.predict(_X, output="margin")
    return f


def _with_forest_checksum(blob: bytes) -> bytes:
    """Fix up the header's size and FNV-1a checksum for a mutated payload."""
    payload = blob[32:]
    h = 1469598103934665603
    for byte in payload:
        h = ((h ^ byte) * 1099511628211) & 0xFFFFFFFFFFFFFFFF
    return blob[:16] + struct.pack("<QQ", len(payload), h) + payload


def test_forest_file_every_byte(sources, tmp_path):
    path = tmp_path / "model.fmlf"

    def load(blob: bytes) -> Forest:
        path.write_bytes(blob)
        return _forest_ok(Forest.load(path))

    raw = sources["forest"]
    assert _expect_clean(load, _edits(raw), str(path)) == 0  # the checksum catches all


def test_forest_payload_every_byte_past_the_checksum(sources):
    raw = sources["forest"]

    def load(blob: bytes) -> Forest:
        return _forest_ok(Forest.from_bytes(_with_forest_checksum(blob)))

    mutated = (raw[:32] + m for m in _edits(raw[32:], (0x00, 0xFF, 0x7F, 0x01)))
    _expect_clean(load, mutated, "data")


def test_forest_pinned_corruptions(sources):
    raw = sources["forest"]
    # The objective's first byte made invalid UTF-8 (found by random exploration, issue #13):
    # once a UnicodeDecodeError and a Forest whose repr raised AttributeError.
    bad = bytearray(raw)
    bad[32 + 48] = 0x80
    with pytest.raises(FormatError, match=r"not valid UTF-8 \(field 'objective' at byte 80\)"):
        Forest.from_bytes(_with_forest_checksum(bytes(bad)))
    # Metadata that is valid UTF-8 but not a JSON object.
    f = Forest.from_bytes(raw)
    spec = f._core.spec()
    meta = spec["metadata"].encode()
    start = raw.index(meta)
    junk = raw[:start] + b"[" + b" " * (len(meta) - 1) + raw[start + len(meta) :]
    with pytest.raises(FormatError, match="metadata is not valid JSON"):
        Forest.from_bytes(_with_forest_checksum(junk))


# ---------------------------------------------------------------------------- drift profiles


def _with_profile_crc(blob: bytes) -> bytes:
    payload = blob[24:]
    return blob[:12] + struct.pack("<IQ", zlib.crc32(payload), len(payload)) + payload


def _profile_ok(p: drift.Profile) -> drift.Profile:
    repr(p)
    p.features  # noqa: B018 - names must decode
    drift.Profile.merge([p, p.empty()])
    return p


@pytest.mark.parametrize("kind", ["profile_exact", "profile_sketch"])
def test_profile_bytes_every_byte(sources, kind):
    raw = sources[kind]
    load = lambda b: _profile_ok(drift.Profile.from_bytes(b))  # noqa: E731
    assert _expect_clean(load, _edits(raw), "data") == 0  # the CRC catches all
    mutated = (raw[:24] + m for m in _edits(raw[24:], (0x00, 0xFF, 0x7F, 0x01)))
    _expect_clean(lambda b: load(_with_profile_crc(b)), mutated, "data")


# ---------------------------------------------------------------------------- foreign models


@pytest.mark.parametrize("kind", ["xgb_json", "xgb_ubj"])
def test_xgboost_model_every_byte(sources, kind):
    raw = sources[kind]
    # JSON: bytes that change numbers, strings and structure; UBJSON: type markers too.
    values = (0xFF, ord("9"), ord("-"), ord('"'), ord("}"), ord("["))
    if kind == "xgb_ubj":
        values = (0x00, ord("L"))

    def load(blob: bytes) -> Forest:
        return _forest_ok(Forest.from_xgboost(blob))

    _expect_clean(load, _edits(raw, values), "model (bytes)")


def test_xgboost_file_names_the_file(sources, tmp_path):
    path = tmp_path / "model.json"
    path.write_bytes(sources["xgb_json"][:100])
    with pytest.raises(FormatError, match=r"model\.json.*not a valid XGBoost model"):
        Forest.from_xgboost(path)


def test_lightgbm_text_every_byte(sources, tmp_path):
    path = tmp_path / "model.txt"
    raw = sources["lgb_text"]
    values = (0xFF, ord("9"), ord("-"), ord("\n"))

    def load(blob: bytes) -> Forest:
        path.write_bytes(blob)
        return _forest_ok(Forest.from_lightgbm(path))

    _expect_clean(load, _edits(raw, values), str(path))


# ---------------------------------------------------------------------------- .npy files


def test_npy_file_every_byte(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.arange(12, dtype=np.float32).reshape(4, 3))
    raw = path.read_bytes()

    def load(blob: bytes) -> object:
        path.write_bytes(blob)
        ds = data.Dataset.from_npy({"x": path})
        for batch in data.Loader(ds, batch_size=3, shuffle=False):
            repr(batch)
        return ds

    values = (0x00, 0xFF, ord("9"), ord("("), ord("'"), ord(","), ord(" "))
    _expect_clean(load, _edits(raw, values), str(path))


# ---------------------------------------------------------------------------- Parquet files

_PARQUET_WORKER = r"""
import json, sys, warnings
import numpy as np
import pyarrow.parquet as pq
import fastml
from fastml import data

path, raw_path = sys.argv[1], sys.argv[2]
raw = open(raw_path, "rb").read()

def mutations():
    for i in range(len(raw)):
        for v in sorted({raw[i] ^ 0x80, 0x00, 0xFF} - {raw[i]}):
            yield f"byte {i} = {v}", raw[:i] + bytes([v]) + raw[i + 1 :]
    for n in range(0, len(raw), 7):
        yield f"cut {n}", raw[:n]

for what, blob in mutations():
    open(path, "wb").write(blob)
    try:
        want = pq.read_table(path).to_pydict()
        want = {k: np.asarray([np.nan if x is None else x for x in v], dtype=np.float64) for k, v in want.items()}
    except Exception as e:  # what pyarrow makes of it
        want = None
    try:
        ds = data.Dataset.from_parquet(path)
        got = {k: [] for k in ds.schema}
        for b in data.Loader(ds, batch_size=64, shuffle=False):
            for k in got:
                got[k].append(np.asarray(b[k], dtype=np.float64))
        got = {k: np.concatenate(v) if v else np.zeros(0) for k, v in got.items()}
        outcome = "read"
    except fastml.FormatError as e:
        # Nulls in an integer column are a documented refusal (no NaN to hold them).
        outcome = "unsupported" if "null values in a non-floating column" in str(e) else "format_error"
        got = None
    except Exception as e:
        print(json.dumps({"what": what, "bad": f"{type(e).__name__}: {e}"}), flush=True)
        continue
    if outcome == "read":
        agree = want is not None and set(want) == set(got) and all(
            np.array_equal(want[k], got[k], equal_nan=True) for k in want
        )
        if not agree:
            print(json.dumps({"what": what, "bad": "read, but not as pyarrow reads it"
                              + (" (pyarrow refuses the file)" if want is None else "")}), flush=True)
    print(json.dumps({"what": what, "outcome": outcome, "pyarrow": want is not None}), flush=True)
"""


def test_parquet_file_every_byte_matches_pyarrow(tmp_path):
    """Every byte of a small Parquet file (pages and footer) mutated, in a child
    process (a C++ abort must fail the test, not kill the run): fastml reads the
    file exactly as pyarrow does, or raises fastml.FormatError; when pyarrow reads
    the mutated file, so does fastml (never stricter), and when pyarrow refuses
    it, fastml never returns values (never looser)."""
    import subprocess
    import sys

    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    rng = np.random.default_rng(0)
    table = pa.table(
        {
            "x": pa.array(rng.standard_normal(40).astype(np.float32), mask=rng.random(40) < 0.1),
            "i": rng.integers(0, 5, 40),
        }
    )
    src = tmp_path / "base.parquet"
    pq.write_table(table, src, compression="snappy", row_group_size=20, write_statistics=False)
    script = tmp_path / "worker.py"
    script.write_text(_PARQUET_WORKER)
    r = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "m.parquet"), str(src)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, f"the worker died (rc {r.returncode}): {r.stderr[-2000:]}"
    lines = [json.loads(x) for x in r.stdout.splitlines() if x.strip()]
    bad = [x for x in lines if "bad" in x]
    assert not bad, f"{len(bad)} mutations: {bad[:10]}"
    outcomes = [x for x in lines if "outcome" in x]
    stricter = [x["what"] for x in outcomes if x["pyarrow"] and x["outcome"] == "format_error"]
    assert not stricter, f"fastml refused {len(stricter)} files pyarrow reads: {stricter[:10]}"
    assert len(outcomes) > 1000


# ---------------------------------------------------------------------------- declared sizes


def test_declared_sizes_are_checked_before_anything_is_sized_by_them(sources):
    """A size field edited in a model is refused at once, naming the field (was:
    64 s and 5.4 GB for num_class=1e8; a 13-byte UBJSON array of 2e8 nulls took
    1.6 GB; num_feature=2**31 raised pybind11's cast error)."""
    import time

    from fastml.infer import _ubjson

    doc = json.loads(sources["xgb_json"])
    lmp = doc["learner"]["learner_model_param"]
    for field, value, match in (
        ("num_class", "100000000", "num_class 100000000 does not match the model"),
        ("num_feature", "2147483648", r"num_feature 2147483648 is out of range"),
        ("num_class", "-3", "num_class -3"),
    ):
        bad = json.loads(json.dumps(doc))
        bad["learner"]["learner_model_param"][field] = value
        t0 = time.perf_counter()
        with pytest.raises(FormatError, match=match):
            Forest.from_xgboost(json.dumps(bad).encode())
        assert time.perf_counter() - t0 < 2.0
    assert lmp["num_class"] == "0"
    with pytest.raises(ValueError, match="200000000 items of a zero-byte type"):
        _ubjson.loads(b"[$Z#l\x0b\xeb\xc2\x00")
    with pytest.raises(ValueError, match="longer than the data"):
        _ubjson.loads(b"[$S#l\x0b\xeb\xc2\x00")


def test_loader_seed_range_is_checked_at_construction():
    ds = data.Dataset.from_numpy({"x": np.ones(4)})
    with pytest.raises(ValueError, match=r"seed must be < 2\*\*63"):
        data.Loader(ds, batch_size=2, seed=2**64)


def test_profile_fields_must_agree_behind_the_checksum():
    """With the CRC recomputed, a count of 1e9 over 60 stored values is refused
    (it used to load and inflate every distance)."""
    rng = np.random.default_rng(3)
    p = drift.Profile.from_data({"x": rng.normal(size=60)})
    raw = bytearray(p.to_bytes())
    sixty = struct.pack("<d", 60.0)
    at = raw.index(sixty, 24 + 20)  # the feature's count, after the header and names
    raw[at : at + 8] = struct.pack("<d", 1e9)
    with pytest.raises(FormatError, match="differ from the count"):
        drift.Profile.from_bytes(_with_profile_crc(bytes(raw)))
