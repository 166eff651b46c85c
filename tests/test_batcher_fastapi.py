"""The FastAPI example, served by uvicorn on 127.0.0.1 and queried with httpx."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server():
    yield from _serve({"FASTML_MAX_DELAY_US": "2000"})


@pytest.fixture
def slow_server():
    yield from _serve({"FASTML_MAX_DELAY_US": "0", "FASTML_DEMO_MODEL_MS": "200"})


def _serve(env):
    port = _free_port()
    # fastml itself comes from wherever this test imports it (installed, or the
    # source tree through the inherited PYTHONPATH); --app-dir finds the example.
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            "--app-dir",
            str(ROOT / "examples"),
            "fastapi_batcher:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
        env={**os.environ, **env},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"{base}/stats", timeout=1.0)
                break
            except httpx.TransportError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("uvicorn did not start") from None
                time.sleep(0.1)
        yield base
    finally:
        proc.terminate()
        proc.wait(30)


def test_fastapi_example_serves_concurrent_requests(server, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from examples.fastapi_batcher import model

    rng = np.random.default_rng(0)
    payloads = [
        rng.normal(size=(int(rng.integers(1, 4)), 4)).astype(np.float32) for _ in range(200)
    ]

    async def run():
        async with httpx.AsyncClient(base_url=server, timeout=30) as client:
            sem = asyncio.Semaphore(64)

            async def one(x):
                async with sem:
                    return await client.post("/predict", json={"features": x.tolist()})

            return await asyncio.gather(*(one(x) for x in payloads))

    responses = asyncio.run(run())
    for x, r in zip(payloads, responses, strict=True):
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(r.json()["scores"], model(x), rtol=1e-6, atol=1e-6)
    bad = httpx.post(f"{server}/predict", json={"features": [[1.0, 2.0]]})
    assert bad.status_code == 422
    stats = httpx.get(f"{server}/stats").json()
    assert stats["requests"] == 200 and stats["completed"] == 200
    # Concurrent requests were batched together, not run one by one.
    assert stats["batches"] < 200


def test_event_loop_keeps_serving_while_a_batch_runs(slow_server):
    """A 200 ms batch runs on a worker thread: /health answers meanwhile, in
    milliseconds (when the model ran on the event loop, it waited 200 ms)."""

    async def run():
        async with httpx.AsyncClient(base_url=slow_server, timeout=30) as client:
            await client.get("/health")  # connection warm-up
            predict = asyncio.create_task(client.post("/predict", json={"features": [[1.0] * 4]}))
            await asyncio.sleep(0.03)  # the batch is running now
            latencies = []
            while not predict.done():
                t0 = time.perf_counter()
                r = await client.get("/health")
                latencies.append(time.perf_counter() - t0)
                assert r.status_code == 200
                await asyncio.sleep(0.005)
            return (await predict), latencies

    response, latencies = asyncio.run(run())
    assert response.status_code == 200
    assert len(latencies) >= 3, latencies  # several answered while the batch ran
    assert max(latencies) < 0.1, latencies  # a blocked loop would take ~0.2 s
