"""Batcher stress: many threads, random cancellations and timeouts, failing batches.

Every submitted request must end exactly once (result, error, cancellation or
timeout), nothing may deadlock, and memory must stay flat.
"""

from __future__ import annotations

import concurrent.futures
import os
import random
import threading

import numpy as np
import pytest

from fastml import infer


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def run_stress(total: int, threads: int = 8, window: int = 64, seed: int = 0) -> dict:
    failing = random.Random(seed)
    lock = threading.Lock()

    def handler(x):
        with lock:
            fail = failing.random() < 0.01
        if fail:
            raise ArithmeticError("1% of batches fail")
        return x

    per_thread = total // threads
    ended = bytearray(per_thread * threads)  # done callbacks per request (run with the GIL)

    outcome = {"result": 0, "error": 0, "cancelled": 0, "timeout": 0}
    rss = []
    b = infer.Batcher(handler, max_batch_size=64, max_delay_us=200, max_queue=100_000, workers=2)

    def settle(fut, x, counts):
        try:
            out = fut.result(60)
            assert out[0] == x[0]
            counts["result"] += 1
        except concurrent.futures.CancelledError:
            counts["cancelled"] += 1
        except TimeoutError as e:
            assert "timed out in batcher" in str(e)
            counts["timeout"] += 1
        except ArithmeticError:
            counts["error"] += 1

    def client(k):
        rng = random.Random(seed * 1000 + k)
        counts = dict.fromkeys(outcome, 0)
        pending = []
        for i in range(per_thread):
            x = np.array([float(k * per_thread + i)])
            r = rng.random()
            timeout_us = rng.randint(1, 400) if r < 0.02 else None
            fut = b.submit(x, timeout_us=timeout_us, block=True)
            idx = k * per_thread + i
            fut.add_done_callback(lambda _f, idx=idx: ended.__setitem__(idx, ended[idx] + 1))
            if r > 0.98:
                fut.cancel()
            pending.append((fut, x))
            if len(pending) >= window:
                for f, xx in pending:
                    settle(f, xx, counts)
                pending.clear()
            if k == 0 and i in (per_thread // 10, per_thread - 1):
                rss.append(_rss_bytes())
        for f, xx in pending:
            settle(f, xx, counts)
        return counts

    with concurrent.futures.ThreadPoolExecutor(threads) as ex:
        for counts in ex.map(client, range(threads)):
            for key, v in counts.items():
                outcome[key] += v
    b.close(drain=True)
    stats = b.stats()
    return {
        "submitted": per_thread * threads,
        "outcome": outcome,
        "callbacks": sum(ended),
        "ended_once": ended.count(1),
        "stats": stats,
        "rss_growth": rss[-1] - rss[0],
    }


def check(report: dict) -> None:
    n = report["submitted"]
    o = report["outcome"]
    s = report["stats"]
    assert sum(o.values()) == n
    assert report["callbacks"] == n and report["ended_once"] == n
    assert s["requests"] == n
    assert s["completed"] == o["result"]
    assert s["errors"] == o["error"]
    assert s["cancellations"] == o["cancelled"]
    assert s["timeouts"] == o["timeout"]
    assert s["queued"] == 0 and s["in_flight"] == 0
    assert o["error"] > 0 and o["cancelled"] > 0 and o["timeout"] > 0
    # Flat memory: nothing per request survives (a leak of ~1 KiB/request would show).
    assert report["rss_growth"] < 64 * 2**20, report["rss_growth"]


# FASTML_STRESS_REQUESTS scales it down for sanitizer builds (docs/batcher.md).
STRESS_REQUESTS = int(os.environ.get("FASTML_STRESS_REQUESTS", "1000000"))


@pytest.mark.timeout(240)  # bounded: about 20 s on the 2-core dev machine
def test_stress_1m_requests_8_threads():
    check(run_stress(STRESS_REQUESTS))
