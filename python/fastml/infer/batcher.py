"""Native dynamic batching: :class:`Batcher` and its helpers.

Requests from many threads or coroutines are queued natively, grouped into
batches by size and deadline, run once through ``fn``, and the results are
handed back to each caller as row slices of the batch's output.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import queue
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from fastml import _core

# The running event loop of this thread, or None (asyncio's C accessor: ~50 ns).
_get_running_loop = asyncio._get_running_loop

__all__ = [
    "ALL_COMPLETED",
    "FIRST_COMPLETED",
    "FIRST_EXCEPTION",
    "BatchFuture",
    "Batcher",
    "QueueFull",
    "as_completed",
    "export_prometheus",
    "wait",
]

#: Raised by :meth:`Batcher.submit` when the queue is full (a ``RuntimeError``).
QueueFull = _core.QueueFull
#: The future that :meth:`Batcher.submit` returns (``concurrent.futures.Future`` interface).
BatchFuture = _core.BatchFuture

FIRST_COMPLETED = concurrent.futures.FIRST_COMPLETED
FIRST_EXCEPTION = concurrent.futures.FIRST_EXCEPTION
ALL_COMPLETED = concurrent.futures.ALL_COMPLETED

_live_batchers: weakref.WeakSet[Batcher] = weakref.WeakSet()


def _check_int(value: Any, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _timeout_arg(timeout_us: int | None, name: str = "timeout_us") -> int:
    if timeout_us is None:
        return -1
    return _check_int(timeout_us, name, 1)


class Batcher:
    """Groups requests into batches and runs ``fn`` once per batch.

    Args:
        fn: called with the concatenated batch (same type as the requests: a
            NumPy array, a torch tensor or a dict of them) and returning an array
            or dict of arrays with one row per input row. A Python callable runs
            with the GIL held; an object with a ``_fastml_native_handler()``
            method (e.g. :class:`fastml.infer.Forest`) runs natively without it.
        max_batch_size: most rows per batch. A request larger than this alone
            runs in chunks of ``max_batch_size`` rows; others are never split.
        max_delay_us: a batch runs when it is full or when its oldest request has
            waited this long (0: as soon as a worker is free).
        max_queue: most requests accepted but not yet started; beyond it
            :meth:`submit` raises :class:`QueueFull` (or blocks, with ``block=True``).
        timeout_us: default deadline of each request; a request whose batch has
            not started by then ends with ``TimeoutError``. None: no deadline.
        workers: batches that may run at once (native worker threads); the rest
            wait in the queue.
        name: the batcher's name in stats, errors and metrics.
        inline: let :meth:`submit` run a batch on the submitting thread when
            ``max_delay_us=0``, nothing is queued and a worker slot is free
            (default False). It saves the hand-off to a worker (a few
            microseconds) but the caller then waits for the model inside
            ``submit``: no :class:`QueueFull`, no timeout, no concurrency from that
            thread. Never done on a thread running an asyncio event loop.
            :meth:`predict`, which blocks for its result anyway, may run a batch
            itself whatever ``inline`` says (also never on an event loop's thread).
        row_ndim: dimensions of one row of input (e.g. 1 for a vector of
            features). A request with exactly that many dimensions is one row
            given without its batch dimension; its answer is one row of the
            output (``out[i]``). None (default): requests always carry rows along
            axis 0. A native handler sets its own (:class:`~fastml.infer.Forest`: 1).
        spin_us: how long an idle worker polls for the next request, and a caller
            waiting in ``result()``/``predict()`` polls for its result, before
            sleeping (default 20). Polling saves a futex wake-up per hand-off (a
            few microseconds of latency) at the cost of that much CPU after each
            batch; 0 sleeps at once (for many batchers on few cores).
    """

    def __init__(
        self,
        fn: Callable[[Any], Any] | Any,
        max_batch_size: int = 64,
        max_delay_us: int = 500,
        max_queue: int = 10_000,
        timeout_us: int | None = None,
        workers: int = 1,
        name: str = "model",
        *,
        inline: bool = False,
        row_ndim: int | None = None,
        spin_us: int = 20,
    ) -> None:
        native = None
        getter = getattr(fn, "_fastml_native_handler", None)
        if getter is not None:
            native = getter()
            if not isinstance(native, _core.NativeHandler):
                raise TypeError(
                    "fn._fastml_native_handler() must return a fastml._core.NativeHandler, "
                    f"got {type(native).__name__}"
                )
        elif not callable(fn):
            raise TypeError(f"fn must be callable, got {type(fn).__name__}")
        if not isinstance(name, str):
            raise TypeError(f"name must be a str, got {type(name).__name__}")
        if not isinstance(inline, bool):
            raise TypeError(f"inline must be a bool, got {type(inline).__name__}")
        if row_ndim is not None:
            _check_int(row_ndim, "row_ndim", 0)
            if native is not None and row_ndim != native.row_ndim:
                raise ValueError(
                    f"row_ndim={row_ndim} disagrees with the native handler's own "
                    f"({native.row_ndim}); leave it as None"
                )
        self._core = _core._BatcherCore(
            fn,
            native,
            _check_int(max_batch_size, "max_batch_size", 1),
            _check_int(max_delay_us, "max_delay_us", 0),
            _check_int(max_queue, "max_queue", 1),
            _timeout_arg(timeout_us),
            _check_int(workers, "workers", 1),
            name,
            -1 if row_ndim is None else row_ndim,
            _check_int(spin_us, "spin_us", 0),
        )
        self._native = native is not None
        self._inline = inline
        # One native bridge per event loop resolves that loop's waiters in groups.
        self._bridges: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Any] = (
            weakref.WeakKeyDictionary()
        )
        # predict_async's call for the loop it last ran on (it holds the loop's
        # bridge, which holds the loop weakly); one attribute, read and written
        # whole, so threads running different loops never pair the wrong two.
        self._caller: Any = None
        _live_batchers.add(self)

    @property
    def name(self) -> str:
        """The batcher's name."""
        return str(self._core.name)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return bool(self._core.closed)

    @property
    def native(self) -> bool:
        """True when ``fn`` runs as a native handler (without the GIL)."""
        return self._native

    @property
    def inline(self) -> bool:
        """True when :meth:`submit` may run a batch on the submitting thread."""
        return self._inline

    @property
    def row_ndim(self) -> int | None:
        """Dimensions of one row of input (None: rows always along axis 0)."""
        n = int(self._core.row_ndim)
        return None if n < 0 else n

    def submit(
        self,
        x: Any,
        *,
        priority: int = 0,
        timeout_us: int | None = None,
        block: bool = False,
        block_timeout: float | None = None,
    ) -> BatchFuture:
        """Queue one request (one or more rows) and return its future at once.

        The model never runs on the calling thread here (unless the batcher was
        made with ``inline=True``): a worker runs the batch, so a full queue
        raises :class:`QueueFull` and deadlines apply while the request waits.

        Args:
            x: an array with rows along axis 0 (NumPy, torch, pyarrow, ...) or a
                dict of such arrays with equal rows. Requests batch together only
                when their dtype and trailing shape match; nothing is cast.
            priority: higher levels are batched first; earliest deadline first
                within a level.
            timeout_us: this request's deadline (None: the batcher's default).
            block: when the queue is full, wait for room instead of raising
                :class:`QueueFull` (the GIL is released while waiting).
            block_timeout: most seconds to wait with ``block=True`` (None: no limit).

        Raises:
            QueueFull: the queue is full (and ``block`` is false or timed out).
            RuntimeError: the batcher is closed.
            ValueError, TypeError: ``x`` cannot be batched.
        """
        if block_timeout is not None and not (block_timeout >= 0):
            raise ValueError(f"block_timeout must be >= 0 or None, got {block_timeout}")
        return self._core.submit(
            x,
            priority,
            -1 if timeout_us is None else _timeout_arg(timeout_us),
            block,
            -1.0 if block_timeout is None else float(block_timeout),
            self._inline and _get_running_loop() is None,
        )

    def predict(
        self,
        x: Any,
        *,
        priority: int = 0,
        timeout_us: int | None = None,
        timeout: float | None = None,
    ) -> Any:
        """Submit ``x`` and wait for its result (``timeout`` in seconds, None: no limit).

        As the caller blocks anyway, with ``max_delay_us=0``, nothing queued and
        a worker slot free, the batch runs on the calling thread (not on a thread
        running an asyncio event loop; use :meth:`predict_async` there).
        """
        out = self._core.call(
            x,
            priority,
            -1 if timeout_us is None else _timeout_arg(timeout_us),
            _get_running_loop() is None,
        )
        if type(out) is BatchFuture:  # not done inline: wait for it
            return out.result(timeout)
        return out

    async def predict_async(
        self, x: Any, *, priority: int = 0, timeout_us: int | None = None
    ) -> Any:
        """Submit ``x`` and await its result without a thread per request.

        The model always runs on a worker thread, never on the event loop's.
        Cancelling the awaiting task cancels the request if it has not started.
        """
        t = -1 if timeout_us is None else _timeout_arg(timeout_us)
        # One native call checks and stages the request and returns its waiter,
        # an asyncio-compatible future the loop's bridge resolves (cancelling the
        # awaiting task cancels the waiter, which cancels the request if it has
        # not started). The call returns None when its loop is not the one
        # running on this thread (first use, or another loop).
        caller = self._caller
        waiter = None if caller is None else caller(x, priority, t)
        if waiter is None:
            waiter = self._caller_for_running_loop()(x, priority, t)
        return await waiter

    def _caller_for_running_loop(self) -> Any:
        loop = asyncio.get_running_loop()
        bridge = self._bridges.get(loop)
        if bridge is None:
            bridge = self._bridges[loop] = _core._BatcherAsyncBridge(loop)
        self._caller = caller = bridge.caller(self._core)
        return caller

    def stats(self) -> dict[str, Any]:
        """Counters and latency percentiles.

        Keys: ``requests`` (accepted), ``completed``, ``errors``, ``timeouts``,
        ``cancellations``, ``rejections`` (``QueueFull``), ``batches``,
        ``failed_batches``, ``inline_batches``, ``rows``, ``queued``,
        ``queued_rows``, ``in_flight``, ``closed``, ``batch_size_histogram``
        (``{upper bound in rows: batches}``, powers of two) and ``queue_wait_us`` /
        ``handler_us`` (``p50``, ``p90``, ``p99``, ``max`` over the last 4096
        samples; ``handler_us`` includes a Python handler's wait for the GIL).
        ``requests == completed + errors + timeouts + cancellations +
        (still queued or running)``.
        """
        return dict(self._core.stats())

    def close(self, drain: bool = True) -> None:
        """Stop accepting requests and wait for the workers to finish.

        ``drain=True`` runs what is queued; ``drain=False`` fails it with a
        ``RuntimeError``. Batches already running always finish. Idempotent.
        """
        self._core.close(drain)

    def __enter__(self) -> Batcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close(drain=True)

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<fastml.infer.Batcher {self.name!r} {state}>"


def _done_future_state(fs: Iterable[BatchFuture]) -> list[BatchFuture]:
    return list(dict.fromkeys(fs))


def wait(
    fs: Iterable[BatchFuture], timeout: float | None = None, return_when: str = ALL_COMPLETED
) -> concurrent.futures._base.DoneAndNotDoneFutures[Any]:
    """Like :func:`concurrent.futures.wait`, for :class:`BatchFuture` objects.

    (``concurrent.futures.wait`` reaches into the private state of its own
    Future class, so it cannot wait on other future types.)
    """
    futures = _done_future_state(fs)
    if return_when not in (ALL_COMPLETED, FIRST_COMPLETED, FIRST_EXCEPTION):
        raise ValueError(
            f"return_when must be ALL_COMPLETED, FIRST_COMPLETED or FIRST_EXCEPTION, got {return_when!r}"
        )

    def satisfied() -> bool:
        done = [f for f in futures if f.done()]
        if return_when == ALL_COMPLETED:
            return len(done) == len(futures)
        if return_when == FIRST_COMPLETED:
            return bool(done) or not futures
        errored = any(not f.cancelled() and f.exception() is not None for f in done)
        return errored or len(done) == len(futures)

    if not satisfied():
        event = threading.Event()
        for f in futures:
            f.add_done_callback(lambda _f: event.set())
        deadline = None if timeout is None else _now() + timeout
        while not satisfied():
            left = None if deadline is None else deadline - _now()
            if left is not None and left <= 0:
                break
            event.wait(left)
            event.clear()
    done = {f for f in futures if f.done()}
    return concurrent.futures._base.DoneAndNotDoneFutures(done, set(futures) - done)


def as_completed(fs: Iterable[BatchFuture], timeout: float | None = None) -> Iterator[BatchFuture]:
    """Like :func:`concurrent.futures.as_completed`, for :class:`BatchFuture` objects.

    Yields each future as it ends; raises ``TimeoutError`` if some have not
    ended ``timeout`` seconds after the call.
    """
    futures = _done_future_state(fs)
    deadline = None if timeout is None else _now() + timeout
    finished: queue.SimpleQueue[BatchFuture] = queue.SimpleQueue()
    for f in futures:
        f.add_done_callback(finished.put)
    for n in range(len(futures)):
        left = None if deadline is None else max(0.0, deadline - _now())
        try:
            yield finished.get(timeout=left)
        except queue.Empty:
            raise TimeoutError(
                f"{len(futures) - n} (of {len(futures)}) futures unfinished"
            ) from None


def _now() -> float:
    return time.monotonic()


# ---------------------------------------------------------------- Prometheus

_collectors: weakref.WeakKeyDictionary[Any, _BatchersCollector] = weakref.WeakKeyDictionary()
_collectors_lock = threading.Lock()


class _BatchersCollector:
    """One prometheus-client collector per registry, for every exported batcher."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.batchers: weakref.WeakSet[Batcher] = weakref.WeakSet()

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import (
            CounterMetricFamily,
            GaugeMetricFamily,
            HistogramMetricFamily,
        )

        p = self.prefix
        counters = {
            "requests": "requests accepted",
            "completed": "requests ended with a result",
            "errors": "requests ended with an error",
            "timeouts": "requests that timed out before running",
            "cancellations": "requests cancelled before running",
            "rejections": "submits refused with QueueFull",
            "batches": "batches run",
            "failed_batches": "batches whose handler failed",
            "rows": "rows run",
        }
        families = {
            k: CounterMetricFamily(f"{p}_{k}", f"fastml batcher: {v}", labels=["batcher"])
            for k, v in counters.items()
        }
        gauges = {
            "queued": GaugeMetricFamily(f"{p}_queued", "requests waiting", labels=["batcher"]),
            "in_flight": GaugeMetricFamily(f"{p}_in_flight", "batches running", labels=["batcher"]),
        }
        wait_q = GaugeMetricFamily(
            f"{p}_queue_wait_seconds",
            "queue wait quantiles over recent requests",
            labels=["batcher", "quantile"],
        )
        handler_q = GaugeMetricFamily(
            f"{p}_handler_seconds",
            "handler time quantiles over recent batches",
            labels=["batcher", "quantile"],
        )
        hist = HistogramMetricFamily(f"{p}_batch_size_rows", "rows per batch", labels=["batcher"])
        for b in list(self.batchers):
            s = b.stats()
            label = [s["name"]]
            for k, fam in families.items():
                fam.add_metric(label, s[k])
            for k, fam in gauges.items():
                fam.add_metric(label, s[k])
            for key, fam in (("queue_wait_us", wait_q), ("handler_us", handler_q)):
                for q, name in (("0.5", "p50"), ("0.9", "p90"), ("0.99", "p99")):
                    fam.add_metric([s["name"], q], s[key][name] * 1e-6)
            buckets = []
            cumulative = 0
            for bound in sorted(s["batch_size_histogram"]):
                cumulative += s["batch_size_histogram"][bound]
                buckets.append((str(float(bound)), cumulative))
            buckets.append(("+Inf", cumulative))
            hist.add_metric(label, buckets, sum_value=float(s["rows"]))
        yield from families.values()
        yield from gauges.values()
        yield wait_q
        yield handler_q
        yield hist


def export_prometheus(
    batcher: Batcher, registry: Any = None, prefix: str = "fastml_batcher"
) -> Any:
    """Expose ``batcher.stats()`` through prometheus-client.

    Registers (once per registry) a collector that reads the stats of every
    exported batcher at scrape time, labelled ``batcher=<name>``: counters
    ``<prefix>_requests_total`` ... ``_rows_total``, gauges ``_queued`` and
    ``_in_flight``, quantile gauges ``_queue_wait_seconds`` and
    ``_handler_seconds``, and a ``_batch_size_rows`` histogram. Returns the collector.
    """
    if not isinstance(batcher, Batcher):
        raise TypeError(f"batcher must be a fastml.infer.Batcher, got {type(batcher).__name__}")
    if registry is None:
        from prometheus_client import REGISTRY

        registry = REGISTRY
    with _collectors_lock:
        collector = _collectors.get(registry)
        if collector is None or collector.prefix != prefix:
            collector = _BatchersCollector(prefix)
            registry.register(collector)
            _collectors[registry] = collector
        collector.batchers.add(batcher)
    return collector


@atexit.register
def _close_live_batchers() -> None:
    # Worker threads must not outlive the interpreter.
    for b in list(_live_batchers):
        b.close(drain=False)
