"""Turn the accepted table forms into named columns (private)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from fastml.drift import _gpu


@dataclass
class _Column:
    name: str
    data: Any  # numpy array, or a pyarrow Array/ChunkedArray
    categorical: bool  # holds strings/objects/dictionary/bool values

    def __len__(self) -> int:
        return len(self.data)

    def slice(self, start: int, stop: int) -> _Column:
        if _is_arrow(self.data):
            return _Column(self.name, self.data.slice(start, stop - start), self.categorical)
        return _Column(self.name, self.data[start:stop], self.categorical)


def _is_arrow(obj: Any) -> bool:
    return type(obj).__module__.startswith("pyarrow")


def _arrow_is_categorical(arr: Any) -> bool:
    import pyarrow as pa

    t = arr.type
    return bool(
        pa.types.is_dictionary(t)
        or pa.types.is_string(t)
        or pa.types.is_large_string(t)
        or pa.types.is_boolean(t)
        or pa.types.is_binary(t)
    )


def _numpy_column(name: str, values: Any) -> _Column:
    arr = np.asarray(values)
    if arr.ndim != 1:
        raise ValueError(f"column '{name}' must be 1-D, got {arr.ndim}-D with shape {arr.shape}")
    _refuse_complex(name, arr.dtype)
    return _Column(name, arr, arr.dtype.kind not in "iuf")


def _refuse_complex(name: str, dtype: Any) -> None:
    if getattr(dtype, "kind", None) == "c":
        raise TypeError(
            f"column '{name}' is complex ({dtype}); profile its real and imaginary parts "
            "as two columns"
        )


def columns_of(data: Any, what: str = "data") -> tuple[list[_Column], int]:
    """Named columns and the row count of a 2-D array, dict, Arrow, pandas or polars table."""
    mod = type(data).__module__
    cols: list[_Column] = []
    if isinstance(data, np.ndarray) or (hasattr(data, "__array__") and mod.startswith("torch")):
        arr = np.asarray(data)
        if arr.ndim != 2:
            raise ValueError(
                f"{what} must be a 2-D (rows x features) array, got {arr.ndim}-D with shape {arr.shape}"
            )
        cols = [_numpy_column(f"f{j}", arr[:, j]) for j in range(arr.shape[1])]
        return cols, arr.shape[0]
    if mod.startswith("pyarrow"):
        import pyarrow as pa

        if not isinstance(data, (pa.Table, pa.RecordBatch)):
            raise TypeError(
                f"{what} must be a pyarrow Table or RecordBatch, got {type(data).__name__}"
            )
        for name, col in zip(data.column_names, data.columns, strict=False):
            cols.append(_Column(str(name), col, _arrow_is_categorical(col)))
        return cols, data.num_rows
    if mod.startswith("pandas"):
        import pandas as pd

        if not isinstance(data, pd.DataFrame):
            raise TypeError(f"{what} must be a pandas DataFrame, got {type(data).__name__}")
        dup = sorted({str(c) for c in data.columns[data.columns.duplicated()]})
        if dup:
            raise ValueError(f"{what} has duplicate column names: {dup}")
        for name in data.columns:
            s = data[name]
            _refuse_complex(str(name), s.dtype)
            if s.dtype.kind in "iuf":
                cols.append(_Column(str(name), s.to_numpy(), False))
            elif isinstance(s.dtype, pd.CategoricalDtype) or s.dtype.kind in "OSUb":
                cols.append(_Column(str(name), s.astype(object).to_numpy(), True))
            elif pd.api.types.is_numeric_dtype(s.dtype):  # nullable Int64/Float64
                cols.append(_Column(str(name), s.to_numpy(dtype="float64", na_value=np.nan), False))
            else:
                cols.append(_Column(str(name), s.astype(object).to_numpy(), True))
        return cols, len(data)
    if mod.startswith("polars"):
        import polars as pl

        if not isinstance(data, pl.DataFrame):
            raise TypeError(f"{what} must be a polars DataFrame, got {type(data).__name__}")
        for s in data.get_columns():
            if s.dtype.is_numeric():
                arr = s.to_numpy()
                if arr.dtype.kind == "O":
                    arr = s.cast(pl.Float64).to_numpy()
                cols.append(_Column(s.name, arr, False))
            else:
                cols.append(_Column(s.name, s.cast(pl.String).to_numpy(), True))
        return cols, data.height
    if isinstance(data, Mapping):
        if not data:
            raise ValueError(f"{what} must have at least one column, got an empty dict")
        n = None
        for name, values in data.items():
            if not isinstance(name, str):
                raise TypeError(f"{what} column names must be str, got {type(name).__name__}")
            if _is_arrow(values):
                col = _Column(name, values, _arrow_is_categorical(values))
            elif _gpu.is_cuda_tensor(values):
                col = _Column(name, values, False)  # ingested by the CUDA kernel
            else:
                col = _numpy_column(name, values)
            if n is None:
                n = len(col)
            elif len(col) != n:
                raise ValueError(
                    f"{what} columns differ in length: '{name}' has {len(col)} rows, expected {n}"
                )
            cols.append(col)
        return cols, int(n or 0)
    raise TypeError(
        f"{what} must be a 2-D numpy array, a dict of columns, a pyarrow Table/RecordBatch "
        f"or a pandas/polars DataFrame, got {type(data).__name__}"
    )


def category_counts(col: _Column) -> tuple[list[str], np.ndarray, float]:
    """Distinct values (as str), their counts and the number of missing values."""
    data = col.data
    if _is_arrow(data):
        import pyarrow as pa
        import pyarrow.compute as pc

        if isinstance(data, pa.ChunkedArray):
            data = data.combine_chunks() if data.num_chunks != 1 else data.chunk(0)
        if pa.types.is_dictionary(data.type):
            data = data.dictionary_decode()
        missing = float(data.null_count)
        vc = pc.value_counts(data.drop_null())
        keys = [str(v) for v in vc.field("values").to_pylist()]
        return keys, np.asarray(vc.field("counts"), dtype=np.float64), missing
    arr = np.asarray(data)
    if arr.dtype.kind in "US":
        keys, counts = np.unique(arr, return_counts=True)
        return [str(k) for k in keys], counts.astype(np.float64), 0.0
    if arr.dtype.kind in "iub":
        keys, counts = np.unique(arr, return_counts=True)
        return [str(k) for k in keys.tolist()], counts.astype(np.float64), 0.0
    if arr.dtype.kind == "f":
        nan = np.isnan(arr)
        keys, counts = np.unique(arr[~nan], return_counts=True)
        return [str(k) for k in keys.tolist()], counts.astype(np.float64), float(nan.sum())
    values = arr.tolist()
    present = [v for v in values if not (v is None or (isinstance(v, float) and v != v))]
    missing = float(len(values) - len(present))
    if not present:
        return [], np.zeros(0), missing
    keys, counts = np.unique(np.array([str(v) for v in present], dtype=object), return_counts=True)
    return [str(k) for k in keys], counts.astype(np.float64), missing


def numeric_data(col: _Column) -> Any:
    """The column as something the native boundary takes (numpy or Arrow)."""
    data = col.data
    if _is_arrow(data):
        return data
    arr = np.asarray(data)
    if arr.dtype.kind not in "iuf":
        raise TypeError(f"column '{col.name}' must be numeric, got dtype {arr.dtype}")
    return arr
