"""fastml.infer.Batcher's contract under load (issue #15).

- submit() and predict_async() never run a Python handler on the caller's
  thread (unless inline=True, and never on an event loop's thread); a stalled
  model cannot stall submit(), so QueueFull and deadlines hold for every
  max_delay_us, 0 included;
- the event loop keeps running while a batch runs;
- one row in (without its batch dimension), one answer out;
- every request ends exactly once and the counters add up
  (requests == completed + errors + timeouts + cancellations, rejections apart)
  under handler errors, wrong outputs, cancellation races, close with 10k
  requests in flight, and submits from 16 threads and several event loops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from fastml import _core, infer

WAIT = 30.0


def counters_add_up(b: infer.Batcher) -> dict:
    s = b.stats()
    assert s["queued"] == 0 and s["in_flight"] == 0, s
    assert s["requests"] == s["completed"] + s["errors"] + s["timeouts"] + s["cancellations"], s
    return s


def settle(futs) -> None:
    """Wait until every future ended (any outcome)."""
    for f in futs:
        try:
            f.exception(WAIT)
        except concurrent.futures.CancelledError:
            pass


def outcome(f: infer.BatchFuture) -> str:
    assert f.done()
    if f.cancelled():
        return "cancelled"
    e = f.exception()
    if e is None:
        return "completed"
    return "timeout" if isinstance(e, TimeoutError) else "error"


# ---------------------------------------------------------------- a stalled model


@pytest.mark.parametrize("delay_us", [0, 100])
def test_stalled_model_never_stalls_submit(delay_us):
    gate = threading.Event()
    b = infer.Batcher(
        lambda x: (gate.wait(WAIT), x)[1], max_batch_size=1, max_delay_us=delay_us, max_queue=4
    )
    t0 = time.perf_counter()
    accepted, full = [], 0
    for _ in range(50):
        try:
            accepted.append(b.submit(np.zeros((1, 1), np.float32), timeout_us=200_000))
        except infer.QueueFull:
            full += 1
    assert time.perf_counter() - t0 < 5.0  # was 50 x the model's time with max_delay_us=0
    # One batch started, max_queue=4 more accepted; the rest refused.
    assert 4 <= len(accepted) <= 5 and full == 50 - len(accepted)
    time.sleep(0.4)  # past the deadlines of the requests that never started
    gate.set()
    settle(accepted)
    outcomes = [outcome(f) for f in accepted]
    assert outcomes.count("completed") == 1 and outcomes.count("timeout") == len(accepted) - 1
    b.close()
    s = counters_add_up(b)
    assert s["rejections"] == full and s["timeouts"] == len(accepted) - 1


def test_workers_bound_concurrency():
    running, peak, lock = [0], [0], threading.Lock()
    gate = threading.Event()

    def fn(x):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        gate.wait(WAIT)
        with lock:
            running[0] -= 1
        return x

    with infer.Batcher(fn, max_batch_size=1, max_delay_us=0, workers=3) as b:
        futs = [b.submit(np.ones(1)) for _ in range(10)]
        deadline = time.monotonic() + WAIT
        while b.stats()["in_flight"] < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)
        s = b.stats()
        assert s["in_flight"] == 3 and s["queued"] == 7
        gate.set()
        for f in futs:
            f.result(WAIT)
    assert peak[0] == 3


# ---------------------------------------------------------------- asyncio


def test_event_loop_keeps_running_during_a_batch():
    async def main():
        b = infer.Batcher(lambda x: (time.sleep(0.2), x)[1], max_delay_us=0, inline=True)
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        t = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        await b.predict_async(np.ones((1, 2), np.float32))
        # inline=True, but this thread runs an event loop: submit() must not run it here.
        f = b.submit(np.ones((1, 2), np.float32))
        assert not f.done()
        while not f.done():
            await asyncio.sleep(0.01)
        t.cancel()
        s = b.stats()
        b.close()
        return ticks, s

    ticks, s = asyncio.run(main())
    assert ticks >= 15  # ~40 possible in 0.4 s; 0 when the model ran on the loop
    assert s["inline_batches"] == 0


def test_predict_on_an_event_loop_thread_runs_on_a_worker():
    me = []

    def fn(x):
        me.append(threading.get_ident())
        return x

    async def main():
        with infer.Batcher(fn, max_delay_us=0) as b:
            b.predict(np.ones(1))  # a blocking call in a coroutine: still not on this thread
            return b.stats()["inline_batches"]

    assert asyncio.run(main()) == 0 and me[0] != threading.get_ident()


# ---------------------------------------------------------------- one row in, one answer out


def test_one_row_in_one_answer_out_native_and_python():
    xgb = pytest.importorskip("xgboost")
    rng = np.random.default_rng(0)
    X = rng.random((200, 30)).astype(np.float32)
    y = (X[:, 0] > 0.5).astype(float)
    f = infer.Forest.from_xgboost(
        xgb.train(
            {"objective": "binary:logistic", "max_depth": 3, "nthread": 1}, xgb.DMatrix(X, y), 3
        )
    )
    want = f.predict(X[:5])
    assert f.predict(X[0]) == want[0]  # Forest.predict answers one row the same way
    with infer.Batcher(f, max_delay_us=200) as b:
        assert b.row_ndim == 1
        futs = [b.submit(X[i]) for i in range(5)] + [b.submit(X[0:2])]
        for i in range(5):
            assert np.ndim(futs[i].result(WAIT)) == 0 and futs[i].result() == want[i]
        np.testing.assert_array_equal(futs[5].result(WAIT), want[:2])
        assert b.predict(X[3]) == want[3]
    with pytest.raises(ValueError, match="row_ndim=2 disagrees"):
        infer.Batcher(f, row_ndim=2)

    def model(x):  # a Python model of 3 features -> 2 outputs per row
        return np.stack([x.sum(axis=1), x.max(axis=1)], axis=1)

    with infer.Batcher(model, row_ndim=1, max_delay_us=200) as b:
        one = b.submit(np.array([1.0, 2.0, 3.0]))
        many = b.submit(np.ones((2, 3)))
        np.testing.assert_array_equal(one.result(WAIT), [6.0, 3.0])
        np.testing.assert_array_equal(many.result(WAIT), [[3.0, 1.0], [3.0, 1.0]])
    with infer.Batcher(lambda x: {"s": x["a"] + x["b"]}, row_ndim=1) as b:
        r = b.predict({"a": np.ones(2), "b": np.ones(2)})
        np.testing.assert_array_equal(r["s"], [2.0, 2.0])
        with pytest.raises(ValueError, match="disagree on whether the request is one row"):
            b.submit({"a": np.ones(2), "b": np.ones((1, 2))})


def test_one_row_torch():
    torch = pytest.importorskip("torch")
    with infer.Batcher(lambda x: x.sum(dim=1), row_ndim=1) as b:
        r = b.predict(torch.ones(4))
        assert isinstance(r, torch.Tensor) and r.ndim == 0 and r.item() == 4.0


# ---------------------------------------------------------------- the fault matrix


class FaultyModel:
    """Doubles its input; batches whose first value is chosen fail: raise (10%),
    return a row too few, or return a wrong type."""

    def __call__(self, x):
        key = int(x.reshape(-1)[0]) % 20
        if key in (0, 1):
            raise RuntimeError("handler failed on purpose")
        if key == 2:
            return x[:-1] * 2 if len(x) > 1 else np.ones((0, *x.shape[1:]))
        if key == 3:
            return "not an array"
        return x * 2


def test_every_request_ends_exactly_once_under_faults():
    b = infer.Batcher(
        FaultyModel(), max_batch_size=8, max_delay_us=50, workers=2, max_queue=100_000
    )
    futures: list[infer.BatchFuture] = []
    callbacks: list[int] = []
    lock = threading.Lock()
    cancelled_by_us = []

    def on_done(f):
        with lock:
            callbacks.append(id(f))

    def submitter(k):
        rng = np.random.default_rng(k)
        mine = []
        for i in range(400):
            f = b.submit(
                np.full((int(rng.integers(1, 4)), 2), float(k * 1000 + i)),
                timeout_us=int(rng.choice([1_000_000, 200])),
            )
            f.add_done_callback(on_done)
            if i % 7 == 0:
                cancelled_by_us.append(f.cancel())  # races with dispatch
            mine.append(f)
        with lock:
            futures.extend(mine)

    threads = [threading.Thread(target=submitter, args=(k,)) for k in range(16)]

    async def loop_client(k):
        async def one(i):
            try:
                return await b.predict_async(np.full((1, 2), float(50_000 + k * 1000 + i)))
            except Exception:
                return None

        await asyncio.gather(*(one(i) for i in range(200)))

    loops = [threading.Thread(target=lambda k=k: asyncio.run(loop_client(k))) for k in range(3)]
    for t in threads + loops:
        t.start()
    for t in threads + loops:
        t.join(120)
        assert not t.is_alive()
    settle(futures)
    b.close()
    s = counters_add_up(b)
    got = {k: 0 for k in ("completed", "error", "timeout", "cancelled")}
    for f in futures:
        got[outcome(f)] += 1
    async_requests = 3 * 200
    assert s["requests"] == len(futures) + async_requests
    assert got["cancelled"] == s["cancellations"] and got["timeout"] == s["timeouts"]
    assert got["completed"] + got["error"] <= s["completed"] + s["errors"]
    assert got["error"] > 0 and got["completed"] > 0
    # Each future's done callback ran exactly once.
    assert len(callbacks) == len(futures) == len(set(callbacks))
    # Errors say what went wrong.
    msgs = {str(f.exception()) for f in futures if outcome(f) == "error"}
    assert any("handler failed on purpose" in m for m in msgs)
    assert any("rows for a batch of" in m for m in msgs)
    assert any("must be an array" in m for m in msgs)


@pytest.mark.parametrize("drain", [True, False])
def test_close_with_10k_requests_in_flight(drain):
    b = infer.Batcher(
        lambda x: x + 1, max_batch_size=32, max_delay_us=0, workers=2, max_queue=20_000
    )
    futs = [b.submit(np.full((1, 1), float(i))) for i in range(10_000)]
    closer = threading.Thread(target=b.close, kwargs={"drain": drain})
    closer.start()
    closer.join(120)
    assert not closer.is_alive()
    assert all(f.done() for f in futs)
    s = counters_add_up(b)
    assert s["requests"] == 10_000
    if drain:
        assert s["completed"] == 10_000
        assert futs[-1].result() == 10_000.0
    else:
        assert s["errors"] == sum(isinstance(f.exception(), RuntimeError) for f in futs)
        with pytest.raises(RuntimeError, match="closed"):
            b.submit(np.ones((1, 1)))


def test_native_handler_faults_and_counters():
    # Batches of exactly 3 rows come back a row short: those requests fail, the
    # batcher keeps serving the rest.
    handler = _core._BatcherTestHandler(bad_rows=3)
    with infer.Batcher(handler, max_batch_size=3, max_delay_us=0) as b:
        outs = []
        for n in (1, 3, 2, 3, 1):
            f = b.submit(np.ones((n, 1), np.float32))
            settle([f])
            outs.append(outcome(f))
    assert outs == ["completed", "error", "completed", "error", "completed"]
    s = counters_add_up(b)
    assert s["errors"] == 2 and s["failed_batches"] == 2


def test_a_result_is_counted_before_its_future_ends():
    # stats() is exact the moment a caller sees its result (no settling wait).
    for native in (False, True):
        fn = _core._BatcherTestHandler() if native else (lambda x: x)
        with infer.Batcher(fn, max_batch_size=4, max_delay_us=100) as b:
            for round_ in range(1, 6):
                futs = [b.submit(np.ones((1, 1), np.float32)) for _ in range(8)]
                for f in futs:
                    f.result(WAIT)
                s = b.stats()
                assert s["completed"] == 8 * round_ and s["rows"] == 8 * round_, s


_EXIT_SCRIPT = """
import asyncio
import numpy as np
from fastml import infer

b = infer.Batcher(lambda x: x * 2, max_batch_size=8, max_delay_us=0)

async def main():
    xs = [np.full((1, 3), i, np.float32) for i in range(64)]
    out = await asyncio.gather(*(b.predict_async(x) for x in xs))
    assert all((o == 2 * x).all() for o, x in zip(out, xs))

asyncio.run(main())
b.close()
try:
    infer.Forest.from_bytes(b"not a forest")
except ValueError:
    pass
print("ok")
"""


def test_the_interpreter_exits_cleanly_after_async_use():
    """Process exit after predict_async and the exception mapping: no static
    Python object may be released after the interpreter has finalised (was:
    SIGSEGV at exit on Python 3.12 from cached attribute names)."""
    r = subprocess.run(
        [sys.executable, "-c", _EXIT_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ),
    )
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert r.stdout.strip() == "ok"


def test_predict_async_from_several_loops_and_threads():
    """Each call resolves on its own loop with its own value: loops running at
    once on several threads, and loops run one after another on one thread
    (predict_async remembers the last loop and must notice when it changed)."""
    b = infer.Batcher(lambda x: x * 2, max_batch_size=16, max_delay_us=0)
    errors: list[BaseException] = []

    async def client(k: int) -> None:
        loop = asyncio.get_running_loop()
        xs = [np.full((1, 2), float(k * 1000 + i)) for i in range(150)]
        out = await asyncio.gather(*(b.predict_async(x) for x in xs))
        for x, o in zip(xs, out, strict=True):
            np.testing.assert_array_equal(o, 2 * x)
        assert asyncio.get_running_loop() is loop

    def run(k: int) -> None:
        try:
            asyncio.run(client(k))
        except BaseException as e:  # reported on the main thread
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for k in range(10, 13):  # new loops on this thread, one after another
        run(k)
    for t in threads:
        t.join(60)
        assert not t.is_alive()
    assert not errors, errors
    b.close()
    assert b.stats()["completed"] == 7 * 150
