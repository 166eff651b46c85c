"""Elastic resume: the rest of an epoch, saved at one world size, split over another.

An epoch is a sequence of *positions* ``0 .. n-1`` (the shuffled order of the
rows: the permutation of an in-memory or mapped data set, the permuted windows
of a Parquet data set). A normal epoch at world size N gives rank r the
positions ``r, r + N, r + 2N, ...`` (random-access sources) or the contiguous
range ``r * L .. (r + 1) * L - 1`` (Parquet, ``L`` rows per rank), padded by
repeating positions (``drop_last=False``) or truncated (``drop_last=True``).

When the ranks' states are loaded at another world size M, the positions that
no old rank consumed (padding excluded: a padded position repeats a real one)
are the *remainder*, kept in epoch order. It is cut into M contiguous chunks
with the same number of batches K each:

* ``drop_last=False``: ``K = ceil(R / (M * B))`` for R remaining positions and
  batch size B. Every rank gets ``K - 1`` full batches and a last batch; the
  ``e = R - (K - 1) * M * B`` positions of the last round are shared out as
  evenly as possible (each rank's last batch holds ``e // M`` or ``e // M + 1``).
  Every position is read exactly once, except when ``e < M`` (fewer positions
  left for the last round than ranks): then the ranks without one repeat one
  position of the remainder, as a normal epoch pads, so that batch counts stay
  equal (a collective on a rank with a batch fewer would hang).
* ``drop_last=True``: ``K = R // (M * B)`` full batches each; the last
  ``R - K * M * B`` positions are dropped, as drop_last drops a partial batch.

Each change of world size within an epoch is a *stage* (its world size and the
batches each of its ranks consumed), so a resumed epoch can be saved and
resumed again, at any world size. The next epoch is a normal one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fastml import _core

# How an epoch's positions are dealt to the ranks of a normal epoch.
STRIDED = "strided"  # random-access sources: rank r takes r, r + N, ...
CONTIGUOUS = "contiguous"  # Parquet: rank r takes a contiguous range


def rows_per_rank(n: int, world: int, drop_last: bool) -> int:
    return n // world if drop_last else -(-n // world)


def batches_per_rank(n: int, world: int, batch_size: int, drop_last: bool) -> int:
    rows = rows_per_rank(n, world, drop_last)
    return rows // batch_size if drop_last else -(-rows // batch_size)


def normal_remainder(
    layout: str, n: int, world: int, consumed: Sequence[int], batch_size: int, drop_last: bool
) -> np.ndarray:
    """Positions of a normal epoch at world size ``world`` that no rank consumed
    (``consumed[r]`` batches on rank r), padding excluded, ascending."""
    per_rank = rows_per_rank(n, world, drop_last)
    delivered = min(batches_per_rank(n, world, batch_size, drop_last) * batch_size, per_rank)
    parts = []
    for r, c in enumerate(consumed):
        j = np.arange(min(c * batch_size, delivered), delivered, dtype=np.int64)
        pos = r + world * j if layout == STRIDED else r * per_rank + j
        parts.append(pos[pos < n])
    if not parts:
        return np.empty(0, dtype=np.int64)
    return np.sort(np.concatenate(parts))


def split(
    remaining: np.ndarray, world: int, rank: int, batch_size: int, drop_last: bool
) -> tuple[np.ndarray, int]:
    """This rank's positions of ``remaining`` (see the module docstring) and how
    many of them are its own (the rest, at most one, repeats a position)."""
    total = len(remaining)
    b = batch_size
    if drop_last:
        k = total // (world * b)
        chunk = remaining[rank * k * b : (rank + 1) * k * b]
        return chunk, len(chunk)
    if total == 0:
        return remaining[:0], 0
    k = -(-total // (world * b))
    base = (k - 1) * b
    last = total - base * world  # positions of the last round, 1 .. world * b
    share = [last // world + (1 if r < last % world else 0) for r in range(world)]
    start = base * rank + sum(share[:rank])
    chunk = remaining[start : start + base + share[rank]]
    if share[rank] > 0:
        return chunk, len(chunk)
    # Fewer positions than ranks in the last round: repeat one, so this rank too
    # has k batches.
    pad = remaining[rank % total : rank % total + 1]
    return np.concatenate([chunk, pad]), len(chunk)


def stage_remainder(
    remaining: np.ndarray, world: int, consumed: Sequence[int], batch_size: int, drop_last: bool
) -> np.ndarray:
    """What is left of ``remaining`` after a stage at world size ``world`` whose
    ranks consumed ``consumed[r]`` batches of their split."""
    parts = []
    for r, c in enumerate(consumed):
        chunk, own = split(remaining, world, r, batch_size, drop_last)
        parts.append(chunk[min(c * batch_size, own) : own])
    if not parts:
        return remaining[:0]
    return np.sort(np.concatenate(parts))


def epoch_share(
    layout: str,
    n: int,
    stages: Sequence[tuple[int, Sequence[int]]],
    world: int,
    rank: int,
    batch_size: int,
    drop_last: bool,
) -> tuple[np.ndarray, int]:
    """This rank's positions (in reading order) of an epoch resumed through
    ``stages`` (``[(world_size, batches consumed per rank), ...]``, oldest
    first, the first one a normal epoch), and how many are its own (a last
    position beyond them repeats one, see split)."""
    w0, c0 = stages[0]
    remaining = normal_remainder(layout, n, w0, c0, batch_size, drop_last)
    for w, c in stages[1:]:
        remaining = stage_remainder(remaining, w, c, batch_size, drop_last)
    return split(remaining, world, rank, batch_size, drop_last)


def epoch_order(n: int, shuffle: bool, seed: int, epoch: int) -> np.ndarray:
    """An epoch's order of the rows of a random-access data set (its positions
    0..n-1 map to these rows): the engine's permutation, or the identity."""
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return np.asarray(_core.data_permutation(n, seed, epoch, 0), dtype=np.int64)


def position_ranges(positions: np.ndarray) -> list[tuple[int, int]]:
    """``positions`` as runs of consecutive values: [(start, stop), ...] in order."""
    if len(positions) == 0:
        return []
    breaks = np.flatnonzero(np.diff(positions) != 1) + 1
    starts = np.concatenate([[0], breaks])
    stops = np.concatenate([breaks, [len(positions)]])
    return [
        (int(positions[a]), int(positions[z - 1]) + 1) for a, z in zip(starts, stops, strict=True)
    ]
