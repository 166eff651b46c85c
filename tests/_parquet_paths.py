"""The three ways the Parquet reader can produce a window, forced for tests.

``stored``: row groups stored in their shuffled order as they are decoded;
``logical``: stored as decoded, the group orders applied to the window's
order; ``pyarrow``: no chunk decoded natively (pyarrow reads them all). The
three must give the same batches.
"""

from __future__ import annotations

from typing import Any

from fastml.data import _loader as loader_mod

DECODE_PATHS = ("stored", "logical", "pyarrow")


def force_decode_path(mp: Any, mode: str) -> None:
    """Make Loaders created under the monkeypatch ``mp`` take decode path ``mode``."""
    if mode not in DECODE_PATHS:
        raise ValueError(f"mode must be one of {DECODE_PATHS}, got {mode!r}")
    mp.setattr(loader_mod, "_CACHED_WINDOW_BYTES", 0 if mode == "stored" else 1 << 60)
    if mode == "pyarrow":
        real = loader_mod.parquet_chunk_table

        def none_native(*a: Any, **kw: Any) -> Any:
            t = real(*a, **kw).copy()
            t[..., 2] = -1  # every chunk "not eligible" for the native decoder
            return t

        mp.setattr(loader_mod, "parquet_chunk_table", none_native)
