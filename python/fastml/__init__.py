"""fastml: high-performance native ML infrastructure.

A C++ core (with optional CUDA kernels) behind a thin, typed Python API:

- :mod:`fastml.data`  -- columnar data into shuffled, batched, prefetched batches
- :mod:`fastml.ops`   -- fused GPU kernels for training, with CPU fallbacks
- :mod:`fastml.infer` -- native dynamic batching and tree-ensemble inference
- :mod:`fastml.drift` -- streaming, mergeable drift statistics
- :mod:`fastml.bench` -- benchmarks that compare fastml with its peers

Submodules are imported lazily, so ``import fastml`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fastml import _core
from fastml._version import __version__

if TYPE_CHECKING:
    from fastml import bench, data, drift, infer, ops

__all__ = [
    "FormatError",
    "__version__",
    "bench",
    "build_info",
    "cuda_available",
    "data",
    "drift",
    "get_num_threads",
    "infer",
    "ops",
    "set_num_threads",
]

_SUBMODULES = {"bench", "data", "drift", "infer", "ops"}

FormatError = _core.FormatError
FormatError.__module__ = "fastml"
FormatError.__doc__ = """Malformed content in a file or byte string fastml reads.

Raised when bytes are truncated, corrupted, foreign or inconsistent: a forest
file (:meth:`fastml.infer.Forest.load`), an XGBoost or LightGBM model, a drift
profile (:meth:`fastml.drift.Profile.from_bytes`), a Parquet or ``.npy`` file.
The message names the file (or argument) and the field or byte offset. It is a
:class:`ValueError`; failures to open or read a file stay :class:`OSError`.
"""


def build_info() -> dict[str, Any]:
    """Describe how this fastml was built.

    Returns a dict with at least ``version``, ``compiler``, ``cuda`` (True when
    CUDA kernels were compiled in), ``cuda_version`` (the CUDA runtime they were
    built against, or None), ``simd`` (baseline ISA and the CPU features found at
    run time), ``native`` (built with ``FASTML_NATIVE=ON``) and ``num_threads``.
    """
    return dict(_core.build_info())


def cuda_available() -> bool:
    """True when CUDA code is compiled in and at least one CUDA device is usable."""
    return bool(_core.build_info()["cuda"]) and _core.cuda_device_count() > 0


def set_num_threads(n: int) -> None:
    """Set the size of fastml's shared native thread pool (``n >= 1``).

    Every area (loader, drift ingest, tree inference, ...) runs its native work
    on this one pool. The default is ``FASTML_NUM_THREADS`` when set, else the
    number of CPUs this process may run on.
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    """Number of threads in fastml's shared native thread pool."""
    return int(_core.get_num_threads())


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return importlib.import_module(f"fastml.{name}")
    raise AttributeError(f"module 'fastml' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _SUBMODULES)
