"""The Loader: batches of a Dataset, in a deterministic, resumable, sharded order."""

from __future__ import annotations

import abc
import collections
import json
import os
import queue
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np

from fastml import _core
from fastml._cuda_stream import current_stream_handle
from fastml.data import _elastic
from fastml.data._device import TensorStream, check_device_dtype
from fastml.data._sources import (
    arrow_column,
    content_error,
    first_chunk,
    open_parquet,
    parquet_chunk_table,
)
from fastml.data._transforms import column_plan

if TYPE_CHECKING:
    from fastml.data import Dataset

# 2: permutations below 262,144 rows are Fisher-Yates, and Parquet ranks take
# contiguous shares of the epoch order; a version-1 position would resume into
# a different order, so it is refused.
_STATE_VERSION = 2
# States of an epoch resumed at another world size carry "stages" (elastic
# resume); they are written as version 3, so a fastml that predates stages
# refuses them instead of resuming the wrong rows. Both versions load here.
_STATE_VERSION_STAGES = 3
# The Parquet epoch order's definition (state_dict's "parquet_order"; absent
# before session 10, when each window was one uniform permutation of its rows).
_PARQUET_ORDER = 2

_PERM = "\0perm"  # the window's permutation, next to its column buffers (not a column name)


def _check_int(name: str, value: Any, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < lo:
        raise ValueError(f"{name} must be >= {lo}, got {value}")
    return int(value)


def _columns_fingerprint(dataset: Any) -> dict[str, str]:
    """Each column's name with its dtype and per-row shape, e.g. {"x": "float32[8]"}."""
    return {
        name: f"{np.dtype(c.dtype).str}{list(c.shape) if c.shape else ''}"
        for name, c in dataset.schema.items()
    }


def _distributed_defaults() -> tuple[int, int]:
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return int(dist.get_rank()), int(dist.get_world_size())
    return 0, 1


class Loader:
    """Shuffled, batched, prefetched batches of a :class:`~fastml.data.Dataset`.

    Parameters
    ----------
    dataset: the columns to load.
    batch_size: rows per batch (the last one may be smaller unless ``drop_last``).
    shuffle: a new random order every epoch (full permutation for random-access
        data, block shuffle for Parquet); ``False`` reads rows in order.
    seed: with the epoch, determines the order.
    drop_last: drop the final incomplete batch.
    num_threads: at most this many gather tasks run at once on fastml's shared
        pool (default: the pool's size). Never changes the batches. With more
        threads than ``prefetch``, each batch of >= 2,048 rows is gathered in
        ``num_threads // prefetch`` pieces, and smaller batches run up to
        ``num_threads`` ahead, so every thread has work.
    prefetch: batches gathered ahead of the consumer (>= 1). A consumer that has
        to wait is woken once ``max(1, prefetch - num_threads)`` batches are
        ready (fewer wake-ups when loader-bound). Parquet batches are
        made and handed over in chunks of up to
        ``min(256, max(4 * prefetch, ceil(65536 / batch_size)))`` batches, so up
        to about three chunks can be ahead there.
    rank, world_size: this process's shard; default to torch.distributed's when it
        is initialised, else 0 and 1.
    device: ``"cpu"`` or ``"cuda"``/``"cuda:N"`` (torch CUDA tensors: each batch is
        gathered into one pinned buffer and copied in one transfer on a dedicated
        stream ordered with torch's current stream; its tensors are views of one
        device buffer, so keeping any column keeps that batch's memory).
    output: ``"numpy"`` (dict of NumPy arrays) or ``"torch"`` (dict of tensors).
    transforms: ``{column: [FillNa(...), Standardize(...), Clip(...), Cast(...)]}``,
        applied in the native gather.
    shuffle_buffer: Parquet only: rows shuffled together (whole row groups are
        added until this many are buffered). Default: eight row groups of the
        median size, at most 256 MiB of rows, at least
        ``max(65536, 8 * batch_size)``; so a batch draws from about eight row
        groups (two windows are decoded at a time: the current one and the next).

    Iterating yields the remaining batches of the current epoch; when an epoch is
    exhausted the loader moves to the next one. ``state_dict()`` records the
    position, ``load_state_dict()`` resumes at the next batch.
    """

    def __init__(
        self,
        dataset: Dataset,
        batch_size: int = 1024,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        num_threads: int | None = None,
        prefetch: int = 4,
        rank: int | None = None,
        world_size: int | None = None,
        device: str = "cpu",
        output: str = "numpy",
        transforms: Mapping[str, Any] | None = None,
        shuffle_buffer: int | None = None,
    ) -> None:
        from fastml.data import Dataset

        if not isinstance(dataset, Dataset):
            raise TypeError(f"dataset must be a fastml.data.Dataset, got {type(dataset).__name__}")
        self._dataset = dataset
        self._batch_size = _check_int("batch_size", batch_size, 1)
        self._shuffle = bool(shuffle)
        self._seed = _check_int("seed", seed, 0)
        if self._seed >= 2**63:
            raise ValueError(f"seed must be < 2**63, got {self._seed}")
        self._drop_last = bool(drop_last)
        pool = _core.get_num_threads()
        self._max_running = (
            pool if num_threads is None else _check_int("num_threads", num_threads, 1)
        )
        self._prefetch = _check_int("prefetch", prefetch, 1)
        d_rank, d_world = _distributed_defaults()
        self._world_size = (
            d_world if world_size is None else _check_int("world_size", world_size, 1)
        )
        self._rank = (
            (d_rank if world_size is None else 0) if rank is None else _check_int("rank", rank, 0)
        )
        if self._rank >= self._world_size:
            raise ValueError(
                f"rank must be in [0, world_size={self._world_size}), got {self._rank}"
            )
        if output not in ("numpy", "torch"):
            raise ValueError(f"output must be 'numpy' or 'torch', got {output!r}")
        self._output = output
        self._device = self._check_device(device)
        if transforms is None:
            transforms = {}
        if not isinstance(transforms, Mapping):
            raise TypeError(f"transforms must be a dict of lists, got {type(transforms).__name__}")
        unknown = [c for c in transforms if c not in dataset.schema]
        if unknown:
            raise KeyError(
                f"transforms name unknown columns {unknown} (dataset has {dataset.columns})"
            )
        specs = [
            column_plan(n, info.dtype, info.shape, transforms.get(n))
            for n, info in dataset.schema.items()
        ]
        if shuffle_buffer is not None:
            shuffle_buffer = _check_int("shuffle_buffer", shuffle_buffer, 1)
        # Buffers in use by the consumer are never recycled; the pool only
        # remembers this many per column for reuse. The Parquet reader has up to
        # three chunks of batches in flight (being consumed, queued, being made).
        capacity = self._prefetch + 4
        if dataset.is_streamed:
            capacity += 3 * _chunk_batches(self._prefetch, self._batch_size)
        self._plan = _core.DataGatherPlan(specs, capacity)
        if shuffle_buffer is None:
            shuffle_buffer = default_shuffle_buffer(dataset, self._batch_size)
        self._shuffle_buffer = shuffle_buffer
        self._engine: Any = None
        self._parquet_files: dict[int, Any] = {}  # open ParquetFile objects by file number
        self._parquet_maps: dict[int, Any] = {}  # the same files memory-mapped (native decoder)
        # Window buffers of the native Parquet decoder, reused across windows and epochs.
        self._parquet_buffers: list[dict[str, np.ndarray]] = []
        self._parquet_buffers_lock = threading.Lock()
        self._parquet_lock = threading.Lock()
        # Device-resident data sets (Dataset.to): gathered on their device.
        self._device_plans: dict[str, Any] | None = None
        if dataset._tensors is not None:
            if self._device not in ("cpu", str(dataset._device)) and not (
                self._device == "cuda" and dataset._device.type == "cuda"
            ):
                raise ValueError(
                    f"device={device!r} but the data set lives on {dataset._device}; batches "
                    "come from where the data set is (leave device at its default)"
                )
            self._device = "cpu"  # no staging: batches are made on the data set's device
            self._device_plans = {}
            for name, _src, row_shape, out_name, ops in specs:
                check_device_dtype(name, np.dtype(out_name), "the Cast of column")
                self._device_plans[name] = (ops, np.dtype(out_name), tuple(row_shape))
        elif not dataset.is_streamed:
            arrays = [a for _, a in dataset._iter_columns()]
            self._engine = _core.DataEngine(
                self._plan, arrays, self._batch_size, self._prefetch, self._max_running
            )
        self._stager: Any = None
        if self._device != "cpu":
            self._stager = _CudaStager(self._device, self._plan)
        self._epoch = 0
        self._position = 0  # batches of the current epoch handed out
        # An epoch resumed at another world size: its earlier layouts, oldest
        # first ([(world_size, batches consumed per rank)], see _elastic.py);
        # empty for a normal epoch.
        self._stages: list[tuple[int, list[int]]] = []
        self._positions_cache: tuple[Any, np.ndarray] | None = None
        # The live iteration: its stream, the thread that iterates it and a weak
        # reference to its iterator (see __iter__); _lock guards the three.
        self._lock = threading.RLock()
        self._active: _Stream | None = None
        self._active_thread = 0
        self._active_iter: Any = None
        self._closed = False
        self._py_stats = {
            "row_groups_read": 0,
            "wait_seconds": 0.0,
            "worker_seconds": 0.0,
            "batches": 0,
            "rows": 0,
            "bytes": 0,
        }

    # ------------------------------------------------------------ configuration

    def _check_device(self, device: Any) -> str:
        dev = str(device)
        if dev == "cpu":
            return dev
        if dev == "cuda" or dev.startswith("cuda:"):
            if not _core.build_info()["cuda"]:
                raise RuntimeError(
                    f"device={dev!r} needs fastml built with CUDA (FASTML_CUDA=ON); this build is CPU-only"
                )
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError(f"device={dev!r} but torch sees no CUDA device")
            return dev
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")

    @property
    def dataset(self) -> Dataset:
        """The dataset this loader reads."""
        return self._dataset

    @property
    def batch_size(self) -> int:
        """Rows per batch."""
        return self._batch_size

    @property
    def epoch(self) -> int:
        """The epoch that iteration continues in."""
        return self._epoch

    def rows_per_rank(self) -> int:
        """Rows this rank reads per epoch (after padding or truncation to the world size)."""
        n, w = len(self._dataset), self._world_size
        return (n // w) if self._drop_last else -(-n // w)

    def __len__(self) -> int:
        """Batches in the current epoch for this rank (the same on every rank).

        After an elastic resume (``load_state_dict`` with the states of another
        world size), the batches of this rank's share of the rest of that epoch.
        """
        if self._stages:
            return -(-len(self._elastic_positions()) // self._batch_size)
        rows, b = self.rows_per_rank(), self._batch_size
        return rows // b if self._drop_last else -(-rows // b)

    def _layout(self) -> str:
        return _elastic.CONTIGUOUS if self._dataset.is_streamed else _elastic.STRIDED

    def _elastic_positions(self) -> np.ndarray:
        """This rank's positions of the current (resumed) epoch, in reading order."""
        key = (self._epoch, tuple((w, tuple(c)) for w, c in self._stages), self._rank)
        if self._positions_cache is None or self._positions_cache[0] != key:
            pos, _own = _elastic.epoch_share(
                self._layout(),
                len(self._dataset),
                self._stages,
                self._world_size,
                self._rank,
                self._batch_size,
                self._drop_last,
            )
            self._positions_cache = (key, pos)
        return self._positions_cache[1]

    def _elastic_rows(self) -> np.ndarray:
        """This rank's rows of the current (resumed) random-access epoch, in order."""
        order = _elastic.epoch_order(len(self._dataset), self._shuffle, self._seed, self._epoch)
        return np.ascontiguousarray(order[self._elastic_positions()])

    def _next_epoch(self) -> None:
        self._epoch += 1
        self._position = 0
        self._stages = []

    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch at the next iteration (a live
        iteration ends: see :meth:`__iter__`)."""
        epoch = _check_int("epoch", epoch, 0)
        self._stop_active("set_epoch()")
        self._epoch = epoch
        self._position = 0
        self._stages = []

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The position as a small JSON-serialisable dict (continue with load_state_dict)."""
        return {
            "version": _STATE_VERSION_STAGES if self._stages else _STATE_VERSION,
            "epoch": self._epoch,
            "batches_consumed": self._position,
            "seed": self._seed,
            "shuffle": self._shuffle,
            "batch_size": self._batch_size,
            "drop_last": self._drop_last,
            "rank": self._rank,
            "world_size": self._world_size,
            "num_rows": len(self._dataset),
            "shuffle_buffer": self._shuffle_buffer if self._dataset.is_streamed else None,
            "parquet_order": _PARQUET_ORDER if self._dataset.is_streamed else None,
            "columns": _columns_fingerprint(self._dataset),
            "stages": [[w, list(c)] for w, c in self._stages],
        }

    def load_state_dict(self, state: Mapping[str, Any] | Sequence[Mapping[str, Any]]) -> None:
        """Resume from ``state_dict()``: the next batch is the one after those consumed.

        ``state`` is this rank's dict (the loader must be configured as the one
        that produced it), or the list of **every** rank's dict saved at one
        point (any order). With the list, the world size may differ from the
        one that saved it (elastic resume): the rest of that epoch (the
        positions no old rank consumed) is shared out over the current ranks,
        each read once, with the same number of batches on every rank (see
        ``docs/data.md``); the next epoch is a normal one at the current world
        size. At an unchanged world size the list resumes exactly as this
        rank's own dict would. The thread count never matters.

        Everything else must match (dataset size and columns (names, dtypes,
        per-row shapes), seed, shuffle, batch_size, drop_last, and for a single
        dict rank and world_size); ValueError names the first setting that
        differs. States saved before the columns were recorded are checked
        without them.
        """
        if isinstance(state, (str, bytes)):
            state = json.loads(state)
        if isinstance(state, Sequence) and not isinstance(state, Mapping):
            return self._load_states(list(state))
        state = self._check_state(state, "state", same_rank=True)
        epoch, pos, stages = self._parse_position(state, "state")
        self._stop_active("load_state_dict()")
        self._epoch, self._stages = epoch, stages
        self._positions_cache = None
        if pos > len(self):
            self._stages = []
            raise ValueError(f"state['batches_consumed'] must be <= {len(self)}, got {pos}")
        self._position = pos

    def _check_state(self, state: Any, name: str, same_rank: bool) -> Mapping[str, Any]:
        if isinstance(state, (str, bytes)):
            state = json.loads(state)
        if not isinstance(state, Mapping):
            raise TypeError(f"{name} must be a dict from state_dict(), got {type(state).__name__}")
        if state.get("version") not in (_STATE_VERSION, _STATE_VERSION_STAGES):
            raise ValueError(
                f"{name} has version {state.get('version')!r}, expected {_STATE_VERSION} or "
                f"{_STATE_VERSION_STAGES} "
                "(the epoch order changed between versions; start the epoch afresh)"
            )
        mine = self.state_dict()
        if self._dataset.is_streamed and state.get("parquet_order", 1) != _PARQUET_ORDER:
            raise ValueError(
                f"{name} was saved by a fastml whose Parquet epoch order differs (parquet_order="
                f"{state.get('parquet_order', 1)!r}, this one {_PARQUET_ORDER}: row groups are "
                "now shuffled within windows of several groups); resuming it here would repeat "
                "and skip rows: start the epoch afresh (set_epoch)"
            )
        keys = ["seed", "shuffle", "batch_size", "drop_last", "num_rows", "shuffle_buffer"]
        if same_rank:
            keys[4:4] = ["rank", "world_size"]
        for key in keys:
            if state.get(key) != mine[key]:
                raise ValueError(
                    f"{name} {key}={state.get(key)!r} does not match this loader's "
                    f"{key}={mine[key]!r}"
                )
        if "columns" in state and state["columns"] != mine["columns"]:
            raise ValueError(
                f"{name} was saved from a data set with columns {state['columns']!r}; this "
                f"loader's data set has {mine['columns']!r}"
            )
        return state

    def _parse_position(
        self, state: Mapping[str, Any], name: str
    ) -> tuple[int, int, list[tuple[int, list[int]]]]:
        epoch = _check_int(f"{name}['epoch']", state.get("epoch"), 0)
        if epoch >= 2**63:
            raise ValueError(f"{name}['epoch'] must be < 2**63, got {epoch}")
        pos = _check_int(f"{name}['batches_consumed']", state.get("batches_consumed"), 0)
        raw = state.get("stages", [])
        if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)):
            raise ValueError(f"{name}['stages'] must be a list, got {type(raw).__name__}")
        if raw and state.get("version") != _STATE_VERSION_STAGES:
            raise ValueError(
                f"{name} has stages but version {state.get('version')!r}; states with "
                f"stages are version {_STATE_VERSION_STAGES}"
            )
        stages: list[tuple[int, list[int]]] = []
        for k, st in enumerate(raw):
            if not (isinstance(st, Sequence) and len(st) == 2 and isinstance(st[1], Sequence)):
                raise ValueError(
                    f"{name}['stages'][{k}] must be [world_size, [batches per rank]], got {st!r}"
                )
            w = _check_int(f"{name}['stages'][{k}][0]", st[0], 1)
            if len(st[1]) != w:
                raise ValueError(
                    f"{name}['stages'][{k}] lists {len(st[1])} ranks for world size {w}"
                )
            c = [_check_int(f"{name}['stages'][{k}][1]", v, 0) for v in st[1]]
            stages.append((w, c))
        if len(stages) > 64:
            raise ValueError(f"{name}['stages'] holds {len(stages)} stages; at most 64")
        return epoch, pos, stages

    def _load_states(self, states: list[Any]) -> None:
        if not states:
            raise ValueError("states must hold every rank's state_dict(), got an empty list")
        checked = [
            self._check_state(s, f"states[{i}]", same_rank=False) for i, s in enumerate(states)
        ]
        parsed = [self._parse_position(s, f"states[{i}]") for i, s in enumerate(checked)]
        world = _check_int("states[0]['world_size']", checked[0].get("world_size"), 1)
        epoch, _, stages = parsed[0]
        by_rank: dict[int, int] = {}
        for i, (s, (e, pos, st)) in enumerate(zip(checked, parsed, strict=True)):
            if s.get("world_size") != world:
                raise ValueError(
                    f"states[{i}] world_size={s.get('world_size')!r} differs from states[0]'s "
                    f"{world}: pass the states saved at one point by every rank"
                )
            if e != epoch or st != stages:
                raise ValueError(
                    f"states[{i}] is at epoch {e} (stages {st}); states[0] is at epoch {epoch} "
                    f"(stages {stages}): pass the states saved at one point by every rank"
                )
            r = _check_int(f"states[{i}]['rank']", s.get("rank"), 0)
            if r >= world or r in by_rank:
                raise ValueError(
                    f"states[{i}] rank={r} is out of range or repeated for world size {world}"
                )
            by_rank[r] = pos
        missing = sorted(set(range(world)) - set(by_rank))
        if missing:
            raise ValueError(
                f"states lack ranks {missing[:8]} of world size {world}: an elastic resume "
                "needs every rank's state"
            )
        consumed = [by_rank[r] for r in range(world)]
        n = len(self._dataset)
        for r, pos in enumerate(consumed):
            if stages:
                got, _own = _elastic.epoch_share(
                    self._layout(), n, stages, world, r, self._batch_size, self._drop_last
                )
                bound = -(-len(got) // self._batch_size)
            else:
                bound = _elastic.batches_per_rank(n, world, self._batch_size, self._drop_last)
            if pos > bound:
                raise ValueError(
                    f"the state of rank {r} has batches_consumed={pos}; that rank had {bound}"
                )
        self._stop_active("load_state_dict()")
        self._positions_cache = None
        self._epoch = epoch
        if world == self._world_size:  # unchanged: exactly this rank's own resume
            self._stages, self._position = stages, consumed[self._rank]
            return
        # Nothing consumed yet (e.g. saved at an epoch's end): a normal epoch here.
        fresh = not stages and not any(consumed)
        self._stages = [] if fresh else [*stages, (world, consumed)]
        self._position = 0

    # ------------------------------------------------------------ iteration

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """The remaining batches of the current epoch (then the epoch advances).

        One iteration at a time: a Loader has one position, and each epoch's
        batches are handed out once. ``iter()`` on another thread while an
        iteration is live (its iterator not exhausted, closed or dropped)
        raises ``RuntimeError``; give each consumer its own Loader (with
        ``rank``/``world_size`` to split an epoch between them). On the same
        thread, a new ``iter()`` supersedes the old iteration, which ends
        without taking another batch. ``close()``, ``set_epoch()`` and
        ``load_state_dict()`` end the live iteration too, waking a consumer
        that waits for a batch: when they come from another thread, that
        consumer's next step raises ``RuntimeError`` naming the call (its epoch
        did not finish); from its own thread, it just ends.
        """
        me = threading.get_ident()
        with self._lock:
            if self._closed:
                raise RuntimeError("the loader is closed")
            if self._active is not None and self._active_thread != me and self._iter_live():
                raise RuntimeError(
                    "this Loader is already being iterated by another thread; a Loader "
                    "hands out each batch once, to one iteration at a time: give each "
                    "consumer its own Loader (rank/world_size split an epoch between them)"
                )
            self._stop_active("a newer iteration")
            if self._position >= len(self):
                self._next_epoch()
            stream = self._open_stream()
            it = self._run(stream)
            self._active, self._active_thread = stream, me
            self._active_iter = weakref.ref(it)
        return it

    def _iter_live(self) -> bool:
        """Whether the live iteration's iterator still exists (one dropped before
        its first step never runs its cleanup)."""
        ref = self._active_iter
        return ref is not None and ref() is not None

    def _open_stream(self) -> Any:
        if self._device_plans is not None:
            return TensorStream(self)
        if self._engine is not None:
            return _EngineStream(self)
        return _ParquetStream(self)

    def _run(self, stream: _Stream) -> Iterator[dict[str, Any]]:
        try:
            convert = self._convert
            lock = self._lock
            while True:
                batch = stream.next()
                with lock:  # counted only while this is the live iteration
                    live = self._active is stream
                    if live and batch is not None:
                        self._position += 1
                if not live or batch is None:
                    if stream.ended_by is not None:
                        raise RuntimeError(
                            f"this iteration was ended by {stream.ended_by} on another "
                            "thread before its epoch finished"
                        )
                    if not live:
                        return  # superseded on this thread: ends quietly
                    break
                yield batch if convert is None else convert(batch)
            with self._lock:
                if self._active is stream:
                    self._next_epoch()
        finally:
            stream.close()
            with self._lock:
                if self._active is stream:
                    self._active = self._active_iter = None

    @property
    def _convert(self) -> Any:
        if self._device_plans is not None:
            return None  # already torch tensors on the data set's device
        if self._stager is not None:
            return self._stager.to_device
        if self._output == "torch":
            import torch

            return lambda b: {k: torch.from_numpy(v) for k, v in b.items()}
        return None

    def _stop_active(self, cause: str = "a newer iteration") -> None:
        """End the live iteration (waking its consumer); ``cause`` names the call
        in the error its consumer gets when the call came from another thread."""
        with self._lock:
            stream = self._active
            if stream is None:
                return
            if self._active_thread != threading.get_ident():
                stream.ended_by = cause
            self._active = self._active_iter = None
        stream.close()

    def stats(self) -> dict[str, Any]:
        """Batches, rows and bytes produced; seconds the consumer waited for batches
        (``wait_seconds``: high means loader-bound) and seconds workers spent
        producing them (``worker_seconds``); buffer allocations and reuses; with
        ``device="cuda"`` the copies (``h2d_copies`` batches, ``h2d_transfers``
        copy calls, ``h2d_bytes``, ``h2d_copied_bytes`` with padding, ``h2d_waits``,
        ``h2d_inflight``)."""
        if self._engine is not None:
            s = dict(self._engine.stats())
        else:
            s = dict(self._py_stats)
            s["buffers_allocated"] = self._plan.buffers_allocated()
            s["buffers_reused"] = self._plan.buffers_reused()
        s["epoch"] = self._epoch
        s["batches_consumed"] = self._position
        if self._stager is not None:
            s.update(self._stager.stats())
        return s

    def close(self) -> None:
        """Stop the workers and free the batch buffers (batches still referenced stay
        valid). A live iteration ends (see :meth:`__iter__`)."""
        self._stop_active("Loader.close()")
        if self._stager is not None:
            self._stager.close()
        with self._parquet_lock:
            for f in self._parquet_files.values():
                f.close()
            self._parquet_files.clear()
            self._parquet_maps.clear()  # unmapped once no decode holds them
        with self._parquet_buffers_lock:
            self._parquet_buffers.clear()
        self._closed = True

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self._stop_active("the Loader's deletion")
        except Exception:
            pass


class _Stream(abc.ABC):
    """One epoch's source of batches (native engine or Parquet reader).

    ``ended_by``: the call that ended it from another thread than its consumer's
    (set before ``close()``), None otherwise."""

    ended_by: str | None = None

    @abc.abstractmethod
    def next(self) -> dict[str, np.ndarray] | None:
        """The next batch, or None at the end of the epoch."""

    @abc.abstractmethod
    def close(self) -> None:
        """Stop producing and release what the stream holds."""


class _EngineStream(_Stream):
    """Random-access datasets: the native engine does everything. One stream per
    iteration; a stream that was superseded (a newer iter()) yields nothing more
    and never touches the engine again."""

    def __init__(self, loader: Loader) -> None:
        self._engine = loader._engine
        self._closed = False
        self._pid = os.getpid()
        if loader._stages:  # an elastic resume: this rank's share of the epoch's rest
            rows = loader._elastic_rows()
            self._token = self._engine.start_rows(rows, loader._drop_last, loader._position)
            return
        self._token = self._engine.start(
            loader._shuffle,
            loader._seed,
            loader._epoch,
            loader._rank,
            loader._world_size,
            loader._drop_last,
            loader._position,
        )

    def next(self) -> dict[str, np.ndarray] | None:
        if self._closed:
            return None
        return self._engine.next(self._token)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            # A forked child (e.g. a DataLoader worker) inherits this object but
            # not the pool threads whose gathers it would wait for.
            if os.getpid() == self._pid:
                self._engine.stop()


class _ParquetStream(_Stream):
    """Parquet: a producer thread decodes row groups (pyarrow releases the GIL
    while decoding), shuffles them in windows and gathers batches natively.

    A dedicated thread is the design here: decoding is pyarrow's work, driven
    from Python, and must overlap with the consumer.
    """

    _DONE = object()

    def __init__(self, loader: Loader) -> None:
        self._loader = loader
        # Batches travel in chunks (all the batches one native call completed,
        # at most _chunk_batches(prefetch)), so the hand-off costs one queue
        # operation per chunk rather than per batch.
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=1)
        self._ready: collections.deque[dict[str, np.ndarray]] = collections.deque()
        self._chunk_rows = 0
        self._row_bytes = loader._plan.out_row_bytes
        self._stop = threading.Event()
        self._stats = loader._py_stats
        self._thread = threading.Thread(
            target=self._produce, name="fastml-data-parquet", daemon=True
        )
        self._thread.start()

    def next(self) -> dict[str, np.ndarray] | None:
        if self._stop.is_set():  # closed or superseded by a newer iteration
            return None
        ready = self._ready
        if not ready:
            t0 = time.perf_counter()
            item = self._queue.get()
            self._stats["wait_seconds"] += time.perf_counter() - t0
            if item is self._DONE:
                self._queue.put(self._DONE)
                return None
            if isinstance(item, BaseException):
                self.close()
                raise item
            batches, rows = item
            ready.extend(batches)
            self._chunk_rows = rows
        stats = self._stats
        stats["batches"] += 1
        stats["rows"] += self._chunk_rows
        stats["bytes"] += self._chunk_rows * self._row_bytes
        return ready.popleft()

    def close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
        while not self._queue.empty():
            self._queue.get_nowait()
        self._ready.clear()
        # A consumer blocked in next() on another thread wakes on this (the
        # producer is gone, so nothing else would ever reach the queue). Full:
        # the consumer has just put back the producer's own end mark, which
        # wakes it as well.
        try:
            self._queue.put_nowait(self._DONE)
        except queue.Full:
            pass

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def _produce(self) -> None:
        batches = _parquet_batches(self._loader, self._stop, spent := [0.0])
        try:
            t0 = time.perf_counter()
            for chunk in batches:
                self._stats["worker_seconds"] += time.perf_counter() - t0 - spent[0]
                if not self._put(chunk):
                    return
                t0 = time.perf_counter()
                spent[0] = 0.0
            self._put(self._DONE)
        except BaseException as e:
            self._put(e)
        finally:
            batches.close()  # joins the read-ahead thread


# The default Parquet window: this many row groups of the median size, within
# this many bytes of decoded rows (two windows are alive at a time).
_WINDOW_GROUPS = 8
_WINDOW_BYTES = 256 << 20


def default_shuffle_buffer(dataset: Any, batch_size: int) -> int:
    """``shuffle_buffer`` when none is given: rows of ``_WINDOW_GROUPS`` row groups
    of the median size, so that batches mix that many row groups, but at most
    ``_WINDOW_BYTES`` of decoded rows (the columns as the file holds them, which
    is what a window keeps; transforms do not change it); never below
    ``max(65536, 8 * batch_size)``."""
    floor = max(65536, 8 * batch_size)
    groups = getattr(dataset, "_row_groups", None) if dataset.is_streamed else None
    if not groups:
        return floor
    sizes = sorted(g.rows for g in groups)
    want = _WINDOW_GROUPS * sizes[len(sizes) // 2]
    row_bytes = sum(
        info.dtype.itemsize * int(np.prod(info.shape)) for info in dataset._sources.values()
    )
    cap = _WINDOW_BYTES // max(row_bytes, 1)
    return max(floor, min(want, cap))


# Random streams of each row group's own order in a Parquet epoch (windows use
# streams 2 + window index, far below this).
_GROUP_STREAM = 1 << 40
# Windows whose widest column holds more bytes than this have their row groups
# stored in shuffled order as they are decoded (see load_window): about a
# core's L2, where random gathers stop being cheap.
_CACHED_WINDOW_BYTES = 512 << 10


def _one_array(a: Any) -> np.ndarray:
    """One contiguous array of a column that may come in chunks."""
    return np.ascontiguousarray(np.concatenate(a) if isinstance(a, list) else a)


def parquet_epoch_layout(
    row_counts: list[int], shuffle: bool, seed: int, epoch: int, buffer_rows: int
) -> list[list[int]]:
    """Windows of an epoch: lists of row-group numbers whose rows are shuffled together.

    Row groups are visited in a permuted order (stream 1 of the epoch's generator)
    and grouped consecutively until each window holds at least ``buffer_rows`` rows.
    """
    order = (
        _core.data_permutation(len(row_counts), seed, epoch, 1)
        if shuffle
        else range(len(row_counts))
    )
    windows: list[list[int]] = []
    cur: list[int] = []
    rows = 0
    for g in order:
        cur.append(int(g))
        rows += row_counts[int(g)]
        if rows >= buffer_rows:
            windows.append(cur)
            cur, rows = [], 0
    if cur:
        windows.append(cur)
    return windows


def _parquet_batches(
    loader: Loader, stop: threading.Event, spent: list[float]
) -> Iterator[tuple[list[dict[str, np.ndarray]], int]]:
    """Yields this rank's batches of the current epoch from the current position,
    in chunks: (batches, rows of each)."""
    ds = loader._dataset
    rgs = ds._row_groups
    n = len(ds)
    w, bsz = loader._world_size, loader._batch_size
    total = (n // w) * w if loader._drop_last else -(-n // w) * w  # positions incl. padding
    per_rank = total // w
    num_batches = len(loader)
    if loader._position >= num_batches:
        return
    windows = parquet_epoch_layout(
        [g.rows for g in rgs], loader._shuffle, loader._seed, loader._epoch, loader._shuffle_buffer
    )
    starts = np.cumsum([0] + [sum(rgs[g].rows for g in win) for win in windows])
    plan = loader._plan
    # The file columns decoded, and the plan's columns: those, or feature
    # columns assembled from several of them (Dataset.from_parquet(features=)).
    names = list(ds._sources)
    features = ds._features
    outputs = list(ds.schema)

    def assemble(column: Any) -> list[Any]:
        """The plan's source arrays: a feature column is a tuple of its columns'
        1-D arrays (the gather writes its rows from them)."""
        return [
            tuple(_one_array(column(src)) for src in features[c]) if c in features else column(c)
            for c in outputs
        ]

    # The open (memory-mapped) files stay open across epochs: mapping them anew
    # every epoch costs a page fault per few pages of the file again.
    files = loader._parquet_files
    maps = loader._parquet_maps  # the same files, memory-mapped for the native decoder
    # This rank reads entries [first, last) of its range of the epoch's positions
    # (see parquet_rank_segments).
    first = loader._position * bsz
    last = min(num_batches * bsz, per_rank)
    if loader._stages:  # an elastic resume: this rank's share of the epoch's rest
        positions = loader._elastic_positions()[first:]
        segments = [
            seg
            for a, z in _elastic.position_ranges(positions)
            for seg in parquet_rank_segments(starts, n, 0, a, z)
        ]
    else:
        segments = parquet_rank_segments(starts, n, loader._rank * per_rank, first, last)

    read_lock = loader._parquet_lock  # one reader of the ParquetFile objects at a time

    def read_groups(groups: list[int], columns: list[str]) -> Any:
        """The rows of `groups` (in that order) as one Table: each run of groups
        from one file is decoded by one pyarrow call (columns and row groups in
        parallel on Arrow's threads, the GIL released)."""
        import pyarrow as pa

        tables = []
        with read_lock:
            i = 0
            while i < len(groups):
                f = rgs[groups[i]].file
                j = i
                while j < len(groups) and rgs[groups[j]].file == f:
                    j += 1
                if f not in files:
                    files[f] = open_parquet(ds._files[f])
                pf = files[f]
                run = [rgs[g].index for g in groups[i:j]]
                try:
                    tables.append(pf.read_row_groups(run, columns=columns, use_threads=True))
                except (pa.ArrowException, OSError) as err:
                    # Name the failing row group (read them one by one to find it).
                    for g in run:
                        try:
                            pf.read_row_group(g, columns=columns, use_threads=True)
                        except (pa.ArrowException, OSError) as e:
                            raise content_error(
                                ds._files[f], f"(row group {g}) cannot be read", e
                            ) from None
                    raise content_error(
                        ds._files[f], f"(row groups {run}) cannot be read", err
                    ) from None
                loader._py_stats["row_groups_read"] += j - i
                i = j
        return pa.concat_tables(tables) if len(tables) > 1 else tables[0]

    # Native decoding: columns fastml's decoder reads (see parquet_chunk_table)
    # are decoded straight into window buffers (and the window's permutation
    # into one more), which the loader keeps from window to window and epoch
    # to epoch: a value is decoded once, with no Arrow arrays and no fresh
    # pages. At most two windows hold buffers at a time (the one being
    # gathered and the one read ahead). Other columns, and any chunk the
    # decoder reports as unsupported or corrupt, go through pyarrow (a chunk
    # fails only if pyarrow cannot read it either).
    col_info = [ds._sources[c] for c in names]
    dtypes = [info.dtype if info.shape == () else None for info in col_info]
    widest_value = max(info.dtype.itemsize * int(np.prod(info.shape)) for info in col_info)
    free_buffers = loader._parquet_buffers
    buffers_lock = loader._parquet_buffers_lock
    window_cap = int(np.max(np.diff(starts))) if len(starts) > 1 else 0

    def chunk_table(f: int) -> np.ndarray:
        table = ds._parquet_chunks.get(f)
        if table is None:
            table = ds._parquet_chunks[f] = parquet_chunk_table(files[f], names, dtypes)
        return table

    def take_buffers(m: int) -> dict[str, np.ndarray]:
        with buffers_lock:
            while free_buffers:
                bufs = free_buffers.pop()
                if len(bufs[_PERM]) >= m:
                    return bufs
        cap = max(m, window_cap)
        bufs = {
            c: np.empty((cap, *info.shape), dtype=info.dtype)
            for c, info in zip(names, col_info, strict=True)
        }
        bufs[_PERM] = np.empty(cap, dtype=np.int64)
        return bufs

    def give_buffers(bufs: dict[str, np.ndarray] | None) -> None:
        if bufs is not None:
            with buffers_lock:
                free_buffers.append(bufs)

    def native_decode(
        groups: list[int], orders: list[np.ndarray] | None
    ) -> dict[str, np.ndarray] | None:
        """Decodes the window's chunks natively where possible, the rest with
        pyarrow, into window buffers; None when no chunk of the window can be
        decoded natively (the pyarrow path then reads it all). ``orders``: each
        group's rows are stored in that order (see load_window)."""
        with read_lock:
            tables = []
            for g in groups:
                f = rgs[g].file
                if f not in files:
                    files[f] = open_parquet(ds._files[f])
                tables.append(chunk_table(f)[rgs[g].index])
            if not any((t[:, 2] >= 0).any() for t in tables):
                return None
            file_ix: dict[int, int] = {}
            mapped: list[Any] = []
            for g, t in zip(groups, tables, strict=True):
                f = rgs[g].file
                if f not in file_ix and (t[:, 2] >= 0).any():
                    if f not in maps:
                        maps[f] = _core.MappedFile(ds._files[f])
                    file_ix[f] = len(mapped)
                    mapped.append(maps[f])
        m = sum(rgs[g].rows for g in groups)
        bufs = take_buffers(m)
        try:
            rows: list[Any] = []
            outs: list[np.ndarray] = []
            perms: list[np.ndarray | None] = []
            where: list[tuple[int, int]] = []  # (group, column) of each native chunk
            fallback: dict[int, list[int]] = {}  # group -> columns read by pyarrow
            row0 = 0
            for gi, (g, t) in enumerate(zip(groups, tables, strict=True)):
                f, n_g = rgs[g].file, rgs[g].rows
                for j, c in enumerate(names):
                    if t[j, 2] < 0:
                        fallback.setdefault(g, []).append(j)
                        continue
                    rows.append((file_ix[f], *t[j]))
                    outs.append(bufs[c][row0 : row0 + n_g])
                    perms.append(orders[gi] if orders is not None else None)
                    where.append((g, j))
                row0 += n_g
            results = _core.parquet_decode(
                mapped, np.array(rows, dtype=np.int64), outs, perms if orders is not None else None
            )
            failed: dict[tuple[int, int], str] = {}
            for (g, j), (status, msg) in zip(where, results, strict=True):
                if status == 3:
                    path = ds._files[rgs[g].file]
                    raise _core.FormatError(
                        f"column '{names[j]}' {msg} ({path!r}, row group {rgs[g].index})"
                    )
                if status != 0:
                    fallback.setdefault(g, []).append(j)
                    if status == 2:
                        failed[(g, j)] = msg
            row0 = 0
            for gi, g in enumerate(groups):
                cols = fallback.get(g)
                if cols:
                    part = read_fallback(g, [names[j] for j in sorted(cols)], failed)
                    for j in cols:
                        a = arrow_column(names[j], part.column(names[j]))
                        a = np.concatenate(a) if isinstance(a, list) else a
                        check_chunk(g, names[j], a)
                        if orders is not None:
                            a = a[orders[gi]]
                        bufs[names[j]][row0 : row0 + rgs[g].rows] = a
                else:
                    loader._py_stats["row_groups_read"] += 1
                row0 += rgs[g].rows
            return bufs
        except BaseException:
            give_buffers(bufs)
            raise

    def read_fallback(g: int, columns: list[str], failed: dict[tuple[int, int], str]) -> Any:
        """Columns of one row group read by pyarrow; if pyarrow fails on a chunk
        the native decoder found corrupt, the error names both findings."""
        try:
            return read_groups([g], columns)
        except (OSError, _core.FormatError) as e:
            bad = [(names[j], msg) for (gg, j), msg in failed.items() if gg == g]
            if not bad:
                raise
            path = ds._files[rgs[g].file]
            c, msg = bad[0]
            raise _core.FormatError(
                f"{path!r}: cannot read row group {rgs[g].index}, column '{c}': {msg} "
                f"(pyarrow: {e})"
            ) from None

    def check_chunk(g: int, c: str, a: np.ndarray, whole: bool = True) -> None:
        if a.shape[1:] != ds._sources[c].shape or a.dtype != ds._sources[c].dtype:
            raise _core.FormatError(f"{ds._files[rgs[g].file]!r}: column '{c}' changed type")
        if whole and a.shape[0] != rgs[g].rows:
            raise _core.FormatError(
                f"{ds._files[rgs[g].file]!r}: row group {rgs[g].index} has {rgs[g].rows} rows "
                f"in the footer, column '{c}' has {a.shape[0]}"
            )

    def load_window(wi: int) -> tuple[Any, np.ndarray, bool, dict[str, np.ndarray] | None]:
        """The window's sources and its order. Shuffled, the order is a uniform
        permutation of the window's rows built in two steps: each row group's
        own order (stream GROUP_STREAM + group), applied while decoding, when
        the group's values are in cache; then the positions' groups are a
        uniformly random arrangement of the window's rows' groups (stream
        2 + window), and each position takes its group's next row
        (data_window_order). The gather then reads each group front to back
        instead of at random over the whole window (which cost half the
        throughput with 8 row groups per window). Small windows, and rows
        pyarrow decodes (no window buffers), take the same order through the
        group orders instead."""
        m = int(starts[wi + 1] - starts[wi])
        groups = windows[wi]
        offsets = np.cumsum([0] + [rgs[g].rows for g in groups], dtype=np.int64)
        orders = (
            [
                _core.data_permutation(rgs[g].rows, loader._seed, loader._epoch, _GROUP_STREAM + g)
                for g in groups
            ]
            if loader._shuffle
            else None
        )
        # A window whose columns fit a core's cache is gathered at random just as
        # fast: its groups are stored as decoded, their orders applied logically.
        stored = orders is not None and m * widest_value > _CACHED_WINDOW_BYTES
        bufs = native_decode(groups, orders if stored else None)
        try:
            if bufs is not None:
                arrays = assemble(lambda c: bufs[c][:m])
                perm_out = bufs[_PERM][:m]
            else:
                table = read_groups(windows[wi], names)
                if table.num_rows != m:
                    f0 = rgs[windows[wi][0]]
                    raise _core.FormatError(
                        f"{ds._files[f0.file]!r}: row groups from {f0.index} hold "
                        f"{table.num_rows} rows, the footer says {m}"
                    )
                read = {c: arrow_column(c, table.column(c)) for c in names}
                for c, a in read.items():
                    check_chunk(windows[wi][0], c, first_chunk(a), whole=False)
                arrays = assemble(read.__getitem__)
                perm_out = None
            in_order = stored and bufs is not None  # rows stored in their group's order
            if loader._shuffle:
                assert orders is not None
                if len(groups) == 1:  # one group: its order is the window's
                    perm = perm_out if perm_out is not None else np.empty(m, dtype=np.int64)
                    perm[:] = np.arange(m, dtype=np.int64) if in_order else orders[0]
                else:
                    perm = perm_out if perm_out is not None else np.empty(m, dtype=np.int64)
                    _core.data_window_order(
                        perm, offsets, loader._seed, loader._epoch, 2 + wi,
                        None if in_order else orders,
                    )  # fmt: skip
            elif perm_out is not None:
                perm_out[:] = np.arange(m, dtype=np.int64)
                perm = perm_out
            else:
                perm = np.arange(m, dtype=np.int64)
            # Ascending runs (one per group; one in all without shuffling).
            streams = in_order or not loader._shuffle
            return plan.bind(arrays), perm, streams, bufs
        except BaseException:
            give_buffers(bufs)
            raise

    # Read-ahead: the next window this rank needs is decoded on a second thread
    # (pyarrow releases the GIL) while this one's batches are gathered.
    ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastml-data-parquet-read")
    futures: dict[int, Future[Any]] = {}
    current: list[Any] = [None, None, None]  # [window, (sources, perm, streams), its buffers]

    def window_rows(si: int) -> tuple[Any, np.ndarray, bool]:
        wi = segments[si][0]
        if current[0] != wi:
            fut = futures.pop(wi, None)
            # Drop the previous window before holding a third; the caller holds
            # no reference to its sources any more and the batcher copied its
            # rows, so its buffers can take the next window read ahead.
            current[1] = None
            give_buffers(current[2])
            current[2] = None
            sources, perm, streams, bufs = fut.result() if fut is not None else load_window(wi)
            current[:] = [wi, (sources, perm, streams), bufs]
        nxt = next((seg[0] for seg in segments[si + 1 :] if seg[0] != wi), None)
        if nxt is not None and nxt not in futures and not stop.is_set():
            futures[nxt] = ahead.submit(load_window, nxt)
        return current[1]

    try:
        yield from _parquet_stream(loader, stop, window_rows, segments, plan, num_batches)
    finally:
        for f in futures.values():
            f.cancel()
        ahead.shutdown(wait=True)


def parquet_rank_segments(
    starts: np.ndarray, n: int, rank_start: int, first: int, last: int
) -> list[tuple[int, int, int]]:
    """Where a rank's entries [first, last) lie: (window, lo, hi) row ranges of the
    permuted windows, in order.

    The epoch's positions 0..n-1 are the windows' permuted rows one window after
    another (``starts`` holds the windows' first positions); rank r owns the
    contiguous positions ``rank_start + k`` for its entries k, and positions >= n
    (padding, drop_last=False) wrap around to ``p - n``. So each rank decodes only
    the windows its range touches.
    """
    out: list[tuple[int, int, int]] = []
    p, end = rank_start + first, rank_start + last
    while p < end:
        q = p % n
        wi = int(np.searchsorted(starts, q, side="right") - 1)
        lo, hi = int(starts[wi]), int(starts[wi + 1])
        take = min(end - p, hi - q)
        out.append((wi, q - lo, q - lo + take))
        p += take
    return out


def _parquet_stream(
    loader: Loader,
    stop: threading.Event,
    window_rows: Any,
    segments: list[tuple[int, int, int]],
    plan: Any,
    num_batches: int,
) -> Iterator[tuple[list[dict[str, np.ndarray]], int]]:
    """The batches of this rank's segments (see _parquet_batches), in chunks."""
    bsz = loader._batch_size
    batcher = _core.DataBatcher(plan, bsz)
    chunk_rows = _chunk_batches(loader._prefetch, bsz) * bsz
    emitted = loader._position
    sources = perm = None
    for si, (_, lo, hi) in enumerate(segments):
        if stop.is_set():
            return
        # Drop our references to the previous window first, so that window_rows
        # frees it before the next read-ahead starts (at most two windows live).
        sources = perm = None
        sources, perm, streams = window_rows(si)
        for pos in range(lo, hi, chunk_rows):
            done = batcher.feed(sources, perm[pos : min(hi, pos + chunk_rows)], streams)
            if done:
                emitted += len(done)
                yield done, bsz
                if stop.is_set():
                    return
    if batcher.pending and emitted < num_batches:
        rows = batcher.pending
        yield [batcher.flush()], rows


def _chunk_batches(prefetch: int, batch_size: int) -> int:
    """Batches the Parquet reader gathers in one native call and hands over as
    one chunk (at most): 4 x prefetch, or enough for 65,536 rows (a window of
    the default size, so each source column is read in one pass), at most 256."""
    return min(256, max(4 * prefetch, -(-65536 // batch_size)))


class _SpanViews:
    """Tensors of a batch from one buffer that holds all of its columns.

    ``offsets`` (bytes from the span's start, per column, as ``span()``
    reports them) and the batch's NumPy arrays give a recipe, built once per
    layout: columns of one dtype are adjacent in a one-buffer batch (see
    PoolAllocator::batch_layout), so each dtype group is one slice, one dtype
    view and one ``split`` (the padding between columns split off and
    dropped), and only columns of more than one dimension need a reshape.
    A batch of 33 columns then costs a handful of torch calls instead of 33
    allocations and 33 copies.
    """

    def __init__(self, torch: Any, batch: dict[str, np.ndarray], offsets: Sequence[int]) -> None:
        cols = sorted(
            (off, i, k, v)
            for i, ((k, v), off) in enumerate(zip(batch.items(), offsets, strict=True))
        )
        self.keys = list(batch)
        self.groups: list[tuple[int, int, Any, list[int], list[tuple[int, int, tuple]]]] = []
        i = 0
        while i < len(cols):
            dt = cols[i][3].dtype
            j = i
            while j + 1 < len(cols) and cols[j + 1][3].dtype == dt:
                j += 1
            size = dt.itemsize
            start = end = cols[i][0]
            sizes: list[int] = []
            picks: list[tuple[int, int, tuple]] = []  # (piece, column index, shape)
            for off, idx, _k, v in cols[i : j + 1]:
                if off < end or (off - end) % size or off % size:
                    raise ValueError("batch columns overlap or are misaligned in their buffer")
                if off > end:
                    sizes.append((off - end) // size)
                picks.append((len(sizes), idx, v.shape if v.ndim != 1 else ()))
                sizes.append(v.size)
                end = off + v.nbytes
            self.groups.append((start, end, getattr(torch, dt.name), sizes, picks))
            i = j + 1

    def __call__(self, buf: Any) -> dict[str, Any]:
        out: list[Any] = [None] * len(self.keys)
        for start, end, dtype, sizes, picks in self.groups:
            flat = buf[start:end].view(dtype)
            pieces = flat.split(sizes) if len(sizes) > 1 else (flat,)
            for piece, idx, shape in picks:
                t = pieces[piece]
                out[idx] = t.view(shape) if shape else t
        return dict(zip(self.keys, out, strict=True))


class _CudaStager:
    """device="cuda": batches are gathered into page-locked pool buffers, one per
    batch holding every column, and copied with one asynchronous host-to-device
    copy per batch on a dedicated stream, ordered with torch's current stream by
    events (see DataCudaStager in register_data.cpp); the batch's tensors are
    views of one device buffer."""

    def __init__(self, device: str, plan: Any, max_inflight: int = 2) -> None:
        import torch

        self._torch = torch
        dev = torch.device(device)
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        self._device = torch.device("cuda", index)
        self._dtypes: dict[str, Any] = {}
        self._views: dict[tuple, _SpanViews] = {}
        self._native = _core.DataCudaStager(plan, index, max_inflight)

    def _dtype(self, np_dtype: np.dtype) -> Any:
        name = np_dtype.name
        if name not in self._dtypes:
            self._dtypes[name] = getattr(self._torch, name)
        return self._dtypes[name]

    def to_device(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        torch = self._torch
        arrays = list(batch.values())
        stream = current_stream_handle(self._device)
        span = self._native.span(arrays)
        if span is None:  # not one pinned batch buffer: a copy per column
            outs = {
                k: torch.empty(v.shape, dtype=self._dtype(v.dtype), device=self._device)
                for k, v in batch.items()
            }
            self._native.copy(arrays, [t.data_ptr() for t in outs.values()], stream)
            return outs
        start, nbytes, payload, offsets = span
        key = (tuple(offsets), arrays[0].shape[0])
        views = self._views.get(key)
        if views is None:
            if len(self._views) > 64:
                self._views.clear()
            views = self._views[key] = _SpanViews(torch, batch, offsets)
        buf = torch.empty(nbytes, dtype=torch.uint8, device=self._device)
        self._native.copy_span(arrays, start, nbytes, payload, buf.data_ptr(), stream)
        return views(buf)

    def stats(self) -> dict[str, Any]:
        return dict(self._native.stats())

    def close(self) -> None:
        self._native.close()
