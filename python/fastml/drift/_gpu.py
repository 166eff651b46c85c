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


def ingest_cuda(native: Any, index: int, tensor: Any) -> None:
    """Add a 1-D CUDA tensor to numeric feature ``index`` of a native profile.

    The kernel runs on the tensor's current stream; counters live in torch
    tensors (the caching allocator, no cudaMalloc per call). Values kept for
    exact/sketch quantiles are copied to the host.
    """
    import torch

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
    edges = torch.as_tensor(edges_np, device=dev)
    hist = torch.zeros(nbins + 2, dtype=torch.int64, device=dev)
    blocks = max(1, min(1024, math.ceil(n / (_THREADS * 8))))
    partials = torch.empty(blocks * 7, dtype=torch.float64, device=dev)
    pivot = float(summ["mean"]) if summ["count"] > 0 else float(edges_np[(nbins + 1) // 2])
    stream = torch.cuda.current_stream(dev).cuda_stream
    _core._drift_ingest_cuda(
        t.data_ptr(),
        0 if t.dtype == torch.float32 else 1,
        n,
        int(t.stride(0)),
        edges.data_ptr(),
        nbins,
        hist.data_ptr(),
        partials.data_ptr(),
        blocks,
        pivot,
        stream,
    )
    h = hist.cpu().numpy().astype(np.float64)  # synchronises with the stream
    p = partials.view(blocks, 7).cpu().numpy()
    cnt, nan, inf = p[:, 0].sum(), p[:, 1].sum(), p[:, 2].sum()
    if cnt > 0:
        s, q = p[:, 3].sum(), p[:, 4].sum()
        mean, m2 = pivot + s / cnt, max(0.0, q - s * s / cnt)
        lo, hi = float(p[:, 5].min()), float(p[:, 6].max())
    else:
        mean = m2 = lo = hi = 0.0
    native.add_summary(index, float(cnt), float(nan), float(inf), float(mean), float(m2), lo, hi, h)
    if summ["mode"] != "histogram":
        finite = t[torch.isfinite(t)].to(torch.float64).cpu().numpy()
        native.add_quantile_values(index, finite)
