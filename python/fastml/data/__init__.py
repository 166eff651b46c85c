"""fastml.data: columnar data into shuffled, batched, prefetched batches.

A :class:`Dataset` names columns that share their first dimension (rows); a
:class:`Loader` turns it into batches, gathered by native threads on fastml's
shared pool with the GIL released::

    from fastml import data
    ds = data.Dataset.from_numpy({"x": X, "y": y})
    loader = data.Loader(ds, batch_size=1024, shuffle=True, seed=0)
    for batch in loader:
        batch["x"], batch["y"]

See docs/data.md for the semantics (shuffling, determinism, resume, sharding).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from fastml.data._loader import Loader
from fastml.data._sources import (
    ColumnInfo,
    RowGroup,
    arrow_column,
    arrow_table,
    check_array,
    check_columns,
    check_dtype,
    first_chunk,
    open_parquet,
    parquet_footer,
    parquet_paths,
    read_npy,
)
from fastml.data._transforms import Cast, Clip, FillNa, Standardize, Transform

__all__ = [
    "Cast",
    "Clip",
    "ColumnInfo",
    "Dataset",
    "FillNa",
    "Loader",
    "Standardize",
    "Transform",
]


class Dataset:
    """Named columns that share their first dimension (one row per sample).

    Build one with :meth:`from_numpy`, :meth:`from_npy`, :meth:`from_arrow` or
    :meth:`from_parquet`. In-memory, memory-mapped and Arrow datasets are
    randomly accessible (full shuffles); Parquet datasets are streamed by row
    group (block shuffles).
    """

    def __init__(self) -> None:
        raise TypeError("use Dataset.from_numpy/from_npy/from_arrow/from_parquet")

    @classmethod
    def _new(cls) -> Dataset:
        self = object.__new__(cls)
        self._arrays: dict[str, np.ndarray] | None = None
        self._owners: list[Any] = []
        self._files: list[str] = []
        self._row_groups: list[RowGroup] = []
        self._parquet_chunks: dict[int, np.ndarray] = {}  # native decoder layout per file
        self._schema: dict[str, ColumnInfo] = {}
        # Parquet: the file columns decoded (in order) and their types, and the
        # feature columns assembled from several of them (from_parquet).
        self._sources: dict[str, ColumnInfo] = {}
        self._features: dict[str, list[str]] = {}
        self._num_rows = 0
        self._tensors: dict[str, Any] | None = None  # device-resident columns (see to)
        self._device: Any = None
        return self

    # ------------------------------------------------------------ constructors

    @classmethod
    def from_numpy(cls, arrays: Mapping[str, Any]) -> Dataset:
        """A dataset over a dict of arrays (NumPy, CPU torch, anything NumPy views).

        C-contiguous native-order arrays are used in place; others are copied once.
        """
        if not isinstance(arrays, Mapping):
            raise TypeError(f"arrays must be a dict of arrays, got {type(arrays).__name__}")
        return cls._from_arrays({name: check_array(name, a) for name, a in arrays.items()})

    @classmethod
    def from_npy(cls, paths: Mapping[str, str | os.PathLike[str]]) -> Dataset:
        """A dataset over .npy files, memory-mapped read-only (not read into RAM).

        Headers are validated strictly: a missing file raises FileNotFoundError,
        a truncated or corrupt one OSError/ValueError naming the file.
        """
        if not isinstance(paths, Mapping):
            raise TypeError(f"paths must be a dict of .npy paths, got {type(paths).__name__}")
        return cls._from_arrays({name: read_npy(p, name) for name, p in paths.items()})

    @classmethod
    def from_arrow(cls, source: Any, columns: Sequence[str] | None = None) -> Dataset:
        """A dataset over a pyarrow Table/RecordBatch, a Feather (Arrow IPC) file
        (memory-mapped), or a pandas/polars DataFrame (through Arrow).

        Single-chunk fixed-width columns without nulls are used zero-copy;
        dictionary columns load as their integer codes; fixed-size lists become
        per-row tensors; nulls in floating columns become NaN (one copy).
        """
        table = arrow_table(source)
        names = list(table.column_names) if columns is None else list(columns)
        missing = [c for c in names if c not in table.column_names]
        if missing:
            raise KeyError(f"columns {missing} are not in the table (has {table.column_names})")
        ds = cls._from_arrays({n: arrow_column(n, table.column(n)) for n in names})
        ds._owners.append(table)
        return ds

    @classmethod
    def from_parquet(
        cls,
        paths: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
        columns: Sequence[str] | None = None,
        features: Mapping[str, Sequence[str]] | None = None,
    ) -> Dataset:
        """A dataset over Parquet files (one path, a list or a glob), streamed by row group.

        Only the schema and footers are read here. A Loader decodes row groups
        while it iterates, on a read-ahead thread: fastml's own decoder writes
        the column chunks it supports (flat bool, integer and float columns;
        PLAIN, dictionary, BYTE_STREAM_SPLIT and RLE encodings; uncompressed or
        Snappy pages: see docs/data.md, "Parquet decoding") straight into reused
        window buffers, and pyarrow reads any other chunk (other codecs such as
        ZSTD, DELTA encodings, nested columns).

        ``columns``: the columns to load (default: every column not used by
        ``features``). ``features``: 2-D columns assembled from several scalar
        columns of one dtype, e.g. ``{"x": ["f0", ..., "f19"]}`` gives a column
        ``"x"`` of rows of 20 values, element ``j`` from ``f{j}`` (a batch's
        ``"x"`` is a ``(rows, 20)`` array; the gather writes it directly, with
        no per-batch stacking). A column used by a feature is not also a column
        of its own.
        """
        files = parquet_paths(paths)
        ds = cls._new()
        ds._files = files
        schema0 = None
        for fi, path in enumerate(files):
            pf = open_parquet(path)
            arrow_schema = pf.schema_arrow
            if schema0 is None:
                schema0 = arrow_schema
                feats = _check_features(features, arrow_schema.names, path)
                used = {c for srcs in feats.values() for c in srcs}
                if columns is None:
                    names = [n for n in arrow_schema.names if n not in used]
                else:
                    names = list(columns)
                    both = sorted(used.intersection(names))
                    if both:
                        raise ValueError(
                            f"columns {both} are listed in columns and used by features; "
                            "a column used by a feature is not loaded on its own"
                        )
                for n in names:
                    if n not in arrow_schema.names:
                        raise KeyError(
                            f"column '{n}' is not in {path!r} (has {arrow_schema.names})"
                        )
                for n in [*names, *(c for srcs in feats.values() for c in srcs)]:
                    ds._sources[n] = _arrow_type_info(n, arrow_schema.field(n).type)
                ds._schema = {n: ds._sources[n] for n in names}
                for f, srcs in feats.items():
                    infos = [ds._sources[c] for c in srcs]
                    bad = [c for c, i in zip(srcs, infos, strict=True) if i.shape != ()]
                    if bad:
                        raise ValueError(f"features['{f}'] needs scalar columns; {bad} are not")
                    dts = {i.dtype for i in infos}
                    if len(dts) != 1:
                        kinds = {c: str(i.dtype) for c, i in zip(srcs, infos, strict=True)}
                        raise ValueError(f"features['{f}'] needs columns of one dtype, got {kinds}")
                    ds._schema[f] = ColumnInfo(infos[0].dtype, (len(srcs),))
                ds._features = feats
            else:
                for n, info in ds._sources.items():
                    if (
                        n not in arrow_schema.names
                        or _arrow_type_info(n, arrow_schema.field(n).type) != info
                    ):
                        raise ValueError(
                            f"{path!r} does not match the schema of {files[0]!r} for column '{n}'"
                        )
            # Row counts from the footer read natively (see parquet_footer).
            for rg, rows in enumerate(parquet_footer(path)["row_group_rows"]):
                if rows:
                    ds._row_groups.append(RowGroup(fi, rg, int(rows)))
        ds._num_rows = sum(rg.rows for rg in ds._row_groups)
        if not ds._schema:
            raise ValueError("a dataset needs at least one column, got none")
        if ds._num_rows == 0:
            raise ValueError(f"the dataset is empty (0 rows in {files})")
        return ds

    @classmethod
    def _from_arrays(cls, arrays: dict[str, np.ndarray]) -> Dataset:
        ds = cls._new()
        ds._num_rows = check_columns(arrays)
        ds._arrays = arrays
        ds._schema = {
            n: ColumnInfo(first_chunk(a).dtype, tuple(first_chunk(a).shape[1:]))
            for n, a in arrays.items()
        }
        return ds

    # ------------------------------------------------------------ properties

    def __len__(self) -> int:
        return self._num_rows

    @property
    def columns(self) -> list[str]:
        """Column names, in order."""
        return list(self._schema)

    @property
    def schema(self) -> dict[str, ColumnInfo]:
        """Per column: element dtype and per-row shape."""
        return dict(self._schema)

    @property
    def is_streamed(self) -> bool:
        """True for Parquet datasets (block shuffle), False for random-access ones."""
        return self._arrays is None and self._tensors is None

    @property
    def device(self) -> str | None:
        """The torch device holding the columns (see :meth:`to`); None for host data."""
        return None if self._device is None else str(self._device)

    def to(self, device: Any) -> Dataset:
        """This data set with every column placed in ``device``'s memory once
        (a torch device: ``"cuda"``, ``"cuda:1"``; ``"cpu"`` gives torch CPU
        tensors, the same path on the host). A :class:`Loader` over the result
        shuffles, gathers and applies the transforms on that device, with no
        host round trip per batch; the batches equal the host loader's bit for
        bit (same seed, same order; resume, rank sharding and elastic resume
        behave the same). Needs torch. Random-access data sets only (for
        Parquet, load the table with :meth:`from_arrow` first). Columns of
        unsigned types wider than 8 bits are refused (torch lacks their ops).
        """
        import torch

        from fastml.data._device import check_device_dtype, torch_dtype

        if self.is_streamed:
            raise ValueError(
                "Dataset.to needs a random-access data set; for Parquet, read the table "
                "(pyarrow.parquet.read_table) and use Dataset.from_arrow first"
            )
        dev = torch.device(device)
        for name, info in self._schema.items():
            check_device_dtype(name, info.dtype, "column")
        tensors: dict[str, Any] = {}
        if self._tensors is not None:
            for name, t in self._tensors.items():
                tensors[name] = t.to(dev)
        else:
            for name, a in self._iter_columns():
                host = np.concatenate(a) if isinstance(a, list) else np.asarray(a)
                t = torch.from_numpy(np.ascontiguousarray(host))
                tensors[name] = t.to(dev) if dev.type != "cpu" else t.clone()
                assert tensors[name].dtype == torch_dtype(self._schema[name].dtype)
        ds = Dataset._new()
        ds._schema = dict(self._schema)
        ds._num_rows = self._num_rows
        ds._tensors = tensors
        ds._device = dev
        return ds

    def __repr__(self) -> str:
        kind = f"parquet, {len(self._files)} file(s)" if self.is_streamed else "in memory"
        if self._device is not None:
            kind = f"on {self._device}"
        cols = ", ".join(
            f"{n}: {c.dtype}{list(c.shape) if c.shape else ''}" for n, c in self._schema.items()
        )
        return f"Dataset({self._num_rows} rows, {kind}; {cols})"

    def _iter_columns(self) -> Iterator[tuple[str, np.ndarray]]:
        assert self._arrays is not None
        yield from self._arrays.items()


def _check_features(
    features: Mapping[str, Sequence[str]] | None, file_columns: list[str], path: str
) -> dict[str, list[str]]:
    """``features`` as {name: [columns]}, checked: names and columns are strings,
    each feature has at least one column, every column exists and serves one
    feature at most, and no feature is named like a column of the file."""
    if features is None:
        return {}
    if not isinstance(features, Mapping):
        raise TypeError(f"features must be a dict of column lists, got {type(features).__name__}")
    out: dict[str, list[str]] = {}
    seen: dict[str, str] = {}
    for f, srcs in features.items():
        if not isinstance(f, str):
            raise TypeError(f"features names must be strings, got {f!r}")
        if isinstance(srcs, (str, bytes)) or not isinstance(srcs, Sequence):
            raise TypeError(f"features['{f}'] must be a list of column names, got {srcs!r}")
        srcs = list(srcs)
        if not srcs:
            raise ValueError(f"features['{f}'] needs at least one column")
        if f in file_columns:
            raise ValueError(f"features['{f}'] is named like a column of {path!r}")
        for c in srcs:
            if not isinstance(c, str):
                raise TypeError(f"features['{f}'] must hold column names, got {c!r}")
            if c not in file_columns:
                raise KeyError(f"features['{f}']: column '{c}' is not in {path!r}")
            if c in seen:
                where = (
                    f"twice in features['{f}']"
                    if seen[c] == f
                    else (f"by features['{seen[c]}'] and features['{f}']")
                )
                raise ValueError(f"column '{c}' is used {where}")
            seen[c] = f
        out[f] = srcs
    return out


def _arrow_type_info(name: str, t: Any) -> ColumnInfo:
    import pyarrow as pa

    shape: list[int] = []
    if pa.types.is_dictionary(t):
        t = t.index_type
    while pa.types.is_fixed_size_list(t):
        shape.append(t.list_size)
        t = t.value_type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise TypeError(
            f"column '{name}' has Arrow type {t}; only fixed-width numeric, boolean, dictionary "
            "and fixed-size-list columns are supported (variable-length columns such as strings "
            "and lists are not)"
        )
    return ColumnInfo(check_dtype(name, np.dtype(t.to_pandas_dtype())), tuple(shape))
