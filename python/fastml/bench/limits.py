"""What this machine's hardware can do, measured once per ``fastml bench`` run.

Each figure of the suite that moves memory is reported against one of these
limits (``Figure.limit``), so a reader sees how close fastml (or the machine)
comes to what the hardware allows. The limits are measured with NumPy and
torch, never with fastml's own code, as the best of a few repeats:

- ``cpu_copy_1t``: one thread copying a large array (``np.copyto``), bytes
  read + written per second;
- ``cpu_copy_all``: the same on every usable core (NumPy releases the GIL);
- ``cpu_gather_all``: random 64-byte lines of a 256 MiB table read on every
  usable core (one word each, see ``_gather_seconds``), lines per second: the
  limit of a shuffled in-memory loader;
- ``gpu_copy`` (CUDA): device-to-device copy, bytes read + written per second;
- ``gpu_h2d_pinned`` (CUDA): pinned host memory to the device with
  ``non_blocking=True``, bytes per second.

docs/bench.md gives each figure's byte accounting.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Limit:
    """One measured hardware limit."""

    name: str
    value: float
    unit: str
    what: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "value": self.value, "unit": self.unit, "what": self.what}


def _usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _best_seconds(fn: Callable[[], Any], repeat: int) -> float:
    fn()  # warm-up: page faults, thread start
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _split(n: int, parts: int) -> list[slice]:
    return [slice(i * n // parts, (i + 1) * n // parts) for i in range(parts)]


def _copy_seconds(n: int, threads: int, repeat: int) -> tuple[float, float]:
    """Best seconds to copy ``n`` float32 values on 1 thread and on ``threads``."""
    src = np.ones(n, dtype=np.float32)
    dst = np.empty_like(src)
    one = _best_seconds(lambda: np.copyto(dst, src), repeat)
    parts = _split(n, threads)
    with ThreadPoolExecutor(threads) as pool:
        every = _best_seconds(
            lambda: list(pool.map(lambda sl: np.copyto(dst[sl], src[sl]), parts)), repeat
        )
    return one, every


def _gather_seconds(lines: int, m: int, threads: int, repeat: int) -> float:
    """Best seconds to touch ``m`` random 64-byte lines of a ``lines``-line table.

    One 8-byte word is read per line (``np.take`` of a flat uint64 view at
    multiples of 8, ``mode="clip"`` so the output is not buffered), so the loop
    costs little beyond the memory system: each read brings its whole line from
    memory, with many reads in flight. A row gather (``np.take(..., axis=0)``)
    pays NumPy's per-row overhead and runs at about a third of this rate.
    """
    words = np.ones(lines * 8, dtype=np.uint64)
    idx = np.random.default_rng(0).integers(0, lines, m) * 8
    out = np.empty(m, dtype=np.uint64)
    parts = _split(m, threads)
    with ThreadPoolExecutor(threads) as pool:
        return _best_seconds(
            lambda: list(
                pool.map(lambda sl: np.take(words, idx[sl], out=out[sl], mode="clip"), parts)
            ),
            repeat,
        )


def cpu_limits(quick: bool) -> dict[str, Limit]:
    """Copy bandwidth (1 thread, all threads) and the random 64-byte gather rate.

    The arrays are far larger than a CPU's caches (256 MiB), so these are
    memory limits; figures whose data fit in cache could exceed them.
    """
    threads = _usable_cores()
    repeat = 3 if quick else 5
    n = (256 << 20) // 4  # float32 values in 256 MiB
    s1, sa = _copy_seconds(n, threads, repeat)
    m = (1 if quick else 4) << 20
    sg = _gather_seconds((256 << 20) // 64, m, threads, repeat)
    nbytes = 2.0 * n * 4
    return {
        "cpu_copy_1t": Limit("cpu_copy_1t", nbytes / s1, "B/s", "memcpy, 1 thread, read+write"),
        "cpu_copy_all": Limit(
            "cpu_copy_all", nbytes / sa, "B/s", f"memcpy, {threads} threads, read+write"
        ),
        "cpu_gather_all": Limit(
            "cpu_gather_all",
            m / sg,
            "lines/s",
            f"random 64-byte lines of a 256 MiB table read, {threads} threads",
        ),
    }


def gpu_limits(quick: bool) -> dict[str, Limit]:
    """Device-to-device copy and pinned host-to-device copy bandwidth (torch, CUDA events)."""
    import torch

    if not torch.cuda.is_available():
        return {}
    repeat = 5 if quick else 10

    def best_ms(fn: Callable[[], Any]) -> float:
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(repeat):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            best = min(best, a.elapsed_time(b))
        return best

    def d2d_ms(nbytes: int) -> float:
        src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
        dst = torch.empty_like(src)
        return best_ms(lambda: dst.copy_(src))

    def h2d_ms(nbytes: int) -> float:
        host = torch.empty(nbytes // 4, dtype=torch.float32).pin_memory()
        dev = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
        return best_ms(lambda: dev.copy_(host, non_blocking=True))

    n = (256 if quick else 1024) << 20
    d2d = 2.0 * n / (d2d_ms(n) * 1e-3)
    h = (128 if quick else 512) << 20
    h2d = h / (h2d_ms(h) * 1e-3)
    return {
        "gpu_copy": Limit("gpu_copy", d2d, "B/s", "device-to-device copy, read+write"),
        "gpu_h2d_pinned": Limit("gpu_h2d_pinned", h2d, "B/s", "pinned host to device copy"),
    }


def measure(device: str, quick: bool) -> dict[str, Limit]:
    """The limits of this machine that the run's figures are reported against."""
    limits = cpu_limits(quick)
    if device == "cuda":
        limits.update(gpu_limits(quick))
    return limits
