"""The foundation: build info, error translation, the array boundary, the
shared thread pool, GIL release and the CLI."""

from __future__ import annotations

import concurrent.futures
import gc
import json
import subprocess
import sys
import threading

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import fastml
from fastml import _core
from fastml._core import _testing

# ------------------------------------------------------------------ build info


def test_version_and_build_info():
    info = fastml.build_info()
    assert fastml.__version__ == info["version"] == _core.__version__
    for key in ("version", "compiler", "cuda", "cuda_version", "simd", "num_threads"):
        assert key in info
    assert isinstance(info["cuda"], bool)
    assert info["cuda_version"] is None or isinstance(info["cuda_version"], str)
    assert info["cuda_version"] is not None if info["cuda"] else info["cuda_version"] is None
    assert info["simd"].startswith("baseline=")
    assert info["num_threads"] == fastml.get_num_threads()


def test_cuda_available_is_consistent():
    avail = fastml.cuda_available()
    assert isinstance(avail, bool)
    if not fastml.build_info()["cuda"]:
        assert not avail
    assert avail == (fastml.build_info()["cuda"] and _core.cuda_device_count() > 0)


def test_submodules_import_lazily():
    for name in ("data", "drift", "infer", "ops", "bench"):
        mod = getattr(fastml, name)
        assert mod.__name__ == f"fastml.{name}"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        _ = fastml.nope


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize(
    ("kind", "exc"),
    [
        ("value", ValueError),
        ("type", TypeError),
        ("index", IndexError),
        ("runtime", RuntimeError),
        ("os", OSError),
        ("file_not_found", FileNotFoundError),
        ("timeout", TimeoutError),
        ("cancelled", concurrent.futures.CancelledError),
        ("queue_full", _core.QueueFull),
        ("memory", MemoryError),
    ],
)
def test_error_translation(kind, exc):
    with pytest.raises(exc, match="boom" if kind != "memory" else None):
        _testing.raise_error(kind, "boom")
    # The same mapping applies to errors raised inside pool threads.
    with pytest.raises(exc):
        _testing.parallel_raise(kind)


def test_type_error_is_not_a_value_error():
    # fastml::TypeError derives from std::invalid_argument in C++; Python must
    # still see TypeError, not ValueError.
    with pytest.raises(TypeError) as info:
        _testing.raise_error("type", "x must be float32")
    assert not isinstance(info.value, ValueError)


def test_unknown_error_kind_names_argument():
    with pytest.raises(ValueError, match="kind: unknown error kind 'zzz'"):
        _testing.raise_error("zzz")


# ------------------------------------------------------------------ array boundary

ALL_DTYPES = [
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.uint16,
    np.uint32,
    np.uint64,
    np.float16,
    np.float32,
    np.float64,
]


@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_numpy_zero_copy_every_dtype(dtype):
    a = np.arange(24).reshape(4, 6).astype(dtype)
    d = _testing.describe(a)
    assert d["data"] == a.ctypes.data
    assert d["dtype"] == np.dtype(dtype).name
    assert d["shape"] == [4, 6]
    assert d["strides"] == list(a.strides)
    assert _testing.sum(a) == pytest.approx(float(a.astype(np.float64).sum()))


def test_numpy_readonly_is_reported():
    a = np.zeros(5)
    a.flags.writeable = False
    assert _testing.describe(a)["readonly"] is True


def test_non_contiguous_layouts():
    base = np.arange(40, dtype=np.float32).reshape(5, 8)
    view = base[:, ::2]
    d = _testing.describe(view, "any")
    assert d["data"] == view.ctypes.data and not d["c_contiguous"]
    d = _testing.describe(view, "make_contiguous")
    assert d["c_contiguous"] and d["data"] != view.ctypes.data
    with pytest.raises(
        ValueError, match=r"x must be C-contiguous, got a strided 2-D float32 \(5, 4\)"
    ):
        _testing.describe(view, "contiguous")
    assert _testing.sum(view) == float(view.sum())


def test_big_endian_is_converted():
    a = np.arange(10, dtype=">f8")
    assert _testing.sum(a) == 45.0


def _unaligned(values: np.ndarray) -> np.ndarray:
    """`values` in memory at an odd address (as numpy arrays over a pickle or
    network buffer are: Dask hands partitions to workers so)."""
    raw = np.zeros(values.nbytes + 1, np.uint8)
    out = raw[1:].view(values.dtype).reshape(values.shape)
    out[...] = values
    assert not out.flags.aligned
    return out


def test_unaligned_inputs_are_copied_and_outputs_refused():
    """The array boundary copies unaligned inputs to aligned memory (reading
    typed elements there is undefined behaviour: UBSan stopped a Dask worker
    profiling a partition) and refuses an unaligned output, in every area."""
    from fastml import data, drift
    from fastml.infer import Forest

    x = np.random.default_rng(0).normal(size=(257, 3))
    xu = _unaligned(x)
    assert _testing.sum(xu) == _testing.sum(x)
    a, b = drift.Profile.from_data({"x": xu[:, 0]}), drift.Profile.from_data({"x": x[:, 0]})
    assert a.to_bytes() == b.to_bytes()
    got = next(iter(data.Loader(data.Dataset.from_numpy({"x": xu}), batch_size=300, shuffle=False)))
    np.testing.assert_array_equal(got["x"], x)
    xgb = pytest.importorskip("xgboost")
    booster = xgb.train({"nthread": 1, "max_depth": 3}, xgb.DMatrix(x, x[:, 0]), 3)
    f = Forest.from_xgboost(booster)
    np.testing.assert_array_equal(f.predict(xu), f.predict(x))
    out = _unaligned(np.zeros(len(x), np.float32))
    with pytest.raises(ValueError, match="out must be aligned"):
        f.predict(x, out=out)


@pytest.mark.parametrize(
    ("obj", "exc", "match"),
    [
        (np.array(["a", "b"]), TypeError, "x must be numeric, got dtype <U1"),
        (np.array([1 + 2j]), TypeError, "x has unsupported dtype complex128"),
        (None, TypeError, "x must be an array, got None"),
        (np.array([object(), 1], dtype=object), TypeError, "x must be numeric"),
    ],
)
def test_bad_arrays_name_the_argument(obj, exc, match):
    with pytest.raises(exc, match=match):
        _testing.describe(obj)


def test_lists_and_buffer_protocol():
    assert _testing.sum([1, 2, 3]) == 6.0
    assert _testing.sum(memoryview(np.arange(4, dtype=np.int32))) == 6.0


@st.composite
def _finite_arrays(draw):
    dtype = np.dtype(
        draw(st.sampled_from(["int8", "uint16", "int64", "float16", "float32", "float64"]))
    )
    bounds = {} if dtype.kind in "iu" else {"min_value": -1e4, "max_value": 1e4}
    elements = hnp.from_dtype(dtype, allow_nan=False, allow_infinity=False, **bounds)
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=6))
    return draw(hnp.arrays(dtype=dtype, shape=shape, elements=elements))


@given(_finite_arrays())
def test_sum_matches_numpy(a):
    expected = float(a.astype(np.float64).sum())
    assert _testing.sum(a) == pytest.approx(expected, rel=1e-9, abs=1e-9)


def test_torch_cpu_tensor_zero_copy():
    torch = pytest.importorskip("torch")
    for dt in (torch.float32, torch.float16, torch.int64, torch.uint8, torch.bool):
        t = torch.ones(3, 5, dtype=dt)
        d = _testing.describe(t)
        assert d["data"] == t.data_ptr()
        assert d["shape"] == [3, 5]
    t = torch.arange(12, dtype=torch.float32, requires_grad=True)
    assert _testing.describe(t)["data"] == t.data_ptr()
    with pytest.raises(TypeError, match=r"x has unsupported dtype torch\.bfloat16"):
        _testing.describe(torch.ones(2, dtype=torch.bfloat16))


def test_torch_cuda_tensor_is_refused_with_clear_error():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        # A meta tensor stands in for a non-CPU device here.
        t = torch.empty(3, device="meta")
        with pytest.raises(ValueError, match="x must be a CPU tensor here, got a tensor on 'meta'"):
            _testing.describe(t)


def test_arrow_zero_copy():
    pa = pytest.importorskip("pyarrow")
    arr = pa.array(np.arange(100, dtype=np.float32))
    d = _testing.describe(arr)
    assert d["data"] == arr.buffers()[1].address
    chunked = pa.chunked_array([arr])
    assert _testing.describe(chunked)["data"] == arr.buffers()[1].address
    # several chunks are combined (one copy)
    two = pa.chunked_array([arr, arr])
    assert _testing.sum(two) == 2 * float(np.arange(100).sum())
    buf = pa.py_buffer(b"\x01\x02\x03")
    assert _testing.describe(buf)["data"] == buf.address
    assert _testing.sum(buf) == 6.0


def test_arrow_nulls_and_types():
    pa = pytest.importorskip("pyarrow")
    f = pa.array([1.0, None, 3.0])
    assert np.isnan(_testing.sum(f))
    with pytest.raises(ValueError, match="x has 1 null values in a non-floating Arrow column"):
        _testing.describe(pa.array([1, None, 3]))
    with pytest.raises(TypeError, match="x has Arrow type string"):
        _testing.describe(pa.array(["a", "b"]))
    dict_arr = pa.array(["a", "b", "a"]).dictionary_encode()
    assert _testing.describe(dict_arr)["shape"] == [3]  # loads as its integer codes
    assert _testing.sum(pa.array([True, False, True])) == 2.0


def test_owned_array_outlives_everything():
    a = _testing.owned_arange(1000)
    gc.collect()
    assert a.flags.owndata is False and a.base is not None
    np.testing.assert_array_equal(a, np.arange(1000, dtype=np.float64))
    view = a[10:20]
    del a
    gc.collect()
    np.testing.assert_array_equal(view, np.arange(10, 20, dtype=np.float64))


# ------------------------------------------------------------------ thread pool


@pytest.fixture
def restore_threads():
    n = fastml.get_num_threads()
    yield
    fastml.set_num_threads(n)


@pytest.mark.parametrize("threads", [1, 2, 3, 5])
@pytest.mark.parametrize(("n", "grain"), [(0, 1), (1, 1), (7, 1), (1000, 3), (10_000, 10_000)])
def test_parallel_for_covers_each_index_once(restore_threads, threads, n, grain):
    fastml.set_num_threads(threads)
    assert fastml.get_num_threads() == threads
    counts, used = _testing.parallel_cover(n, grain)
    assert counts.shape == (n,)
    assert (counts == 1).all()
    assert used <= threads


def test_parallel_for_uses_several_threads(restore_threads):
    fastml.set_num_threads(2)
    _, used = _testing.parallel_cover(64, 1)
    assert used == 2


@pytest.mark.parametrize("bad", [0, -1])
def test_set_num_threads_rejects_bad_values(bad):
    with pytest.raises(ValueError, match=f"num_threads must be >= 1, got {bad}"):
        fastml.set_num_threads(bad)


def test_set_num_threads_rejects_non_int():
    with pytest.raises(TypeError, match="n must be an int"):
        fastml.set_num_threads(2.5)  # type: ignore[arg-type]


def test_pool_from_many_python_threads_at_once(restore_threads):
    fastml.set_num_threads(2)
    errors = []

    def work():
        try:
            for _ in range(20):
                counts, _ = _testing.parallel_cover(200, 7)
                assert (counts == 1).all()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors


def test_gil_is_released_during_native_work():
    # Each call blocks (GIL released) until two calls are inside native code at
    # once; with the GIL held the first would time out before the second began.
    _testing.reset_rendezvous()
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(_testing.rendezvous(10.0))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True, True]


def test_pool_survives_fork(restore_threads):
    code = (
        "import os, fastml\n"
        "from fastml._core import _testing\n"
        "_testing.parallel_cover(100, 1)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    c, _ = _testing.parallel_cover(100, 1)\n"
        "    os._exit(0 if (c == 1).all() else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "raise SystemExit(os.waitstatus_to_exitcode(status))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


# ------------------------------------------------------------------ CLI


def test_cli_info_text():
    r = subprocess.run(
        [sys.executable, "-m", "fastml", "info"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0, r.stderr
    for word in (
        "fastml",
        "compiler",
        "cuda compiled in",
        "cpu",
        "cores",
        "memory",
        "gpu",
        "numpy",
    ):
        assert word in r.stdout


def test_cli_info_json():
    r = subprocess.run(
        [sys.executable, "-m", "fastml", "info", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["fastml"]["version"] == fastml.__version__
    assert info["cpu"]["logical_cores"] >= 1
    assert info["memory_bytes"] > 0
    assert isinstance(info["gpus"], list)
    assert info["packages"]["numpy"] == np.__version__


def test_cli_requires_a_command():
    r = subprocess.run(
        [sys.executable, "-m", "fastml"], capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 2
    assert "usage" in r.stderr


def test_console_script_installed():
    import shutil

    exe = shutil.which("fastml")
    if exe is None:
        pytest.skip("fastml console script is not on PATH (source-tree run)")
    r = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and fastml.__version__ in r.stdout
