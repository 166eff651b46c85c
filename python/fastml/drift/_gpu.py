"""Ingest of CUDA tensors: histogram, moments and counts in one kernel pass (private)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from fastml import _core
from fastml._cuda_stream import current_stream_handle

_THREADS = 256


def is_cuda_tensor(obj: Any) -> bool:
    """True for a torch tensor on a CUDA device."""
    return type(obj).__module__.startswith("torch") and bool(getattr(obj, "is_cuda", False))


class DeviceState:
    """A profile's GPU ingests on one device not yet folded into the native
    profile (histogram mode). For every numeric feature: its edges (one
    device buffer for all, uploaded once), its counters (one int64 buffer,
    summed over updates: bit-identical to the CPU path) and an accumulator
    row [count, nan, inf, sum, sumsq, min, max] of values shifted by the
    feature's pivot (fixed until the fold); plus the kernel's scratch and an
    event after the last update that wrote them."""

    __slots__ = (
        "acc",
        "done",
        "edge_off",
        "edges",
        "event",
        "hist",
        "hist_off",
        "nbins",
        "partials",
        "pivots",
        "row",
        "touched",
    )

    def __init__(self, native: Any, device: Any) -> None:
        import torch

        self.row: dict[int, int] = {}
        self.edge_off: list[int] = []
        self.hist_off: list[int] = []
        self.nbins: list[int] = []
        self.pivots: list[float] = []
        edges: list[np.ndarray] = []
        e_off = h_off = 0
        for i, kind in enumerate(native.kinds):
            if kind != 0:
                continue
            summ = native.numeric_summary(i)
            e = np.asarray(summ["edges"], dtype=np.float64)
            nb = e.size - 1
            if nb > _core._drift_max_cuda_bins:
                raise ValueError(
                    f"the CUDA ingest supports at most {_core._drift_max_cuda_bins} bins, got {nb}"
                )
            self.row[i] = len(self.nbins)
            self.edge_off.append(e_off)
            self.hist_off.append(h_off)
            self.nbins.append(nb)
            self.pivots.append(
                float(summ["mean"]) if summ["count"] > 0 else float(e[(nb + 1) // 2])
            )
            edges.append(e)
            e_off += nb + 1
            h_off += nb + 2
        self.edges = torch.as_tensor(np.concatenate(edges), device=device)
        self.hist = torch.zeros(h_off, dtype=torch.int64, device=device)
        acc = np.zeros((len(self.nbins), 7))
        acc[:, 5], acc[:, 6] = np.inf, -np.inf
        self.acc = torch.as_tensor(acc, device=device)
        self.done = torch.zeros(_core._drift_max_multi_columns, dtype=torch.int32, device=device)
        self.partials = torch.empty(0, dtype=torch.float64, device=device)
        self.touched: set[int] = set()
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
        current_stream_handle(t.device),
    )


def _launch_multi(state: DeviceState, items: list[tuple[int, Any]], n: int, blocks: int) -> None:
    """One native launch for up to _drift_max_multi_columns (row, tensor) pairs on
    the tensors' current stream (tests may replace this)."""
    import torch

    cols = [
        (
            t.data_ptr(),
            0 if t.dtype == torch.float32 else 1,
            int(t.stride(0)),
            state.edge_off[r],
            state.nbins[r],
            state.hist_off[r],
            r,
            state.pivots[r],
        )
        for r, t in items
    ]
    _core._drift_ingest_cuda_multi(
        cols,
        n,
        state.edges.data_ptr(),
        state.hist.data_ptr(),
        state.partials.data_ptr(),
        state.done.data_ptr(),
        state.acc.data_ptr(),
        blocks,
        current_stream_handle(items[0][1].device),
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


def fold_pending(native: Any, pending: dict[Any, DeviceState]) -> None:
    """Folds every pending GPU ingest into ``native`` (one wait per device, at the
    last update's event; two copies to the host per device), then forgets them."""
    for device, state in list(pending.items()):
        if state.event is not None:
            state.event.synchronize()
        h = state.hist.cpu().numpy()
        acc = state.acc.cpu().numpy()
        for index in sorted(state.touched):
            r = state.row[index]
            cnt, nan, inf, s, q, lo, hi = (float(v) for v in acc[r])
            off, nb = state.hist_off[r], state.nbins[r]
            hist = h[off : off + nb + 2].astype(np.float64)
            _summary(native, index, cnt, nan, inf, s, q, lo, hi, state.pivots[r], hist)
        del pending[device]  # only once folded: a failure leaves the rest pending


def ingest_cuda_histogram(profile: Any, columns: list[tuple[int, Any]]) -> None:
    """Add the CUDA columns of one batch (``(feature index, 1-D tensor)``, equal
    lengths) to a histogram-mode ``profile``: one kernel launch per device and
    per _drift_max_multi_columns columns, on the tensors' current stream, and
    nothing waits for the GPU. The counters and moments stay on the device,
    summed over updates (``profile._pending``), and are folded into the profile
    when anything reads it (a summary, a report, a merge, bytes)."""
    import torch

    by_device: dict[Any, list[tuple[int, Any]]] = {}
    n = -1
    for index, tensor in columns:
        if tensor.dim() != 1:
            raise ValueError(f"CUDA column must be 1-D, got shape {tuple(tensor.shape)}")
        t = tensor if tensor.dtype in (torch.float32, torch.float64) else tensor.to(torch.float64)
        if n < 0:
            n = int(t.shape[0])
        elif int(t.shape[0]) != n:
            raise ValueError(f"CUDA columns have different lengths ({n} and {int(t.shape[0])})")
        by_device.setdefault(t.device, []).append((index, t))
    if n <= 0:
        return
    chunk = int(_core._drift_max_multi_columns)
    blocks = max(1, min(1024, math.ceil(n / (_THREADS * 8))))
    with profile._fold_lock:
        pending = profile._pending
        if pending is None:
            pending = profile._pending = {}
        for device, cols in by_device.items():
            state = pending.get(device)
            if state is None:
                state = pending[device] = DeviceState(profile._native_raw, device)
            need = min(len(cols), chunk) * blocks * 7
            if state.partials.numel() < need:
                state.partials = torch.empty(need, dtype=torch.float64, device=device)
            items = [(state.row[i], t) for i, t in cols]
            for k in range(0, len(items), chunk):
                _launch_multi(state, items[k : k + chunk], n, blocks)
            state.touched.update(i for i, _ in cols)
            state.event = _record(cols[-1][1])


def ingest_cuda(profile: Any, index: int, tensor: Any) -> None:
    """Add a 1-D CUDA tensor to numeric feature ``index`` of an exact- or
    sketch-mode ``profile`` (histogram mode: :func:`ingest_cuda_histogram`).

    The kernel runs on the tensor's current stream; counters live in torch
    tensors (the caching allocator, no cudaMalloc per call). These modes keep
    the values, so the finite ones are copied to the host: it waits for each
    update.
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
    pivot = float(summ["mean"]) if summ["count"] > 0 else float(edges_np[(nbins + 1) // 2])
    edges = torch.as_tensor(edges_np, device=dev)
    hist = torch.zeros(nbins + 2, dtype=torch.int64, device=dev)
    blocks = max(1, min(1024, math.ceil(n / (_THREADS * 8))))
    partials = torch.empty(blocks * 7, dtype=torch.float64, device=dev)
    _launch(t, edges, nbins, hist, partials, blocks, pivot)
    p = partials.view(blocks, 7)
    _fold_now(native, index, hist, p, pivot)
    finite = t[torch.isfinite(t)].to(torch.float64).cpu().numpy()
    native.add_quantile_values(index, finite)
