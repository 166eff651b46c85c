"""Peer implementations that fastml is measured against when the peer is a
pattern rather than a package (shared by ``benchmarks/`` and ``fastml bench``)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import numpy as np


class AsyncQueueBatcher:
    """The usual asyncio batching pattern: an ``asyncio.Queue`` of (input,
    future) pairs and one task that gathers what is queued into a batch, runs
    the handler and resolves the futures (as Ray Serve's ``@serve.batch`` does).
    Create it inside a running event loop."""

    def __init__(self, fn: Callable[[Any], Any], max_batch_size: int = 64) -> None:
        self.fn = fn
        self.max_batch_size = max_batch_size
        self.queue: asyncio.Queue[tuple[Any, asyncio.Future[Any]]] = asyncio.Queue()
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def predict(self, x: Any) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self.queue.put_nowait((x, fut))
        return await fut

    async def _run(self) -> None:
        while True:
            items = [await self.queue.get()]
            while len(items) < self.max_batch_size and not self.queue.empty():
                items.append(self.queue.get_nowait())
            xs = [x for x, _ in items]
            batch = xs[0] if len(xs) == 1 else np.concatenate(xs)
            out = self.fn(batch)
            start = 0
            for x, fut in items:
                if not fut.done():
                    fut.set_result(out[start : start + len(x)])
                start += len(x)

    def close(self) -> None:
        self.task.cancel()


class MinimalAsyncBatcher:
    """The least an asyncio batcher can do per request, as a floor for the
    comparison: a plain function that appends (input, future) to a list and
    schedules one flush per loop iteration, which runs the handler on the loop
    and resolves the futures. No queue, no coroutine frame, no thread; not a
    usable server (no backpressure, deadlines or batch limit). Create it
    inside a running event loop."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn = fn
        self.loop = asyncio.get_running_loop()
        self.items: list[tuple[Any, asyncio.Future[Any]]] = []

    def _flush(self) -> None:
        items, self.items = self.items, []
        xs = [x for x, _ in items]
        out = self.fn(xs[0] if len(xs) == 1 else np.concatenate(xs))
        start = 0
        for x, fut in items:
            if not fut.done():
                fut.set_result(out[start : start + len(x)])
            start += len(x)

    def predict(self, x: Any) -> asyncio.Future[Any]:
        fut = self.loop.create_future()
        if not self.items:
            self.loop.call_soon(self._flush)
        self.items.append((x, fut))
        return fut


async def drive_clients(
    predict: Callable[[Any], Awaitable[Any]], tasks: int, per_task: int, x: Any = None
) -> None:
    """The same client for every candidate: ``tasks`` coroutines, each awaiting
    ``per_task`` single-row predictions (``x``; default a 1 x 4 float32 row)
    one after another."""
    if x is None:
        x = np.ones((1, 4), np.float32)

    async def one() -> None:
        for _ in range(per_task):
            await predict(x)

    await asyncio.gather(*(one() for _ in range(tasks)))
