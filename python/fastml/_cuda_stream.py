"""The raw handle of torch's current CUDA stream, for fastml's native launches.

Shared by :mod:`fastml.infer` (Forest), :mod:`fastml.drift` (CUDA ingest) and
:mod:`fastml.data` (device staging): each queues native CUDA work on the
caller's current stream, so it is ordered with the caller's torch work and
can be captured in a CUDA graph.

``torch.cuda.current_stream(device).cuda_stream`` builds a Python ``Stream``
object on every call (microseconds, on the latency path of a one-row
``Forest.predict``); torch's own ``_cuda_getCurrentRawStream`` (what Triton
and Inductor call before every launch) returns the same handle directly. It is
a private torch function, so the public call is the fallback where it is
missing.
"""

from __future__ import annotations

from typing import Any

_RAW: Any = None  # torch._C._cuda_getCurrentRawStream, False when missing; resolved once


def current_stream_handle(device: Any) -> int:
    """The ``cudaStream_t`` (as an int) of torch's current stream on ``device``
    (a ``torch.device`` of type cuda, or a device index; no index: the current
    device)."""
    import torch

    global _RAW
    if _RAW is None:
        _RAW = getattr(torch._C, "_cuda_getCurrentRawStream", False)
    index = device if isinstance(device, int) else device.index
    if _RAW:
        return int(_RAW(torch.cuda.current_device() if index is None else index))
    return int(torch.cuda.current_stream(device).cuda_stream)
