"""Ingest of CUDA tensors: histogram, moments and counts in one kernel pass (private)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fastml import _core

_THREADS = 256


def is_cuda_tensor(obj: Any) -> bool:
    """True for a torch tensor on a CUDA device."""
    return type(obj).__module__.startswith("torch") and bool(getattr(obj, "is_cuda", False))


class Pending:
    """A feature's GPU ingests not yet folded into the native profile
    (histogram mode): the summed histogram and the running totals
    [count, nan, inf, sum, sumsq, min, max] of values shifted by ``pivot``,
    both on the device, and an event after the last update that wrote them."""

    __slots__ = ("event", "hist", "parts", "pivot")

    def __init__(self, hist: Any, parts: Any, pivot: float) -> None:
        self.hist, self.parts, self.pivot = hist, parts, pivot
        self.event: Any = None


def _launch(t: Any, edges: Any, nbins: int, hist: Any, partials: Any, blocks: int, pivot: float):
    """The native kernel on the tensor's current stream (tests may replace this)."""
    import torch

    _core._drift_ingest_cuda(
        t.data_ptr(),
        0 if t.dtype == torch.float32 else 1,
        int(t.shape[0]),
        int(t.stride(0)),
        edges.data_ptr(),
        nbins,
        hist.data_ptr(),
        partials.data_ptr(),
        blocks,
        pivot,
        torch.cuda.current_stream(t.device).cuda_stream,
    )


def _record(t: Any) -> Any:
    """An event on the tensor's current stream (None off CUDA)."""
    import torch

    if t.device.type != "cuda":
        return None
    ev = torch.cuda.Event()
    ev.record(torch.cuda.current_stream(t.device))
    return ev


def _summary(native: Any, index: int, cnt, nan, inf, s, q, lo, hi, pivot, hist) -> None:
    if cnt > 0:
        mean, m2 = pivot + s / cnt, max(0.0, q - s * s / cnt)
    else:
        mean = m2 = lo = hi = 0.0
    native.add_summary(
        index,
        float(cnt),
        float(nan),
        float(inf),
        float(mean),
        float(m2),
        float(lo),
        float(hi),
        hist,
    )


def _fold_now(native: Any, index: int, hist: Any, p: Any, pivot: float) -> None:
    """One update's histogram and block partials into ``native`` (waits for them)."""
    h = hist.cpu().numpy().astype(np.float64)  # synchronises with the stream
    pn = p.cpu().numpy()
    cnt, nan, inf = pn[:, 0].sum(), pn[:, 1].sum(), pn[:, 2].sum()
    s, q = pn[:, 3].sum(), pn[:, 4].sum()
    lo, hi = float(pn[:, 5].min()), float(pn[:, 6].max())
    _summary(native, index, cnt, nan, inf, s, q, lo, hi, pivot, h)


def fold_pending(native: Any, pending: dict[int, Pending]) -> None:
    """Folds every pending GPU ingest into ``native`` (one wait per feature, at
    the last update's event), then forgets them."""
    for index, pend in list(pending.items()):
        if pend.event is not None:
            pend.event.synchronize()
        h = pend.hist.cpu().numpy().astype(np.float64)
        cnt, nan, inf, s, q, lo, hi = (float(v) for v in pend.parts.cpu().numpy())
        _summary(native, index, cnt, nan, inf, s, q, lo, hi, pend.pivot, h)
        del pending[index]  # only once folded: a failure leaves the rest pending


def ingest_cuda(profile: Any, index: int, tensor: Any) -> None:
    """Add a 1-D CUDA tensor to numeric feature ``index`` of ``profile``.

    The kernel runs on the tensor's current stream; counters live in torch
    tensors (the caching allocator, no cudaMalloc per call). In histogram mode
    nothing waits for the GPU: the results stay on the device, summed over
    updates (profile._pending), and are folded into the profile when anything
    reads it (a summary, a report, a merge, bytes). Exact and sketch modes copy
    the finite values to the host, so they wait for each update.
    """
    import torch

    native = profile._native_raw
    if tensor.dim() != 1:
        raise ValueError(f"CUDA column must be 1-D, got shape {tuple(tensor.shape)}")
    t = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.to(torch.float64)
    summ = native.numeric_summary(index)
    edges_np = np.asarray(summ["edges"], dtype=np.float64)
    nbins = edges_np.size - 1
    if nbins > _core._drift_max_cuda_bins:
        raise ValueError(
            f"the CUDA ingest supports at most {_core._drift_max_cuda_bins} bins, got {nbins}"
        )
    n = int(t.shape[0])
    if n == 0:
        return
    dev = t.device
    pending = profile._pending
    pend = pending.get(index) if pending is not None else None
    if pend is not None:
        pivot = pend.pivot  # one shift for all of a feature's pending sums
    else:
        pivot = float(summ["mean"]) if summ["count"] > 0 else float(edges_np[(nbins + 1) // 2])
    edges = torch.as_tensor(edges_np, device=dev)
    hist = torch.zeros(nbins + 2, dtype=torch.int64, device=dev)
    blocks = max(1, min(1024, math.ceil(n / (_THREADS * 8))))
    partials = torch.empty(blocks * 7, dtype=torch.float64, device=dev)
    _launch(t, edges, nbins, hist, partials, blocks, pivot)
    p = partials.view(blocks, 7)
    if summ["mode"] == "histogram":
        parts = torch.cat([p[:, :5].sum(0), p[:, 5].min().reshape(1), p[:, 6].max().reshape(1)])
        with profile._fold_lock:
            pending = profile._pending
            if pending is None:
                pending = profile._pending = {}
            if pending.get(index) is not pend:  # folded meanwhile: the pivot may differ
                pend = None
            if pend is None:
                if index in pending:  # another thread started one: add ours to the host
                    _fold_now(native, index, hist, p, pivot)
                    return
                pend = pending[index] = Pending(hist, parts, pivot)
            else:
                pend.hist += hist
                pend.parts[:5] += parts[:5]
                pend.parts[5] = torch.minimum(pend.parts[5], parts[5])
                pend.parts[6] = torch.maximum(pend.parts[6], parts[6])
            pend.event = _record(t)
        return
    _fold_now(native, index, hist, p, pivot)
    finite = t[torch.isfinite(t)].to(torch.float64).cpu().numpy()
    native.add_quantile_values(index, finite)
