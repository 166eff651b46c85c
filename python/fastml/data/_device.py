"""Data sets that live in device memory (``Dataset.to("cuda")``): batches are
gathered and transformed on the device, with no host round trip per batch.

The epoch's rows are the host loader's (the same permutation, sharding,
resume and elastic positions), copied to the device once per epoch; a batch is
one ``index_select`` per column and the fused transforms as torch operations
with the CPU gather's arithmetic (float64, then stored as the CPU gather
stores: floats round to nearest, float16 exactly as NumPy's ``astype`` (no
double rounding), integers truncate toward zero and saturate, NaN becomes 0),
so the batches equal the host loader's bit for bit.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from fastml.data import _elastic

# NumPy dtypes a device column may have (torch lacks most unsigned types' ops).
_TORCH_DTYPES = (
    "bool",
    "int8",
    "uint8",
    "int16",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
)


def torch_dtype(np_dtype: np.dtype) -> Any:
    import torch

    return getattr(torch, np.dtype(np_dtype).name)


def check_device_dtype(name: str, dtype: np.dtype, what: str) -> None:
    if np.dtype(dtype).name not in _TORCH_DTYPES:
        raise TypeError(
            f"{what} '{name}' has dtype {np.dtype(dtype).name}, which a device-resident "
            f"dataset cannot hold (supported: {', '.join(_TORCH_DTYPES)})"
        )


def epoch_rows(
    n: int, shuffle: bool, seed: int, epoch: int, rank: int, world: int, drop_last: bool
) -> np.ndarray:
    """The rows one rank reads in an epoch, as the native engine computes them
    (data::epoch_rows): the permutation (or identity), padded by repeating its
    first rows (drop_last=False) or truncated to a multiple of ``world``, rank r
    taking positions r, r + world, ..."""
    order = _elastic.epoch_order(n, shuffle, seed, epoch)
    if world == 1:
        return order
    total = (n // world) * world if drop_last else -(-n // world) * world
    return order[np.arange(rank, total, world) % n]


def _store_as(x: Any, dtype: np.dtype) -> Any:
    """float64 ``x`` stored as ``dtype`` exactly as the CPU gather's store_as."""
    import torch

    name = np.dtype(dtype).name
    if name == "float64":
        return x
    if name == "float32":
        return x.to(torch.float32)
    if name == "bool":
        return x != 0
    if name == "float16":
        # Round to odd in float32 first (an inexact result gets an odd last
        # bit), so float32 -> float16 rounds as a direct float64 -> float16.
        f = x.to(torch.float32)
        back = f.to(torch.float64)
        bits = f.view(torch.int32)
        fix = (back != x) & (x == x) & ((bits & 1) == 0)
        below = torch.where(bits < 0, back > x, back < x)
        bits = torch.where(fix, torch.where(below, bits + 1, bits - 1), bits)
        return bits.view(torch.float32).to(torch.float16)
    info = np.iinfo(dtype)
    lo, hi = float(info.min), float(info.max)
    tdt = torch_dtype(dtype)
    r = torch.where(x != x, torch.zeros_like(x), x).trunc().clamp(lo, hi)
    out = r.to(tdt)
    out = torch.where(x >= hi, torch.full_like(out, info.max), out)
    return torch.where(x <= lo, torch.full_like(out, info.min), out)


def _device_pair(op: tuple[Any, ...], device: Any, row_shape: tuple) -> tuple[Any, Any]:
    """Standardize's mean and std as float64 tensors on ``device`` (row-shaped
    when per element); an op prepared by :func:`device_ops` already holds them."""
    import torch

    if isinstance(op[1], torch.Tensor):
        return op[1], op[2]
    mean = torch.as_tensor(np.asarray(op[1], np.float64), device=device)
    std = torch.as_tensor(np.asarray(op[2], np.float64), device=device)
    if mean.numel() > 1:
        mean, std = mean.reshape(row_shape), std.reshape(row_shape)
    return mean, std


def device_ops(ops: list[tuple[Any, ...]], device: Any, row_shape: tuple) -> list[tuple]:
    """``ops`` with Standardize's constants placed on ``device`` once (not per chunk)."""
    return [
        ("standardize", *_device_pair(op, device, row_shape)) if op[0] == "standardize" else op
        for op in ops
    ]


def apply_plan(col: Any, ops: list[tuple[Any, ...]], out_dtype: np.dtype, row_shape: tuple) -> Any:
    """A gathered column (torch) with its plan's transforms applied and stored."""
    import torch

    if not ops and torch_dtype(out_dtype) == col.dtype:
        return col
    x = col.to(torch.float64)
    for op in ops:
        kind = op[0]
        if kind == "fillna":
            x = torch.where(x != x, torch.full_like(x, op[1]), x)
        elif kind == "clip":
            lo, hi = op[1], op[2]
            x = torch.where(x < lo, torch.full_like(x, lo), torch.where(x > hi, hi, x))
        elif kind == "standardize":
            mean, std = _device_pair(op, x.device, row_shape)
            x = (x - mean) / std
        else:  # pragma: no cover - plans are built by column_plan
            raise ValueError(f"unknown transform {kind!r}")
    return _store_as(x, out_dtype)


class TensorStream:
    """The batches of one iteration over a device-resident dataset (a _Stream of
    fastml.data._loader: ``next``, ``close``, ``ended_by``)."""

    ended_by: str | None = None

    def __init__(self, loader: Any) -> None:
        import torch

        ds = loader._dataset
        n = len(ds)
        if loader._stages:  # an elastic resume: this rank's share of the epoch's rest
            rows = loader._elastic_rows()
        else:
            rows = epoch_rows(
                n,
                loader._shuffle,
                loader._seed,
                loader._epoch,
                loader._rank,
                loader._world_size,
                loader._drop_last,
            )
        self._device = ds._device
        # One copy of the epoch's rows per iteration; every batch is then a
        # slice of it on the device.
        self._rows = torch.from_numpy(np.ascontiguousarray(rows)).to(self._device)
        self._batch = loader._batch_size
        self._next = loader._position
        self._num = len(loader)
        self._plans = {
            name: (device_ops(ops, self._device, shape), out_dtype, shape)
            for name, (ops, out_dtype, shape) in loader._device_plans.items()
        }
        self._tensors = ds._tensors
        self._stats = loader._py_stats
        self._closed = False
        # Batches are gathered a chunk at a time (one index_select and one pass
        # of each transform per column for up to 64 batches or ~64 MB), and
        # handed out as views of the chunk: the per-batch cost is then a few
        # slices, not a launch per column (a device gather of one batch takes
        # microseconds, less than the Python around it).
        row_bytes = sum(
            int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
            for _ops, dt, shape in self._plans.values()
        )
        per_chunk = max(1, min(64, (64 << 20) // max(1, row_bytes * self._batch)))
        self._chunk_batches = per_chunk
        self._chunk: dict[str, Any] | None = None
        self._chunk_first = -1  # batch index of the chunk's first batch

    def _gather_chunk(self, first: int) -> None:
        lo = first * self._batch
        hi = min(len(self._rows), (first + self._chunk_batches) * self._batch)
        idx = self._rows[lo:hi]
        self._chunk = {
            name: apply_plan(t.index_select(0, idx), *self._plans[name])
            for name, t in self._tensors.items()
        }
        self._chunk_first = first

    def next(self) -> dict[str, Any] | None:
        if self._closed or self._next >= self._num:
            return None
        b = self._next
        if self._chunk is None or not (
            self._chunk_first <= b < self._chunk_first + self._chunk_batches
        ):
            self._gather_chunk(b)
        assert self._chunk is not None
        off = (b - self._chunk_first) * self._batch
        out = {name: v[off : off + self._batch] for name, v in self._chunk.items()}
        self._next += 1
        rows = next(iter(out.values())).shape[0]
        self._stats["batches"] += 1
        self._stats["rows"] += int(rows)
        self._stats["bytes"] += sum(v.numel() * v.element_size() for v in out.values())
        return out

    def close(self) -> None:
        self._closed = True
