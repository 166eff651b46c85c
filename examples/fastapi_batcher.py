"""Serve a model through fastml.infer.Batcher from FastAPI.

Every HTTP request awaits ``Batcher.predict_async``; concurrent requests are
grouped into batches natively, so the model runs once per batch.

Run it:  ``uvicorn examples.fastapi_batcher:app --port 8000``
Query:   ``curl -X POST localhost:8000/predict -H 'content-type: application/json' \
            -d '{"features": [[1, 2, 3, 4]]}'``
"""

from __future__ import annotations

import os
import time
from contextlib import asynccontextmanager

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel

from fastml import infer

N_FEATURES = 4
_WEIGHTS = np.linspace(-1.0, 1.0, N_FEATURES).astype(np.float32)


# A stand-in for a heavy model: each batch also takes this long (tests use it).
_MODEL_SECONDS = float(os.environ.get("FASTML_DEMO_MODEL_MS", "0")) / 1e3


def model(batch: np.ndarray) -> np.ndarray:
    """A stand-in model: a linear score per row (swap in torch, onnxruntime, a Forest...).

    The Batcher runs it on a worker thread, never on the event loop's: while a
    batch runs, the server keeps answering other requests (``/health`` below).
    """
    if _MODEL_SECONDS:
        time.sleep(_MODEL_SECONDS)
    return batch @ _WEIGHTS


class PredictRequest(BaseModel):
    features: list[list[float]]


class PredictResponse(BaseModel):
    scores: list[float]


@asynccontextmanager
async def lifespan(app: FastAPI):
    app.state.batcher = infer.Batcher(
        model,
        max_batch_size=int(os.environ.get("FASTML_MAX_BATCH", "64")),
        max_delay_us=int(os.environ.get("FASTML_MAX_DELAY_US", "500")),
        max_queue=10_000,
        name="fastapi-demo",
    )
    yield
    app.state.batcher.close(drain=True)


app = FastAPI(lifespan=lifespan)


@app.post("/predict", response_model=PredictResponse)
async def predict(req: PredictRequest) -> PredictResponse:
    x = np.asarray(req.features, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != N_FEATURES or len(x) == 0:
        raise HTTPException(422, f"features must be a non-empty list of {N_FEATURES}-vectors")
    try:
        scores = await app.state.batcher.predict_async(x)
    except infer.QueueFull:
        raise HTTPException(503, "overloaded, retry later") from None
    return PredictResponse(scores=scores.tolist())


@app.get("/stats")
async def stats() -> dict:
    return app.state.batcher.stats()


@app.get("/health")
async def health() -> dict:
    """Liveness: answers at once, whatever the model is doing."""
    return {"ok": True, "queued": app.state.batcher.stats()["queued"]}
