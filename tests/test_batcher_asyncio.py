"""Batcher.predict_async's native waiter under asyncio's rules.

predict_async awaits a native asyncio-compatible future (fastml._core._BatcherWaiter)
that the loop's bridge resolves by running each task's wake-up directly in
one loop callback per group. These tests hold it to what asyncio.Future
guarantees a task: cancellation at once (also while the batch runs),
contextvars and the current task after the await, wait_for / shield /
timeouts, eager tasks, loops that do not record their thread (uvloop), a loop
closed with requests in flight, and the future protocol itself.
"""

from __future__ import annotations

import asyncio
import contextvars
import gc
import threading
import time
import weakref

import numpy as np
import pytest

from fastml import _core, infer

WAIT = 10.0


def gated(gate: threading.Event, started: threading.Event | None = None):
    def fn(x):
        if started is not None:
            started.set()
        assert gate.wait(WAIT), "test gate never opened"
        return x * 2

    return fn


async def until(cond, what: str) -> None:
    end = time.monotonic() + WAIT
    while not cond():
        assert time.monotonic() < end, what
        await asyncio.sleep(0.002)


def test_cancel_while_the_batch_runs_returns_at_once():
    """A task cancelled while its request runs ends at once with CancelledError;
    the request still completes (it had started) and is counted as completed."""
    gate = threading.Event()
    started = threading.Event()

    async def main(b):
        t = asyncio.ensure_future(b.predict_async(np.array([1.0])))
        await until(started.is_set, "the batch never started")
        t.cancel("stop")
        with pytest.raises(asyncio.CancelledError):
            await t
        assert t.cancelled()
        gate.set()
        assert (await b.predict_async(np.array([3.0])))[0] == 6.0
        await until(lambda: b.stats()["completed"] == 2, "the first request never ended")

    with infer.Batcher(gated(gate, started), max_batch_size=1, max_delay_us=0) as b:
        asyncio.run(main(b))
        s = b.stats()
    assert s["requests"] == s["completed"] == 2
    assert s["cancellations"] == 0


def test_the_task_keeps_its_context_and_identity_across_the_await():
    var: contextvars.ContextVar[int] = contextvars.ContextVar("var", default=-1)

    async def client(b, i):
        var.set(i)
        me = asyncio.current_task()
        for _ in range(5):
            out = await b.predict_async(np.array([float(i)]))
            assert out[0] == 2.0 * i
            assert var.get() == i  # the wake-up ran in this task's context
            assert asyncio.current_task() is me
            var.set(i)  # set after the await: must not leak into another task
        return i

    async def main(b):
        assert var.get() == -1
        done = await asyncio.gather(*(client(b, i) for i in range(64)))
        assert done == list(range(64))
        assert var.get() == -1

    for handler in (lambda x: x * 2, None):
        fn = handler or _core._BatcherTestHandler()
        with infer.Batcher(fn, max_batch_size=16, max_delay_us=0) as b:
            if handler is None:

                async def native_main(b=b):
                    async def one(i):
                        var.set(i)
                        out = await b.predict_async(np.full((1, 2), float(i), np.float32))
                        assert var.get() == i
                        return float(out[0, 0])

                    outs = await asyncio.gather(*(one(i) for i in range(64)))
                    assert outs == [2.0 * i for i in range(64)]

                asyncio.run(native_main())
            else:
                asyncio.run(main(b))


def test_wait_for_timeout_shield_and_timeout_context():
    gate = threading.Event()

    async def main(b):
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(b.predict_async(np.array([1.0])), 0.05)
        shielded = asyncio.ensure_future(b.predict_async(np.array([2.0])))
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(shielded), 0.05)
        assert not shielded.done()
        if hasattr(asyncio, "timeout"):  # Python >= 3.11
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.05):
                    await b.predict_async(np.array([3.0]))
        gate.set()
        assert (await shielded)[0] == 4.0
        assert (await b.predict_async(np.array([5.0])))[0] == 10.0

    with infer.Batcher(gated(gate), max_batch_size=1, max_delay_us=0) as b:
        asyncio.run(main(b))
        s = b.stats()
    assert s["requests"] == s["completed"] + s["cancellations"] + s["errors"] + s["timeouts"]


FACTORIES = [None] + (
    [asyncio.eager_task_factory] if hasattr(asyncio, "eager_task_factory") else []
)


@pytest.mark.parametrize("factory", FACTORIES, ids=lambda f: "default" if f is None else "eager")
def test_task_factories(factory):
    async def main(b):
        if factory is not None:
            asyncio.get_running_loop().set_task_factory(factory)
        tasks = [asyncio.create_task(b.predict_async(np.array([float(i)]))) for i in range(100)]
        outs = await asyncio.gather(*tasks)
        assert [o[0] for o in outs] == [2.0 * i for i in range(100)]

    with infer.Batcher(lambda x: x * 2, max_batch_size=8, max_delay_us=0) as b:
        asyncio.run(main(b))


class NoThreadIdLoop(asyncio.SelectorEventLoop):
    """A loop that does not record its thread (as uvloop's does not)."""

    @property
    def _thread_id(self):  # type: ignore[override]
        return None

    @_thread_id.setter
    def _thread_id(self, value):
        pass


class NoReaderLoop(asyncio.SelectorEventLoop):
    """A loop without add_reader (as Windows' proactor loop): completions reach
    it through call_soon_threadsafe instead of a pipe."""

    def add_reader(self, *args, **kwargs):
        # What asyncio's ProactorEventLoop does: the bridge must fall back.
        raise NotImplementedError("this test loop has no add_reader, like the proactor loop")


def test_a_loop_without_add_reader():
    b = infer.Batcher(lambda x: x * 3, max_batch_size=8, max_delay_us=0)
    native = infer.Batcher(_core._BatcherTestHandler(), max_batch_size=8, max_delay_us=0)

    async def main():
        outs = await asyncio.gather(*(b.predict_async(np.array([float(i)])) for i in range(40)))
        assert [o[0] for o in outs] == [3.0 * i for i in range(40)]
        rows = [np.full((1, 2), float(i), np.float32) for i in range(40)]
        outs = await asyncio.gather(*(native.predict_async(r) for r in rows))
        assert [float(o[0, 0]) for o in outs] == [2.0 * i for i in range(40)]

    loop = NoReaderLoop()
    try:
        for _ in range(2):  # a lost wake-up would hang: bounded
            loop.run_until_complete(asyncio.wait_for(main(), WAIT))
    finally:
        loop.close()
    b.close()
    native.close()


def test_a_loop_without_a_recorded_thread():
    b = infer.Batcher(lambda x: x + 1, max_batch_size=8, max_delay_us=0)

    async def main():
        outs = await asyncio.gather(*(b.predict_async(np.array([float(i)])) for i in range(50)))
        assert [o[0] for o in outs] == [i + 1.0 for i in range(50)]

    loop = NoThreadIdLoop()
    try:
        loop.run_until_complete(main())
        loop.run_until_complete(main())
    finally:
        loop.close()
    # and a plain loop afterwards, on the same batcher
    asyncio.run(main())
    b.close()


@pytest.mark.parametrize("cancel_tasks", [True, False])
def test_a_loop_closed_with_requests_in_flight(cancel_tasks):
    """Closing a loop while its requests run (its tasks cancelled first, or left
    pending) neither crashes nor keeps the loop alive once they end; the
    batcher serves the next loop."""
    gate = threading.Event()
    started = threading.Event()
    b = infer.Batcher(gated(gate, started), max_batch_size=4, max_delay_us=0)
    loop = asyncio.new_event_loop()

    async def start():
        tasks = [asyncio.ensure_future(b.predict_async(np.array([float(i)]))) for i in range(6)]
        assert len(tasks) == 6  # dropped when start() returns: the loop holds them
        await asyncio.sleep(0)
        await asyncio.sleep(0)

    loop.run_until_complete(start())
    assert started.wait(WAIT)
    if cancel_tasks:
        cancelled = [t.cancel() for t in asyncio.all_tasks(loop)]
        assert cancelled == [True] * 6
        loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    ref = weakref.ref(loop)
    del loop
    gate.set()
    end = time.monotonic() + WAIT
    while b.stats()["in_flight"] or b.stats()["queued"]:
        assert time.monotonic() < end
        time.sleep(0.005)

    async def again():
        return await b.predict_async(np.array([7.0]))

    assert asyncio.run(again())[0] == 14.0
    for _ in range(3):
        gc.collect()
    assert ref() is None, "the closed loop is still alive"
    s = b.stats()
    assert s["requests"] == s["completed"] + s["cancellations"] + s["errors"] + s["timeouts"]
    b.close()


def test_predict_async_argument_errors():
    b = infer.Batcher(lambda x: x, max_delay_us=0)

    async def main():
        for _ in range(2):  # the first call finds the loop, the second takes the fast path
            with pytest.raises(TypeError, match="priority must be an int, got str"):
                await b.predict_async(np.array([1.0]), priority="high")
            with pytest.raises(OverflowError):
                await b.predict_async(np.array([1.0]), priority=2**40)
            with pytest.raises(ValueError, match="x must have at least one row"):
                await b.predict_async(np.zeros((0, 3)))
            assert (await b.predict_async(np.array([5.0]), priority=3))[0] == 5.0

    asyncio.run(main())
    s = b.stats()
    assert s["requests"] == s["completed"] == 2
    b.close()


def test_the_waiter_speaks_the_future_protocol():
    """The private waiter object, driven directly: done/result/exception/cancel,
    extra done callbacks (run in order, in their context), remove_done_callback,
    a callback error reported to the loop's exception handler."""
    b = infer.Batcher(lambda x: x * 2, max_batch_size=8, max_delay_us=0)

    async def main():
        loop = asyncio.get_running_loop()
        errors = []
        loop.set_exception_handler(lambda lp, ctx: errors.append(ctx))
        bridge = _core._BatcherAsyncBridge(loop)
        w = bridge.call(b._core, np.array([1.0, 2.0]), 0, -1)
        assert asyncio.isfuture(w)
        assert w.get_loop() is loop
        assert not w.done() and not w.cancelled()
        with pytest.raises(asyncio.InvalidStateError):
            w.result()
        seen = []
        var: contextvars.ContextVar[str] = contextvars.ContextVar("v", default="none")
        var.set("cb1")
        w.add_done_callback(lambda f: seen.append(("cb1", var.get(), f is w)))
        var.set("cb2")

        def bad(f):
            raise ValueError("callback failed on purpose")

        w.add_done_callback(bad)
        w.add_done_callback(lambda f: seen.append(("cb3", var.get(), f is w)))
        dropped = seen.append
        w.add_done_callback(dropped)
        assert w.remove_done_callback(dropped) == 1
        var.set("main")
        out = await w
        np.testing.assert_array_equal(out, [2.0, 4.0])
        assert w.done() and w.exception() is None
        np.testing.assert_array_equal(w.result(), [2.0, 4.0])
        assert not w.cancel()
        assert seen == [("cb1", "cb1", True), ("cb3", "cb2", True)]
        assert len(errors) == 1 and isinstance(errors[0]["exception"], ValueError)
        # a callback added once done is scheduled with call_soon
        late = []
        w.add_done_callback(late.append)
        assert late == []
        await asyncio.sleep(0)
        assert late == [w]
        # cancel before the request runs: the request never runs
        w2 = bridge.call(b._core, np.array([5.0]), 0, -1)
        assert w2.cancel(msg="bye")
        assert w2.cancelled() and w2.done()
        with pytest.raises(asyncio.CancelledError, match="bye"):
            w2.result()
        with pytest.raises(asyncio.CancelledError):
            w2.exception()
        with pytest.raises(TypeError):
            w2.cancel(1, 2)
        with pytest.raises(TypeError):
            w2.add_done_callback(print, nope=1)
        await asyncio.sleep(0.01)
        # errors travel as the handler's exception
        failing = infer.Batcher(lambda x: 1 / 0, max_delay_us=0)
        w3 = bridge.call(failing._core, np.array([1.0]), 0, -1)
        with pytest.raises(ZeroDivisionError):
            await w3
        assert isinstance(w3.exception(), ZeroDivisionError)
        failing.close()

    asyncio.run(main())
    s = b.stats()
    assert s["completed"] == 1 and s["cancellations"] == 0, s
    b.close()
