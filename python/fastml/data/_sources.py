"""Reading sources into columns: NumPy, .npy files, Arrow, Parquet metadata."""

from __future__ import annotations

import ast
import glob
import mmap
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastml import _core

# NumPy dtypes the loader gathers (fixed-width numeric and bool).
_SUPPORTED_KINDS = {"b", "i", "u", "f"}
_SUPPORTED_SIZES = {"b": {1}, "i": {1, 2, 4, 8}, "u": {1, 2, 4, 8}, "f": {2, 4, 8}}


@dataclass(frozen=True)
class ColumnInfo:
    """One column of a :class:`Dataset`: its element dtype and per-row shape."""

    dtype: np.dtype
    shape: tuple[int, ...]


def check_dtype(name: str, dtype: np.dtype) -> np.dtype:
    """The native-order dtype of column ``name``; TypeError when unsupported."""
    dtype = np.dtype(dtype)
    if dtype.kind not in _SUPPORTED_KINDS or dtype.itemsize not in _SUPPORTED_SIZES[dtype.kind]:
        raise TypeError(
            f"column '{name}' has unsupported dtype {dtype}; expected bool, int8..int64, "
            "uint8..uint64 or float16/32/64"
        )
    return dtype.newbyteorder("=")


def check_array(name: str, arr: Any) -> np.ndarray:
    """Column ``name`` as a C-contiguous, native-order NumPy array (no copy when it is one)."""
    if not isinstance(name, str):
        raise TypeError(f"column names must be str, got {type(name).__name__}")
    if hasattr(arr, "__module__") and type(arr).__module__.startswith("torch"):
        arr = arr.detach().cpu().numpy()
    a = np.asarray(arr)
    if a.dtype.kind not in _SUPPORTED_KINDS:
        raise TypeError(
            f"column '{name}' has unsupported dtype {a.dtype}; expected bool, int8..int64, "
            "uint8..uint64 or float16/32/64 (variable-length values are not supported)"
        )
    dt = check_dtype(name, a.dtype)
    if a.ndim == 0:
        raise ValueError(f"column '{name}' must have at least 1 dimension (rows), got a scalar")
    if a.dtype != dt:
        a = a.astype(dt)
    return np.ascontiguousarray(a)


def check_columns(arrays: Mapping[str, np.ndarray]) -> int:
    """The common row count of ``arrays``; ValueError naming the column that differs."""
    if not arrays:
        raise ValueError("a dataset needs at least one column, got none")
    first, n = None, -1
    for name, a in arrays.items():
        rows = column_rows(a)
        if first is None:
            first, n = name, rows
        elif rows != n:
            raise ValueError(
                f"column '{name}' has {rows} rows but column '{first}' has {n}; "
                "all columns must share the first dimension"
            )
    if n == 0:
        raise ValueError("the dataset is empty (0 rows)")
    return n


# ------------------------------------------------------------------ .npy


def read_npy(path: str | os.PathLike[str], name: str) -> np.ndarray:
    """Memory-maps a .npy file read-only after validating its header strictly.

    A missing or unreadable file raises OSError; any problem with its content
    (bad magic, corrupt or unsupported header, truncation) raises
    fastml.FormatError naming the file and the column.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"column '{name}': no such .npy file: {path!r}")

    def bad(why: str) -> _core.FormatError:
        return _core.FormatError(f"{path!r} (column '{name}') {why}")

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(10)
        if len(head) < 10 or head[:6] != b"\x93NUMPY":
            raise bad("is not a .npy file (no '\\x93NUMPY' magic at byte 0)")
        major = head[6]
        if major == 1:
            hlen = int.from_bytes(head[8:10], "little")
            start = 10
        elif major in (2, 3):
            rest = f.read(2)
            if len(rest) < 2:
                raise bad("is truncated inside its header")
            hlen = int.from_bytes(head[8:10] + rest, "little")
            start = 12
        else:
            raise bad(f"has unsupported .npy version {major} (byte 6)")
        if hlen > size - start:
            raise bad(f"is truncated inside its header ({hlen} header bytes promised at byte 8)")
        raw = f.read(hlen)
    if len(raw) < hlen:
        raise bad("is truncated inside its header")
    try:
        header = ast.literal_eval(raw.decode("latin1" if major < 3 else "utf8"))
    except (ValueError, SyntaxError, UnicodeDecodeError, MemoryError, RecursionError) as e:
        raise bad(f"has a corrupt .npy header: {e}") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise bad(
            "has a corrupt .npy header: expected the keys descr, fortran_order and shape, "
            f"got {header!r}"
        )
    shape = header["shape"]
    if not isinstance(shape, tuple) or not all(type(s) is int and 0 <= s < 2**62 for s in shape):
        raise bad(f"has a bad shape {shape!r} in its header")
    if header["fortran_order"] is not False:
        raise bad(
            "is Fortran-ordered (or its fortran_order is not False); rows must be C-contiguous"
        )
    if not isinstance(header["descr"], str):
        raise bad(
            f"has a structured dtype {header['descr']!r}; "
            "only fixed-width numeric dtypes are supported"
        )
    try:
        dtype = np.dtype(header["descr"])  # the file's byte order (swapped below)
        check_dtype(f"{name}' in '{path}", dtype)
    except Exception as e:  # np.dtype's parser raises TypeError, ValueError, SyntaxError, ...
        raise bad(f"has a bad or unsupported dtype in its header: {e}") from None
    if len(shape) == 0:
        raise bad("holds a scalar; rows need 1 dimension")
    offset = start + hlen
    nbytes = dtype.itemsize
    for s_ in shape:
        nbytes *= s_  # Python ints: no overflow for absurd shapes
    if size < offset + nbytes:
        raise bad(
            f"is truncated: its header promises {nbytes} data bytes, the file has {size - offset}"
        )
    if nbytes == 0:
        return np.empty(shape, dtype)
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), offset + nbytes, access=mmap.ACCESS_READ)
    arr = np.frombuffer(mm, dtype=dtype, count=nbytes // dtype.itemsize, offset=offset)
    arr = arr.reshape(shape)
    if dtype.byteorder == ">":
        arr = arr.astype(dtype.newbyteorder("="))
    return arr


# ------------------------------------------------------------------ Arrow


def content_error(path: str, what: str, e: BaseException) -> Exception:
    """pyarrow's failure on a file: an OSError with an errno is I/O and stays an
    OSError; anything else is the file's content (bad magic, corrupt footer or
    pages, bad lengths) and becomes fastml.FormatError. Both name the file."""
    if isinstance(e, OSError) and e.errno is not None:
        return OSError(e.errno, f"{path!r} {what}: {e.strerror}")
    return _core.FormatError(f"{path!r} {what}: {e}")


def arrow_column(name: str, col: Any) -> np.ndarray | list[np.ndarray]:
    """An Arrow (chunked) array as NumPy: one array, or one per chunk when it has
    several (used in place by the loader, never combined). Chunks of fixed-width
    types without nulls are zero-copy."""
    import pyarrow as pa

    if isinstance(col, pa.ChunkedArray):
        chunks = [c for c in col.chunks if len(c)]
        if len(chunks) > 1:
            return [_arrow_chunk(name, c) for c in chunks]
        col = chunks[0] if chunks else pa.array([], type=col.type)
    return _arrow_chunk(name, col)


def _arrow_chunk(name: str, col: Any) -> np.ndarray:
    import pyarrow as pa

    t = col.type
    if pa.types.is_dictionary(t):
        col = col.indices  # the codes; each chunk may carry its own dictionary
        t = col.type
    row_shape: list[int] = []
    while pa.types.is_fixed_size_list(t):
        if col.null_count:
            raise ValueError(f"column '{name}' has {col.null_count} null rows; fill them first")
        row_shape.append(t.list_size)
        col = col.flatten()
        t = col.type
    if not (pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)):
        raise TypeError(
            f"column '{name}' has Arrow type {col.type if not row_shape else t}; only fixed-width "
            "numeric, boolean, dictionary and fixed-size-list columns are supported "
            "(variable-length columns such as strings and lists are not)"
        )
    if col.null_count and not pa.types.is_floating(t):
        raise _core.FormatError(
            f"column '{name}' has {col.null_count} null values in a non-floating column; "
            "fill them first"
        )
    zero_copy = not col.null_count and not pa.types.is_boolean(t)
    arr = col.to_numpy(zero_copy_only=zero_copy)
    if row_shape:
        arr = arr.reshape(-1, *row_shape)
    return arr


def column_rows(a: np.ndarray | list[np.ndarray]) -> int:
    """Rows of a column given as one array or a list of chunks."""
    return sum(c.shape[0] for c in a) if isinstance(a, list) else a.shape[0]


def first_chunk(a: np.ndarray | list[np.ndarray]) -> np.ndarray:
    """The array that describes a column's dtype and row shape."""
    return a[0] if isinstance(a, list) else a


def arrow_table(obj: Any) -> Any:
    """A pyarrow Table from a Table, RecordBatch, Feather/IPC path, pandas or polars frame."""
    import pyarrow as pa

    if isinstance(obj, pa.Table):
        return obj
    if isinstance(obj, pa.RecordBatch):
        return pa.Table.from_batches([obj])
    if isinstance(obj, (str, os.PathLike)):
        return read_ipc(os.fspath(obj))
    mod = type(obj).__module__
    if mod.startswith("pandas"):
        return pa.Table.from_pandas(obj, preserve_index=False)
    if mod.startswith("polars"):
        return obj.to_arrow()
    raise TypeError(
        "source must be a pyarrow Table or RecordBatch, a Feather/IPC file path, or a pandas "
        f"or polars DataFrame, got {type(obj).__name__}"
    )


def read_ipc(path: str) -> Any:
    """An Arrow IPC (Feather v2) file as a Table over a read-only memory map."""
    import pyarrow as pa

    if not os.path.exists(path):
        raise FileNotFoundError(f"no such Arrow IPC/Feather file: {path!r}")
    try:
        source = pa.memory_map(path, "r")
        try:
            return pa.ipc.open_file(source).read_all()
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_stream(source).read_all()
    except (pa.ArrowException, OSError) as e:
        raise content_error(path, "is not a readable Arrow IPC/Feather file", e) from None


# ------------------------------------------------------------------ Parquet


@dataclass(frozen=True)
class RowGroup:
    """One row group of a Parquet file."""

    file: int
    index: int
    rows: int


def parquet_paths(paths: Any) -> list[str]:
    """One path, a list of paths or a glob, expanded and checked to exist."""
    if isinstance(paths, (str, os.PathLike)):
        p = os.fspath(paths)
        if any(ch in p for ch in "*?["):
            out = sorted(glob.glob(p))
            if not out:
                raise FileNotFoundError(f"no Parquet files match {p!r}")
            return out
        paths = [p]
    try:
        out = [os.fspath(p) for p in paths]
    except TypeError:
        raise TypeError(
            f"paths must be a path, a list of paths or a glob, got {type(paths).__name__}"
        ) from None
    if not out:
        raise ValueError("paths must name at least one Parquet file, got none")
    for p in out:
        if not os.path.exists(p):
            raise FileNotFoundError(f"no such Parquet file: {p!r}")
    return out


def open_parquet(path: str) -> Any:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # Page checksums, where the writer stored them, are verified (as the native
        # decoder does), so a page it refused for its CRC is not read here unchecked.
        pf = pq.ParquetFile(path, memory_map=True, page_checksum_verification=True)
        # Names are decoded lazily by pyarrow: a footer whose names are not UTF-8
        # must fail here, as a format error, not later with UnicodeDecodeError.
        pf.schema_arrow.names  # noqa: B018
        [pf.schema.column(i).path for i in range(len(pf.schema))]
    except (pa.ArrowException, OSError) as e:
        raise content_error(path, "is not a readable Parquet file", e) from None
    except UnicodeDecodeError as e:
        raise _core.FormatError(
            f"{path!r}: a column name in the footer is not UTF-8 ({e})"
        ) from None
    pf._fastml_path = path  # parquet_chunk_table reads the footer natively from it
    return pf


# Parquet physical types and codecs fastml's native decoder reads (csrc/data/parquet.hpp).
_PARQUET_PHYSICAL = {"BOOLEAN": 0, "INT32": 1, "INT64": 2, "FLOAT": 4, "DOUBLE": 5}
_PARQUET_CODECS = {"UNCOMPRESSED": 0, "SNAPPY": 1}
_ARROW_TO_PHYSICAL = {
    "bool": "BOOLEAN",
    "int8": "INT32",  # Parquet stores 8- and 16-bit integers as INT32
    "uint8": "INT32",
    "int16": "INT32",
    "uint16": "INT32",
    "int32": "INT32",
    "uint32": "INT32",
    "int64": "INT64",
    "uint64": "INT64",
    "float": "FLOAT",
    "double": "DOUBLE",
}


def parquet_footer(path: str) -> dict[str, Any]:
    """The row groups and column chunks of a Parquet file, read from its footer
    natively (never through pyarrow's per-chunk metadata accessors, some of
    which abort the process on a corrupt enum: a C++ exception Python cannot
    catch). A corrupt footer raises fastml.FormatError naming the file."""
    return dict(_core.parquet_footer(_core.MappedFile(path)))


def parquet_chunk_table(
    pf: Any,
    names: list[str],
    dtypes: list[np.dtype | None] | None = None,
    footer: dict[str, Any] | None = None,
) -> np.ndarray:
    """Where the native decoder finds each column chunk of a Parquet file.

    Returns an int64 array (row groups, len(names), 7) of (offset, size,
    physical type, codec, values, max definition level, max repetition
    level); the physical type is -1 for a chunk the native decoder cannot read
    (a nested, float16, string-dictionary or timestamp-like column, another
    codec, ...), which the loader then reads with pyarrow.
    ``dtypes`` (one per name, None for "never native") are the NumPy dtypes the
    dataset expects: a column whose file type decodes to another is not native
    (so a file rewritten with another type is caught by the pyarrow path).
    Chunk locations come from ``footer`` (:func:`parquet_footer`; read here
    when not given); only the schema comes from pyarrow (checked when the file
    was opened).
    """
    if footer is None:
        path = getattr(pf, "_fastml_path", None)
        if path is None:
            raise TypeError("footer is required for a ParquetFile not opened by open_parquet")
        footer = parquet_footer(path)
    md = pf.metadata
    arrow_schema = pf.schema_arrow
    pschema = md.schema
    leaves: dict[str, list[int]] = {}
    for i in range(md.num_columns):
        leaves.setdefault(pschema.column(i).path, []).append(i)
    groups = len(footer["row_group_rows"])
    chunks = np.asarray(footer["chunks"])
    out = np.full((groups, len(names), 7), -1, dtype=np.int64)
    ncols = md.num_columns
    if chunks.shape[0] != groups * ncols:
        return out  # not one chunk per (row group, column): leave every chunk to pyarrow
    by_chunk = chunks.reshape(groups, ncols, -1)
    for j, name in enumerate(names):
        found = leaves.get(name, [])
        if len(found) != 1 or arrow_schema.get_field_index(name) < 0:
            continue
        i = found[0]
        col = pschema.column(i)
        arrow_type = arrow_schema.field(name).type
        physical = _ARROW_TO_PHYSICAL.get(str(arrow_type))
        if physical is None or col.physical_type != physical or col.max_repetition_level != 0:
            continue
        if dtypes is not None and (
            dtypes[j] is None or np.dtype(arrow_type.to_pandas_dtype()) != dtypes[j]
        ):
            continue
        for g in range(groups):
            (_, _, ptype, codec, num_values, size, data_off, dict_off, external, _) = by_chunk[g, i]
            start = data_off
            if 4 <= dict_off < start:
                start = dict_off
            # Anything unusual leaves the chunk to pyarrow (which then reads it or
            # says why): the native decoder takes only what it can check.
            if (
                external
                or ptype != _PARQUET_PHYSICAL[physical]
                or codec not in _PARQUET_CODECS.values()
                or num_values != footer["row_group_rows"][g]
                or footer["paths"][g * ncols + i] != name.encode()
                or not (4 <= start and 0 < size <= footer["file_size"] - 12 - start)
            ):
                continue
            out[g, j] = (
                start,
                size,
                _PARQUET_PHYSICAL[physical],
                codec,
                num_values,
                col.max_definition_level,
                col.max_repetition_level,
            )
    return out
