"""Shared GPU timing for benchmarks/ops: triton.testing.do_bench medians, copy bandwidth, memory.

CUDA timings come from ``triton.testing.do_bench`` (CUDA events, L2 flushed
between repeats), not from the wall-clock harness; the results are wrapped in
``fastml.bench.harness.Timing`` so tables look like every other benchmark's.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from fastml.bench.harness import Timing


def cuda_ms(fn: Callable[[], Any], smoke: bool) -> list[float]:
    """[p20, median, p80] milliseconds of ``fn`` (one untimed call in smoke mode)."""
    if smoke:
        fn()
        return [0.0, 0.0, 0.0]
    import triton.testing

    return list(triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=25, rep=100))


def copy_bandwidth(smoke: bool) -> float:
    """Bytes per second of a device-to-device copy of 1 GiB (read + write counted)."""
    if smoke:
        return float("nan")
    n = 1 << 28  # 2**28 fp32 = 1 GiB
    src = torch.empty(n, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    ms = cuda_ms(lambda: dst.copy_(src), smoke=False)[1]
    return 2 * n * 4 / (ms * 1e-3)


def peak_extra_bytes(fn: Callable[[], Any]) -> int:
    """Peak device memory allocated by ``fn`` beyond what was allocated before it."""
    if not torch.cuda.is_available():
        fn()
        return 0
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def timing(name: str, ms: list[float], nbytes: float | None) -> Timing:
    return Timing(name, seconds=[m * 1e-3 for m in ms], work=nbytes, unit="B")


def device_info() -> dict[str, Any]:
    import platform

    info: dict[str, Any] = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, sms=p.multi_processor_count, cuda=torch.version.cuda)
        try:
            import subprocess

            out = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            )
            info["driver"] = out.stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    return info


def write_json(path: str | None, payload: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(payload, indent=2, default=str))
        print(f"wrote {path}", file=sys.stderr)


def liger_functional() -> Any:
    """Liger Kernel's functional API (``liger_kernel.transformers.functional``), the
    optional peer of benchmarks/ops, or None when it is not installed (or does not
    import: it needs triton and a torch it supports). ``benchmarks/gpu/fetch_wheels.sh``
    fetches the wheel the GPU check installs."""
    try:
        from liger_kernel.transformers import functional
    except Exception:  # ImportError, or an import-time failure of an optional peer
        return None
    return functional
