"""fastml.infer.Batcher inside a Ray Serve deployment (local, loopback only).

A deployment wraps a Forest behind the Batcher; concurrent HTTP requests go
through Ray Serve's proxy to the replica, whose async handler awaits
``predict_async``. The answers must equal the Forest's own predictions, and
requests must have been batched. Marked slow (Ray starts a local cluster);
skipped where ray[serve] is not installed (CI installs it in a step of its own).
"""

from __future__ import annotations

import asyncio
import socket

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
httpx = pytest.importorskip("httpx")
xgb = pytest.importorskip("xgboost")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_serve_deployment_batches_a_forest(tmp_path):
    from fastml.infer import Forest

    rng = np.random.default_rng(0)
    X = rng.normal(size=(500, 8)).astype(np.float32)
    y = (X[:, 0] + X[:, 1] > 0).astype(float)
    booster = xgb.train(
        {"objective": "binary:logistic", "max_depth": 4, "nthread": 1}, xgb.DMatrix(X, y), 20
    )
    model_path = tmp_path / "model.json"
    booster.save_model(str(model_path))
    want = Forest.from_xgboost(str(model_path)).predict(X[:64])

    @serve.deployment(max_ongoing_requests=256)
    class ForestService:
        def __init__(self, path: str) -> None:
            from fastml import infer

            self.batcher = infer.Batcher(
                infer.Forest.from_xgboost(path), max_batch_size=64, max_delay_us=2000
            )

        async def __call__(self, request):
            body = await request.json()
            x = np.asarray(body["features"], dtype=np.float32)
            return {"score": float(await self.batcher.predict_async(x))}

        def stats(self) -> dict:
            return self.batcher.stats()

    port = _free_port()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(ForestService.bind(str(model_path)), route_prefix="/forest")

        async def run():
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(
                    *(
                        client.post(
                            f"http://127.0.0.1:{port}/forest",
                            json={"features": X[i].tolist()},  # one row, no batch dimension
                        )
                        for i in range(64)
                    )
                )

        responses = asyncio.run(run())
        got = np.array([r.json()["score"] for r in responses], dtype=np.float32)
        assert all(r.status_code == 200 for r in responses)
        np.testing.assert_array_equal(got, want)
        stats = handle.stats.remote().result(timeout_s=60)
        assert stats["requests"] == 64 and stats["completed"] == 64
        assert stats["batches"] < 64  # concurrent requests were batched
    finally:
        serve.shutdown()
        ray.shutdown()
