"""fastml.infer.Batcher: added latency, submit throughput and asyncio throughput.

Run: ``python benchmarks/infer/bench_batcher.py [--quick] [--json PATH]``

Measured with a no-op handler (it returns its input; in Python, and natively
with ``_BatcherTestHandler``, which doubles float32 input) and ``max_delay_us=0``:

1. added latency: submit-to-result time minus the handler's own time, from one
   Python thread (p50 / p99 over many calls), on the path requests take under
   load: ``submit(x).result()`` hands the batch to a worker thread and waits.
   ``predict()`` on an idle batcher runs the batch on the calling thread (it
   blocks anyway): reported as its own row, not as the headline;
2. submit throughput from one Python thread: N single-row ``submit`` calls,
   then every result (each batch runs on a worker), next to the cost of creating
   and resolving a plain ``concurrent.futures.Future`` (what a hand-rolled
   batcher pays per request);
3. ``predict_async`` against the usual asyncio batching pattern (an asyncio
   queue, a gather task and futures, as Ray Serve's ``@serve.batch`` does, which
   runs the model on the event loop's thread), both driven by the same client
   code; fastml runs the model on a worker thread. The ceiling is that client
   code awaiting futures that are already done; the floor is the least an
   asyncio batcher can do per request (``MinimalAsyncBatcher``: a list, one
   flush per loop iteration, no queue and no thread), which bounds what any
   implementation can reach against the pattern with a model that costs nothing;
4. the same clients with a real model (an XGBoost-trained ``Forest``): the
   pattern runs it on the loop, fastml on a worker without the GIL.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import statistics
import time
from typing import Any

import numpy as np

from fastml import _core, infer
from fastml.bench.baselines import AsyncQueueBatcher, MinimalAsyncBatcher, drive_clients
from fastml.bench.harness import compare, table


def noop(x: Any) -> Any:
    return x


# ---------------------------------------------------------------- 1. added latency


def _quantiles(samples: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(samples, n=100)
    return q[49], q[98]


def added_latency(n: int) -> dict[str, float]:
    handler_ns = [0]
    perf = time.perf_counter_ns

    def timed(x: Any) -> Any:
        t0 = perf()
        out = x
        handler_ns[0] = perf() - t0
        return out

    x = np.ones((1, 4), np.float32)
    out: dict[str, float] = {}

    def measure(call: Any, key: str, handler_time: bool) -> None:
        for _ in range(n // 10):  # warm-up
            call()
        samples = []
        for _ in range(n):
            t0 = perf()
            call()
            t1 = perf()
            samples.append((t1 - t0 - (handler_ns[0] if handler_time else 0)) / 1e3)
        out[f"{key}_p50_us"], out[f"{key}_p99_us"] = _quantiles(samples)

    with infer.Batcher(timed, max_batch_size=64, max_delay_us=0) as b:
        submit, predict = b.submit, b.predict
        measure(lambda: submit(x).result(), "worker", True)
        measure(lambda: predict(x), "inline_predict", True)
    with infer.Batcher(_core._BatcherTestHandler(), max_batch_size=64, max_delay_us=0) as b:
        submit = b.submit
        measure(lambda: submit(x).result(), "worker_native", False)
    # The same for a direct call, to show what timing itself costs.
    measure(lambda: timed(x), "direct", True)
    return out


# ---------------------------------------------------------------- 2. submit throughput


def submit_throughput(n: int, repeat: int) -> dict[str, Any]:
    x = np.ones((1, 4), np.float32)
    # All n requests are submitted before any result is read: room for them.
    b = infer.Batcher(noop, max_batch_size=64, max_delay_us=0, max_queue=n + 1)
    nb = infer.Batcher(
        _core._BatcherTestHandler(), max_batch_size=64, max_delay_us=0, max_queue=n + 1
    )

    def run(batcher: infer.Batcher) -> None:
        submit = batcher.submit
        futs = [submit(x) for _ in range(n)]
        for f in futs:
            f.result()

    def plain_future() -> None:
        # What any Python batcher pays per request for a concurrent.futures.Future.
        for _ in range(n):
            f: concurrent.futures.Future[Any] = concurrent.futures.Future()
            f.set_result(x)
            f.result()

    t = compare(
        {
            "fastml submit + results (Python handler)": lambda: run(b),
            "fastml submit + results (native handler)": lambda: run(nb),
            "concurrent.futures.Future only": plain_future,
        },
        repeat=repeat,
        work=n,
        unit="req",
    )
    b.close()
    nb.close()
    return t


# ---------------------------------------------------------------- 3. asyncio


def asyncio_throughput(tasks: int, per_task: int, repeat: int) -> dict[str, Any]:
    loop = asyncio.new_event_loop()

    async def make_pattern() -> AsyncQueueBatcher:
        return AsyncQueueBatcher(noop)

    pattern = loop.run_until_complete(make_pattern())

    async def make_minimal() -> MinimalAsyncBatcher:
        return MinimalAsyncBatcher(noop)

    minimal = loop.run_until_complete(make_minimal())
    fastml_b = infer.Batcher(noop, max_batch_size=64, max_delay_us=0)
    fastml_delay = infer.Batcher(noop, max_batch_size=64, max_delay_us=50)
    fastml_native = infer.Batcher(_core._BatcherTestHandler(), max_batch_size=64, max_delay_us=0)

    async def done_future(x: Any) -> Any:
        fut = loop.create_future()
        fut.set_result(x)
        return await fut

    candidates = {
        "ceiling: await done futures": lambda: loop.run_until_complete(
            drive_clients(done_future, tasks, per_task)
        ),
        "fastml predict_async (delay 0)": lambda: loop.run_until_complete(
            drive_clients(fastml_b.predict_async, tasks, per_task)
        ),
        "fastml predict_async (delay 50us)": lambda: loop.run_until_complete(
            drive_clients(fastml_delay.predict_async, tasks, per_task)
        ),
        "fastml predict_async (native, delay 0)": lambda: loop.run_until_complete(
            drive_clients(fastml_native.predict_async, tasks, per_task)
        ),
        "floor: minimal asyncio batcher (no queue)": lambda: loop.run_until_complete(
            drive_clients(minimal.predict, tasks, per_task)
        ),
        "asyncio queue + gather task": lambda: loop.run_until_complete(
            drive_clients(pattern.predict, tasks, per_task)
        ),
    }
    t = compare(candidates, repeat=repeat, work=tasks * per_task, unit="req")
    pattern.close()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    fastml_b.close()
    fastml_delay.close()
    fastml_native.close()
    return t


def forest_asyncio_throughput(tasks: int, per_task: int, repeat: int, quick: bool) -> Any:
    """The same clients against a real model: an XGBoost-trained Forest (100 trees
    of depth 6 with --quick, else 500 of depth 8; 32 features), run by the
    pattern on the event loop's thread and by fastml on a worker (natively,
    without the GIL). None when xgboost is not installed."""
    from fastml.bench.components import _xgb_model

    made = _xgb_model(quick)
    if made is None:
        return None
    booster, X = made
    forest = infer.Forest.from_xgboost(booster)
    x = np.ascontiguousarray(X[:1])
    loop = asyncio.new_event_loop()

    async def make_pattern() -> AsyncQueueBatcher:
        return AsyncQueueBatcher(forest.predict)

    pattern = loop.run_until_complete(make_pattern())
    fastml_b = infer.Batcher(forest, max_batch_size=64, max_delay_us=0)
    candidates = {
        "fastml predict_async (Forest, delay 0)": lambda: loop.run_until_complete(
            drive_clients(fastml_b.predict_async, tasks, per_task, x)
        ),
        "asyncio queue + gather task (Forest)": lambda: loop.run_until_complete(
            drive_clients(pattern.predict, tasks, per_task, x)
        ),
    }
    t = compare(candidates, repeat=repeat, work=tasks * per_task, unit="req")
    pattern.close()
    loop.run_until_complete(asyncio.sleep(0))
    loop.close()
    fastml_b.close()
    return t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests (a smoke run)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = ap.parse_args()
    n = 20_000 if args.quick else 200_000
    repeat = 3 if args.quick else 7

    lat = added_latency(n)
    print("added latency from one thread, no-op handler, max_delay_us=0 (p50 / p99, us)")
    print(
        f"  worker hand-off, submit().result(), Python handler  "
        f"{lat['worker_p50_us']:.2f} / {lat['worker_p99_us']:.2f}   (goal <= 10 / 50)\n"
        f"  worker hand-off, submit().result(), native handler  "
        f"{lat['worker_native_p50_us']:.2f} / {lat['worker_native_p99_us']:.2f}\n"
        f"  predict() inline on an idle batcher                 "
        f"{lat['inline_predict_p50_us']:.2f} / {lat['inline_predict_p99_us']:.2f}\n"
        f"  timing a direct call                                "
        f"{lat['direct_p50_us']:.2f} / {lat['direct_p99_us']:.2f}"
    )
    print()
    sub = submit_throughput(n // 2, repeat)
    print(table(sub, baseline="concurrent.futures.Future only", title="submit from one thread"))
    print()
    tasks, per_task = (64, 20) if args.quick else (256, 40)
    aio = asyncio_throughput(tasks, per_task, repeat)
    print(
        table(
            aio,
            baseline="asyncio queue + gather task",
            title=f"asyncio: {tasks} client tasks x {per_task} awaits",
        )
    )
    faio = forest_asyncio_throughput(tasks, per_task, repeat, args.quick)
    if faio is not None:
        print()
        print(
            table(
                faio,
                baseline="asyncio queue + gather task (Forest)",
                title=f"asyncio with a real model (XGBoost-trained Forest): {tasks} x {per_task}",
            )
        )
    ceiling = aio["ceiling: await done futures"].median
    share = ceiling / aio["fastml predict_async (delay 0)"].median
    base_share = ceiling / aio["asyncio queue + gather task"].median
    print(f"fastml predict_async reaches {share:.0%} of the ceiling; the pattern {base_share:.0%}")
    if args.json:
        out = {
            "added_latency_us": lat,
            "submit": {k: v.to_dict() for k, v in sub.items()},
            "asyncio": {k: v.to_dict() for k, v in aio.items()},
            "asyncio_forest": {k: v.to_dict() for k, v in (faio or {}).items()},
            "asyncio_share_of_ceiling": share,
        }
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
