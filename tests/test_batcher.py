"""fastml.infer.Batcher: batching semantics, futures, errors, asyncio, threads, metrics."""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import threading
import time

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fastml import _core, infer

WAIT = 10.0  # seconds: generous bound for anything that should happen "soon"


class Recorder:
    """A handler that records each batch it sees and returns x * 2 (+ a row index column)."""

    def __init__(self, gate: threading.Event | None = None, fail_when=None) -> None:
        self.batches: list = []
        self.gate = gate
        self.fail_when = fail_when
        self.lock = threading.Lock()

    def __call__(self, x):
        if self.gate is not None:
            assert self.gate.wait(WAIT), "test gate never opened"
        with self.lock:
            self.batches.append(x)
        if self.fail_when is not None and self.fail_when(x):
            raise KeyError("handler failed on purpose")
        if isinstance(x, dict):
            return {k: v * 2 for k, v in x.items()}
        return x * 2


def wait_for(cond, timeout=WAIT):
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError("condition not reached")
        time.sleep(0.001)


def rows_of(batches):
    return [len(b) for b in batches]


# ---------------------------------------------------------------- results and batching


@given(
    sizes=st.lists(st.integers(1, 9), min_size=1, max_size=30),
    max_batch=st.integers(1, 16),
    delay=st.sampled_from([0, 50, 2000]),
    dtype=st.sampled_from(["float32", "float64", "int32", "uint8", "bool"]),
)
def test_results_match_per_request_reference(sizes, max_batch, delay, dtype):
    rec = Recorder()
    rng = np.random.default_rng(len(sizes) * 31 + max_batch)
    xs = [(rng.random((n, 3)) * 10).astype(dtype) for n in sizes]
    with infer.Batcher(rec, max_batch_size=max_batch, max_delay_us=delay) as b:
        futs = [b.submit(x) for x in xs]
        outs = [f.result(WAIT) for f in futs]
    for x, out in zip(xs, outs, strict=True):
        np.testing.assert_array_equal(out, x * 2)
        assert out.dtype == (x * 2).dtype
    # A request is never split unless it alone exceeds max_batch_size.
    seen = sum(rows_of(rec.batches))
    assert seen == sum(sizes)
    for batch in rec.batches:
        assert len(batch) <= max_batch
    whole = [n for n in sizes if n <= max_batch]
    chunks = sum(-(-n // max_batch) for n in sizes if n > max_batch)
    assert len(rec.batches) <= len(whole) + chunks
    s = b.stats()
    assert s["requests"] == len(sizes) == s["completed"]
    assert s["errors"] == s["timeouts"] == s["cancellations"] == 0
    assert s["rows"] == sum(sizes)
    assert sum(s["batch_size_histogram"].values()) == s["batches"]


def test_batch_forms_when_full_before_the_deadline():
    rec = Recorder()
    with infer.Batcher(rec, max_batch_size=4, max_delay_us=60_000_000) as b:
        futs = [b.submit(np.full((1, 2), i, np.float32)) for i in range(4)]
        for i, f in enumerate(futs):
            np.testing.assert_array_equal(f.result(WAIT), np.full((1, 2), 2 * i))
    assert rows_of(rec.batches) == [4]


def test_batch_forms_at_the_deadline_when_not_full():
    rec = Recorder()
    with infer.Batcher(rec, max_batch_size=100, max_delay_us=2000) as b:
        futs = [b.submit(np.ones((1, 2))) for _ in range(3)]
        for f in futs:
            f.result(WAIT)
    assert rows_of(rec.batches) == [3]


def test_requests_are_never_split_and_oversized_ones_run_in_chunks():
    rec = Recorder()
    with infer.Batcher(rec, max_batch_size=5, max_delay_us=60_000_000) as b:
        a = b.submit(np.arange(3.0))
        c = b.submit(np.arange(3.0, 6.0))
        big = b.submit(np.arange(12.0))
        b.close(drain=True)
    np.testing.assert_array_equal(a.result(), np.arange(3.0) * 2)
    np.testing.assert_array_equal(c.result(), np.arange(3.0, 6.0) * 2)
    np.testing.assert_array_equal(big.result(), np.arange(12.0) * 2)
    assert sorted(rows_of(rec.batches)) == sorted([3, 3, 5, 5, 2])


def test_where_batches_run():
    """submit() hands the batch to a worker unless inline=True; predict() may run it
    on the calling thread, which blocks anyway (issue #15's contract)."""
    thread_ids = []

    def fn(x):
        thread_ids.append(threading.get_ident())
        return x

    me = threading.get_ident()
    with infer.Batcher(fn, max_delay_us=0) as b:
        assert not b.inline
        f = b.submit(np.ones(2))
        f.result(WAIT)
        assert thread_ids[-1] != me and b.stats()["inline_batches"] == 0
        b.predict(np.ones(2))
        assert thread_ids[-1] == me and b.stats()["inline_batches"] == 1
    with infer.Batcher(fn, max_delay_us=0, inline=True) as b:
        assert b.inline
        f = b.submit(np.ones(2))
        assert f.done() and thread_ids[-1] == me and b.stats()["inline_batches"] == 1
    with infer.Batcher(fn, max_delay_us=100, inline=True) as b:
        # With a delay, waiting may form a larger batch: never inline.
        b.submit(np.ones(2)).result(WAIT)
        assert thread_ids[-1] != me and b.stats()["inline_batches"] == 0
    with pytest.raises(TypeError, match="inline must be a bool"):
        infer.Batcher(fn, inline=1)


def test_dtype_and_trailing_shape_mismatches_batch_separately():
    rec = Recorder()
    reqs = [
        np.ones((1, 2), np.float32),
        np.ones((1, 2), np.float64),
        np.ones((1, 3), np.float32),
        np.ones((2, 2), np.float32),
        np.ones((1, 2), np.float64),
    ]
    with infer.Batcher(rec, max_batch_size=64, max_delay_us=60_000_000) as b:
        futs = [b.submit(x) for x in reqs]
        b.close(drain=True)
    for x, f in zip(reqs, futs, strict=True):
        out = f.result()
        assert out.dtype == x.dtype and out.shape == x.shape
    kinds = sorted((str(x.dtype), x.shape[1:], len(x)) for x in rec.batches)
    assert kinds == [("float32", (2,), 3), ("float32", (3,), 1), ("float64", (2,), 2)]


def test_dict_requests_concatenate_per_key_and_split_back():
    rec = Recorder()
    reqs = [{"a": np.full((n, 2), n, np.float32), "b": np.arange(n)} for n in (1, 2, 3)]
    with infer.Batcher(rec, max_batch_size=64, max_delay_us=60_000_000) as b:
        futs = [b.submit(r) for r in reqs]
        # same keys in another order join the same batch
        swapped = b.submit({"b": np.arange(2), "a": np.zeros((2, 2), np.float32)})
        b.close(drain=True)
    for r, f in zip(reqs, futs, strict=True):
        out = f.result()
        assert set(out) == {"a", "b"}
        np.testing.assert_array_equal(out["a"], r["a"] * 2)
        np.testing.assert_array_equal(out["b"], r["b"] * 2)
    np.testing.assert_array_equal(swapped.result()["b"], np.arange(2) * 2)
    assert rows_of([x["a"] for x in rec.batches]) == [8]


def test_torch_requests_stay_torch():
    torch = pytest.importorskip("torch")
    seen = []

    def fn(x):
        seen.append(type(x))
        return x + 1

    with infer.Batcher(fn, max_batch_size=8, max_delay_us=60_000_000) as b:
        futs = [b.submit(torch.full((n, 3), float(n))) for n in (1, 2, 3)]
        b.close(drain=True)
    for n, f in zip((1, 2, 3), futs, strict=True):
        out = f.result()
        assert isinstance(out, torch.Tensor)
        torch.testing.assert_close(out, torch.full((n, 3), float(n) + 1))
    assert seen == [torch.Tensor]


def test_results_are_views_of_the_batch_output():
    with infer.Batcher(lambda x: x + 0, max_batch_size=8, max_delay_us=60_000_000) as b:
        futs = [b.submit(np.ones((2, 2))) for _ in range(4)]
        b.close(drain=True)
    outs = [f.result() for f in futs]
    assert outs[0].base is not None and all(o.base is outs[0].base for o in outs)


# ---------------------------------------------------------------- errors


def test_handler_error_goes_to_every_request_of_the_batch_and_serving_continues():
    rec = Recorder(fail_when=lambda x: bool((x < 0).any()))
    with infer.Batcher(rec, max_batch_size=3, max_delay_us=60_000_000) as b:
        bad = [b.submit(np.array([v])) for v in (1.0, -1.0, 2.0)]
        good = [b.submit(np.array([v])) for v in (1.0, 2.0, 3.0)]
        for f in bad:
            with pytest.raises(KeyError, match="on purpose"):
                f.result(WAIT)
            assert isinstance(f.exception(), KeyError)
        for v, f in zip((1.0, 2.0, 3.0), good, strict=True):
            np.testing.assert_array_equal(f.result(WAIT), [2 * v])
    s = b.stats()
    assert s["errors"] == 3 and s["completed"] == 3 and s["failed_batches"] == 1


def test_wrong_row_count_fails_the_batch_clearly():
    with infer.Batcher(lambda x: x[:-1], max_batch_size=4, max_delay_us=60_000_000) as b:
        futs = [b.submit(np.ones(1)) for _ in range(4)]
        for f in futs:
            with pytest.raises(ValueError, match="has 3 rows for a batch of 4 rows"):
                f.result(WAIT)
        # dicts are checked per key
        b2 = infer.Batcher(lambda x: {"y": x["a"], "z": x["a"][:1]}, max_delay_us=0)
        with pytest.raises(ValueError, match=r"\['z'\] has 1 rows for a batch of 2"):
            b2.predict({"a": np.ones(2)})
        b3 = infer.Batcher(lambda x: [1, 2], max_delay_us=0)
        with pytest.raises(TypeError, match="must be an array"):
            b3.predict(np.ones(2))
        b2.close()
        b3.close()


@pytest.mark.parametrize(
    ("x", "exc", "match"),
    [
        (np.float64(1.0), ValueError, "x must have a leading row dimension"),
        (np.ones((0, 3)), ValueError, "x must have at least one row"),
        ({}, ValueError, "x must be a non-empty dict"),
        ({"a": np.ones(2), "b": np.ones(3)}, ValueError, r"x\['b'\] has 3 rows but x\['a'\] has 2"),
        ({1: np.ones(2)}, TypeError, "x dict keys must be str"),
        (None, TypeError, "x must be an array"),
    ],
)
def test_bad_requests_fail_at_submit(x, exc, match):
    with infer.Batcher(lambda x: x) as b:
        with pytest.raises(exc, match=match):
            b.submit(x)
        assert b.stats()["requests"] == 0


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"max_batch_size": 0}, ValueError, "max_batch_size must be >= 1, got 0"),
        ({"max_delay_us": -1}, ValueError, "max_delay_us must be >= 0"),
        ({"max_queue": 0}, ValueError, "max_queue must be >= 1"),
        ({"timeout_us": 0}, ValueError, "timeout_us must be >= 1"),
        ({"workers": 0}, ValueError, "workers must be >= 1"),
        ({"workers": 1.5}, TypeError, "workers must be an int, got float"),
        ({"max_batch_size": True}, TypeError, "max_batch_size must be an int"),
        ({"name": 3}, TypeError, "name must be a str"),
    ],
)
def test_bad_arguments(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        infer.Batcher(lambda x: x, **kwargs)


def test_fn_must_be_callable_or_native():
    with pytest.raises(TypeError, match="fn must be callable, got int"):
        infer.Batcher(3)

    class Fake:
        def _fastml_native_handler(self):
            return 42

    with pytest.raises(TypeError, match=r"must return a fastml\._core\.NativeHandler"):
        infer.Batcher(Fake())


# ---------------------------------------------------------------- timeouts, cancellation, queue


def test_timeout_fails_queued_requests_without_running_them():
    gate = threading.Event()
    rec = Recorder(gate=gate)
    with infer.Batcher(rec, max_batch_size=1, max_delay_us=1, timeout_us=60_000_000) as b:
        first = b.submit(np.array([1.0]))  # occupies the only worker
        wait_for(lambda: first.running())
        late = b.submit(np.array([2.0]), timeout_us=1000)
        kept = b.submit(np.array([3.0]))
        with pytest.raises(TimeoutError, match="timed out in batcher 'model'"):
            late.result(WAIT)
        assert isinstance(late.exception(), TimeoutError)
        assert not late.cancel() and not late.cancelled()
        gate.set()
        np.testing.assert_array_equal(kept.result(WAIT), [6.0])
        first.result(WAIT)
    assert all(2.0 not in x for x in rec.batches)
    assert b.stats()["timeouts"] == 1


def test_cancelled_requests_do_not_run():
    gate = threading.Event()
    rec = Recorder(gate=gate)
    with infer.Batcher(rec, max_batch_size=1, max_delay_us=1) as b:
        first = b.submit(np.array([1.0]))
        wait_for(lambda: first.running())
        assert not first.cancel() and first.running()
        victim = b.submit(np.array([2.0]))
        assert victim.cancel() and victim.cancelled() and victim.done()
        assert victim.cancel()  # idempotent
        with pytest.raises(concurrent.futures.CancelledError):
            victim.result()
        with pytest.raises(concurrent.futures.CancelledError):
            victim.exception()
        gate.set()
        first.result(WAIT)
        assert not first.cancel()
    assert all(2.0 not in x for x in rec.batches)
    s = b.stats()
    assert s["cancellations"] == 1 and s["completed"] == 1 and s["queued"] == 0


def test_queue_full_fails_fast_or_blocks():
    gate = threading.Event()
    rec = Recorder(gate=gate)
    b = infer.Batcher(rec, max_batch_size=1, max_delay_us=1, max_queue=2)
    first = b.submit(np.array([0.0]))
    wait_for(lambda: first.running())
    queued = [b.submit(np.array([1.0])), b.submit(np.array([2.0]))]
    with pytest.raises(infer.QueueFull, match="queue is full") as info:
        b.submit(np.array([3.0]))
    assert isinstance(info.value, RuntimeError)
    assert infer.QueueFull is _core.QueueFull
    with pytest.raises(infer.QueueFull, match="stayed full"):
        b.submit(np.array([3.0]), block=True, block_timeout=0.01)
    results = []
    t = threading.Thread(target=lambda: results.append(b.submit(np.array([4.0]), block=True)))
    t.start()
    time.sleep(0.01)
    gate.set()
    t.join(WAIT)
    assert not t.is_alive()
    np.testing.assert_array_equal(results[0].result(WAIT), [8.0])
    for f in queued:
        f.result(WAIT)
    assert b.stats()["rejections"] == 2
    b.close()


def test_close_drain_runs_queued_work_and_no_drain_fails_it():
    with infer.Batcher(lambda x: x * 2, max_batch_size=64, max_delay_us=60_000_000) as b:
        futs = [b.submit(np.ones(1)) for _ in range(5)]
    assert b.closed
    assert all(f.result(0) == 2 for f in futs)
    with pytest.raises(RuntimeError, match="batcher 'model' is closed"):
        b.submit(np.ones(1))

    b = infer.Batcher(lambda x: x, max_batch_size=64, max_delay_us=60_000_000, name="m2")
    futs = [b.submit(np.ones(1)) for _ in range(5)]
    b.close(drain=False)
    for f in futs:
        with pytest.raises(RuntimeError, match="closed with drain=False"):
            f.result(0)
        assert "drain=False" in str(f.exception())
    b.close()  # idempotent
    s = b.stats()
    assert s["errors"] == 5 and s["closed"] and s["queued"] == 0


def test_priorities_first_then_earliest_deadline():
    gate = threading.Event()
    rec = Recorder(gate=gate)
    with infer.Batcher(rec, max_batch_size=1, max_delay_us=1) as b:
        first = b.submit(np.array([0.0]))
        wait_for(lambda: first.running())
        b.submit(np.array([1.0]), priority=0)
        b.submit(np.array([2.0]), priority=0, timeout_us=60_000_000)
        b.submit(np.array([3.0]), priority=5, timeout_us=50_000_000)
        b.submit(np.array([4.0]), priority=5, timeout_us=40_000_000)
        b.submit(np.array([5.0]), priority=-1)
        gate.set()
    order = [float(x[0]) for x in rec.batches]
    # level 5 by deadline, then level 0 (deadline before no deadline), then -1
    assert order == [0.0, 4.0, 3.0, 2.0, 1.0, 5.0]


# ---------------------------------------------------------------- futures


def test_future_interface_and_callbacks():
    gate = threading.Event()
    with infer.Batcher(Recorder(gate=gate), max_delay_us=1) as b:
        f = b.submit(np.ones(2))
        assert isinstance(f, infer.BatchFuture)
        calls = []
        f.add_done_callback(lambda fut: calls.append(fut))
        with pytest.raises(TimeoutError, match="did not complete within"):
            f.result(timeout=0.01)
        assert not f.done()
        gate.set()
        np.testing.assert_array_equal(f.result(WAIT), [2.0, 2.0])
        assert f.exception() is None
        wait_for(lambda: len(calls) == 1)
        assert calls[0] is f
        late = []
        f.add_done_callback(late.append)  # already done: runs now
        assert late == [f]
        assert "finished" in repr(f)
        with pytest.raises(TypeError, match="fn must be callable"):
            f.add_done_callback(3)


def test_wait_and_as_completed():
    gate = threading.Event()
    rec = Recorder(gate=gate)
    with infer.Batcher(rec, max_batch_size=1, max_delay_us=1) as b:
        futs = [b.submit(np.array([float(i)])) for i in range(5)]
        done, not_done = infer.wait(futs, timeout=0.01)
        assert not done and len(not_done) == 5
        gate.set()
        done, not_done = infer.wait(futs, timeout=WAIT, return_when=infer.FIRST_COMPLETED)
        assert done
        got = [float(f.result()[0]) for f in infer.as_completed(futs, timeout=WAIT)]
        assert sorted(got) == [0.0, 2.0, 4.0, 6.0, 8.0]
        done, not_done = infer.wait(futs)
        assert len(done) == 5 and not not_done
    with pytest.raises(ValueError, match="return_when"):
        infer.wait([], return_when="sometime")


def test_as_completed_times_out():
    gate = threading.Event()
    with infer.Batcher(Recorder(gate=gate), max_delay_us=1) as b:
        f = b.submit(np.ones(1))
        with pytest.raises(TimeoutError, match="1 \\(of 1\\) futures unfinished"):
            list(infer.as_completed([f], timeout=0.01))
        gate.set()


def test_first_exception_returns_on_error():
    with infer.Batcher(Recorder(fail_when=lambda x: True), max_delay_us=0) as b:
        f = b.submit(np.ones(1))
        done, _ = infer.wait([f], return_when=infer.FIRST_EXCEPTION)
        assert f in done


# ---------------------------------------------------------------- native handler


def test_native_handler_runs_batches_without_the_gil():
    handler = _core._BatcherTestHandler(gated=True)
    with infer.Batcher(handler, max_batch_size=8, max_delay_us=0) as b:
        assert b.native
        results = []
        t = threading.Thread(target=lambda: results.append(b.predict(np.ones((2, 3), np.float32))))
        t.start()
        # The handler holds thread t inside native code; this thread still runs Python.
        wait_for(lambda: handler.calls == 1)
        handler.open_gate()
        t.join(WAIT)
    np.testing.assert_array_equal(results[0], np.full((2, 3), 2.0, np.float32))


@given(sizes=st.lists(st.integers(1, 7), min_size=1, max_size=20), max_batch=st.integers(1, 10))
def test_native_handler_results_match_reference(sizes, max_batch):
    handler = _core._BatcherTestHandler()
    xs = [np.arange(n * 2, dtype=np.float32).reshape(n, 2) + i for i, n in enumerate(sizes)]
    with infer.Batcher(handler, max_batch_size=max_batch, max_delay_us=100) as b:
        futs = [b.submit(x) for x in xs]
        for x, f in zip(xs, futs, strict=True):
            out = f.result(WAIT)
            np.testing.assert_array_equal(out, x * 2)
            assert out.dtype == np.float32


def test_native_handler_checks_inputs_and_rows():
    with infer.Batcher(_core._BatcherTestHandler(), max_delay_us=0) as b:
        with pytest.raises(TypeError, match="x must be float32, got 2-D float64"):
            b.submit(np.ones((2, 2)))
        with pytest.raises(TypeError, match="x must be"):
            b.submit({"a": np.ones(2, np.float32)})
        # non-contiguous input is made contiguous
        x = np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2]
        np.testing.assert_array_equal(b.predict(x), x * 2)
    with infer.Batcher(_core._BatcherTestHandler(bad_rows=3), max_delay_us=0) as b:
        with pytest.raises(ValueError, match="has 2 rows for a batch of 3 rows"):
            b.predict(np.ones((3, 1), np.float32))


# ---------------------------------------------------------------- threads and asyncio


def test_many_threads_submit_concurrently():
    calls = []

    def fn(x):
        calls.append(len(x))
        return x + 1

    with infer.Batcher(fn, max_batch_size=16, max_delay_us=200, workers=2) as b:

        def client(k):
            out = []
            for i in range(300):
                v = float(k * 1000 + i)
                out.append((v, b.submit(np.array([v]))))
            return [(v, f.result(WAIT)) for v, f in out]

        with concurrent.futures.ThreadPoolExecutor(4) as ex:
            for res in ex.map(client, range(4)):
                for v, out in res:
                    assert out[0] == v + 1
    s = b.stats()
    assert s["requests"] == s["completed"] == 1200 == sum(calls)


def test_predict_async_many_coroutines():
    def fn(x):
        return x * 3

    async def main(b):
        xs = [np.array([float(i)]) for i in range(500)]
        outs = await asyncio.gather(*(b.predict_async(x) for x in xs))
        for x, out in zip(xs, outs, strict=True):
            np.testing.assert_array_equal(out, x * 3)

    for delay in (0, 300):
        with infer.Batcher(fn, max_batch_size=32, max_delay_us=delay) as b:
            asyncio.run(main(b))
            assert b.stats()["completed"] == 500


def test_predict_async_propagates_errors_and_cancels_queued_work():
    gate = threading.Event()
    rec = Recorder(gate=gate, fail_when=lambda x: bool((x < 0).any()))

    async def main(b):
        first = asyncio.ensure_future(b.predict_async(np.array([1.0])))
        await asyncio.sleep(0)
        victim = asyncio.ensure_future(b.predict_async(np.array([2.0])))
        await asyncio.sleep(0.01)
        victim.cancel()
        with pytest.raises(asyncio.CancelledError):
            await victim
        gate.set()
        assert (await first)[0] == 2.0
        with pytest.raises(KeyError, match="on purpose"):
            await b.predict_async(np.array([-1.0]))

    with infer.Batcher(rec, max_batch_size=1, max_delay_us=1) as b:
        asyncio.run(main(b))
    assert all(2.0 not in x for x in rec.batches)
    assert b.stats()["cancellations"] == 1


def test_predict_async_queues_one_loop_iteration_as_one_group():
    """Requests made in one iteration of the loop are queued together: a native
    handler sees them as one batch, not as a race of single requests."""
    handler = _core._BatcherTestHandler(0, True)  # gated: the first batch waits

    async def main(b):
        xs = [np.full((1, 2), float(i), np.float32) for i in range(48)]
        tasks = [asyncio.ensure_future(b.predict_async(x)) for x in xs]
        await asyncio.sleep(0.05)  # every task staged and the group queued
        assert b.stats()["requests"] == 48
        handler.open_gate()
        outs = await asyncio.gather(*tasks)
        for x, out in zip(xs, outs, strict=True):
            np.testing.assert_array_equal(out, 2 * x)

    with infer.Batcher(handler, max_batch_size=64, max_delay_us=0) as b:
        asyncio.run(main(b))
        s = b.stats()
    assert s["completed"] == 48
    assert s["batches"] == 1  # one group, one batch


def test_predict_async_cancelled_before_it_is_queued_is_never_counted():
    calls: list[int] = []

    def fn(x):
        calls.append(len(x))
        return x

    async def main(b):
        t = asyncio.ensure_future(b.predict_async(np.array([1.0])))
        await asyncio.sleep(0)  # the request is checked and staged, not queued yet
        t.cancel()
        with pytest.raises(asyncio.CancelledError):
            await t
        assert (await b.predict_async(np.array([2.0])))[0] == 2.0

    with infer.Batcher(fn, max_delay_us=0) as b:
        asyncio.run(main(b))
        s = b.stats()
    assert calls == [1]
    assert s["requests"] == s["completed"] == 1
    assert s["cancellations"] == 0


def test_predict_async_queue_full_and_closed_raise_at_await():
    """A full queue and a closed batcher fail the request; its await raises."""
    gate = threading.Event()
    b = infer.Batcher(Recorder(gate=gate), max_batch_size=1, max_delay_us=0, max_queue=2)

    async def main():
        first = asyncio.ensure_future(b.predict_async(np.array([0.0])))
        end = time.monotonic() + WAIT
        while b.stats()["in_flight"] != 1:  # running: it holds the only worker
            assert time.monotonic() < end, "the first request never started"
            await asyncio.sleep(0.005)
        group = [asyncio.ensure_future(b.predict_async(np.array([float(i)]))) for i in range(5)]
        await asyncio.sleep(0.05)  # queued together: 2 accepted, 3 refused
        refused = [t for t in group if t.done()]
        assert len(refused) == 3
        for t in refused:
            with pytest.raises(infer.QueueFull, match="max_queue=2"):
                t.result()
        gate.set()
        assert (await first)[0] == 0.0
        await asyncio.gather(*(t for t in group if t not in refused))

    asyncio.run(main())
    s = b.stats()
    assert s["rejections"] == 3
    assert s["requests"] == s["completed"] == 3
    b.close()

    async def closed():
        with pytest.raises(RuntimeError, match="closed"):
            await b.predict_async(np.array([1.0]))

    asyncio.run(closed())


def test_blocking_predict_releases_the_gil_for_the_worker():
    # predict() waits without the GIL, so the Python handler can run on the worker.
    with infer.Batcher(lambda x: x - 1, max_delay_us=100) as b:
        assert b.predict(np.array([5.0]), timeout=WAIT)[0] == 4.0


def test_futures_and_inputs_are_released():
    import weakref

    class Tracked(np.ndarray):
        pass

    with infer.Batcher(lambda x: np.asarray(x) * 0, max_delay_us=100) as b:
        x = np.ones(3).view(Tracked)
        ref = weakref.ref(x)
        f = b.submit(x)
        del x
        f.result(WAIT)
        del f
        gc.collect()
        assert ref() is None


# ---------------------------------------------------------------- observability


def test_stats_and_prometheus_export():
    prometheus_client = pytest.importorskip("prometheus_client")
    registry = prometheus_client.CollectorRegistry()
    with infer.Batcher(lambda x: x, max_batch_size=4, max_delay_us=100, name="m1") as b1:
        with infer.Batcher(lambda x: x, max_delay_us=0, name="m2") as b2:
            infer.export_prometheus(b1, registry=registry)
            infer.export_prometheus(b2, registry=registry)
            for f in [b1.submit(np.ones(1)) for _ in range(8)]:
                f.result(WAIT)
            b2.predict(np.ones(3))
            s = b1.stats()
            assert s["requests"] == 8 and s["rows"] == 8
            assert s["queue_wait_us"]["p50"] >= 0 and s["handler_us"]["max"] > 0
            assert set(s["queue_wait_us"]) == {"p50", "p90", "p99", "max"}
            text = prometheus_client.generate_latest(registry).decode()
    assert 'fastml_batcher_requests_total{batcher="m1"} 8.0' in text
    assert 'fastml_batcher_requests_total{batcher="m2"} 1.0' in text
    assert 'fastml_batcher_batch_size_rows_count{batcher="m1"}' in text
    assert 'fastml_batcher_queue_wait_seconds{batcher="m1",quantile="0.99"}' in text
    with pytest.raises(TypeError, match=r"batcher must be a fastml\.infer\.Batcher"):
        infer.export_prometheus(object(), registry=registry)


def test_batcher_dropped_from_its_own_callback_does_not_crash():
    holder = {}
    done = threading.Event()

    def drop(_fut):
        holder.clear()  # the last reference to the batcher goes away on its worker
        done.set()

    gate = threading.Event()
    b = infer.Batcher(Recorder(gate=gate), max_delay_us=1)
    holder["b"] = b
    f = b.submit(np.ones(1))
    f.add_done_callback(drop)  # registered before the batch can finish
    del b
    gate.set()
    assert done.wait(WAIT)
    np.testing.assert_array_equal(f.result(WAIT), [2.0])
    gc.collect()


def test_close_without_drain_from_a_python_thread():
    # close(drain=False) releases the failed requests' inputs on the closing thread.
    b = infer.Batcher(lambda x: x, max_batch_size=64, max_delay_us=60_000_000)
    futs = [b.submit(np.ones(1)) for _ in range(3)]
    t = threading.Thread(target=b.close, kwargs={"drain": False})
    t.start()
    t.join(WAIT)
    assert not t.is_alive()
    assert all(isinstance(f.exception(), RuntimeError) for f in futs)


def test_predict_paths_and_argument_checks():
    with infer.Batcher(Recorder(fail_when=lambda x: bool((x < 0).any())), max_delay_us=0) as b:
        assert b.predict(np.array([1.0]))[0] == 2.0  # inline
        with pytest.raises(KeyError, match="on purpose"):
            b.predict(np.array([-1.0]))
        with pytest.raises(ValueError, match="block_timeout must be >= 0"):
            b.submit(np.ones(1), block=True, block_timeout=-1)
        with pytest.raises(ValueError, match="timeout_us must be >= 1"):
            b.predict(np.ones(1), timeout_us=0)
        assert "open" in repr(b) and b.name == "model"
    assert "closed" in repr(b)
    gate = threading.Event()
    with infer.Batcher(Recorder(gate=gate), max_delay_us=1) as b:
        with pytest.raises(TimeoutError, match="did not complete"):
            b.predict(np.ones(1), timeout=0.01)  # a wait limit: the request stays queued
        gate.set()
        assert b.predict(np.ones(1), timeout=WAIT)[0] == 2.0
