"""What this machine is: CPU, memory, GPUs and package versions.

Shared by ``fastml info`` (:mod:`fastml.cli`) and ``fastml bench``
(:mod:`fastml.bench.suite`); it imports neither, so both can import it.
"""

from __future__ import annotations

import os
import platform
from importlib import metadata
from typing import Any

import fastml

_VERSIONED_PACKAGES = ("numpy", "torch", "triton", "pyarrow", "scipy", "pandas", "cuda-python")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _physical_cores() -> int | None:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            pairs = set()
            phys = core = None
            for line in f:
                if line.startswith("physical id"):
                    phys = line.split(":", 1)[1].strip()
                elif line.startswith("core id"):
                    core = line.split(":", 1)[1].strip()
                elif not line.strip() and core is not None:
                    pairs.add((phys, core))
                    phys = core = None
            if core is not None:
                pairs.add((phys, core))
            return len(pairs) or None
    except OSError:
        return None


def _gpus_cuda_python() -> list[dict[str, Any]] | None:
    try:
        from cuda.bindings import runtime as cudart  # type: ignore[import-not-found]
    except ImportError:
        return None
    err, count = cudart.cudaGetDeviceCount()
    if err != cudart.cudaError_t.cudaSuccess:
        return []
    _, driver = cudart.cudaDriverGetVersion()
    gpus = []
    for i in range(count):
        err, prop = cudart.cudaGetDeviceProperties(i)
        if err != cudart.cudaError_t.cudaSuccess:
            continue
        name = prop.name.decode() if isinstance(prop.name, bytes) else str(prop.name)
        gpus.append(
            {
                "index": i,
                "name": name.rstrip("\x00"),
                "total_memory": int(prop.totalGlobalMem),
                "sm_count": int(prop.multiProcessorCount),
                "compute_capability": (int(prop.major), int(prop.minor)),
                "driver": f"{driver // 1000}.{(driver % 1000) // 10}",
                "source": "cuda-python",
            }
        )
    return gpus


def _gpus_torch() -> list[dict[str, Any]] | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return []
    driver = None
    try:
        driver = torch.cuda.driver_version() if hasattr(torch.cuda, "driver_version") else None
    except Exception:  # pragma: no cover - depends on the driver
        driver = None
    gpus = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        gpus.append(
            {
                "index": i,
                "name": p.name,
                "total_memory": int(p.total_memory),
                "sm_count": int(p.multi_processor_count),
                "compute_capability": (int(p.major), int(p.minor)),
                "driver": driver,
                "source": "torch",
            }
        )
    return gpus


def gpu_info() -> list[dict[str, Any]]:
    """GPUs present, read through cuda-python when installed, else torch, else fastml's core."""
    for probe in (_gpus_cuda_python, _gpus_torch):
        try:
            gpus = probe()
        except Exception:  # a broken driver install must not break `fastml info`
            gpus = None
        if gpus is not None:
            return gpus
    driver = fastml._core.cuda_driver_version() or None
    return [dict(d, driver=driver, source="fastml") for d in fastml._core.cuda_devices()]


def package_versions() -> dict[str, str | None]:
    """Versions of the packages fastml works with (None when not installed)."""
    out: dict[str, str | None] = {}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def system_info() -> dict[str, Any]:
    """Everything ``fastml info`` reports, as a JSON-serialisable dict."""
    return {
        "fastml": fastml.build_info(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu": {
            "model": _cpu_model(),
            "logical_cores": os.cpu_count(),
            "physical_cores": _physical_cores(),
            "usable_cores": len(os.sched_getaffinity(0))
            if hasattr(os, "sched_getaffinity")
            else None,
        },
        "memory_bytes": _memory_bytes(),
        "gpus": gpu_info(),
        "packages": package_versions(),
    }
