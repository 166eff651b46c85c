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
    port = _free_port()
    # fastml itself comes from wherever this test imports it (installed, or the
    # source tree through the inherited PYTHONPATH); --app-dir finds the example.
    env = {"FASTML_MAX_DELAY_US": "2000"}
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
