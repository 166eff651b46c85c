"""fastml.infer.Forest: native tree-ensemble inference exact to XGBoost, LightGBM and scikit-learn.

This module is the API (the Forest class and its inputs). Each source has its
own importer, as Treelite keeps one loader per format: ``_xgboost.py`` (JSON,
UBJSON, Boosters), ``_lightgbm.py`` (the text format), ``_sklearn.py`` (fitted
trees and ensembles); they read the model into flat NumPy arrays through
``_forest_common._SpecBuilder``, and the native builder
(``fastml._core.ForestCore``) validates them and builds the compact engine.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from fastml import _core
from fastml._cuda_stream import current_stream_handle
from fastml.infer._lightgbm import _load_lightgbm
from fastml.infer._sklearn import _load_sklearn
from fastml.infer._xgboost import _load_xgboost

__all__ = ["Forest"]

Output = Literal["value", "margin", "class"]
Device = Literal["cpu", "cuda", "auto"]

# device="auto" with host input: the batch sizes at which the crossover is
# measured (rows of synthetic float32 data, 5% missing), and the repeats.
_AUTO_SIZES = (1024, 65536)
_AUTO_REPEATS = 3
# Upper bound of a crossover (a GPU that never wins is "never": this many rows).
_AUTO_NEVER = 1 << 62


def crossover_rows(cpu: Sequence[tuple[int, float]], gpu: Sequence[tuple[int, float]]) -> int:
    """The batch size from which the GPU engine is faster, from timings
    ``[(rows, seconds), (rows, seconds)]`` of each engine at two batch sizes
    (each engine modelled as ``fixed + per_row * rows``). 1: the GPU is always
    faster; ``2**62``: never (its per-row cost is no lower than the CPU's and
    it does not start lower)."""
    (r1, c1), (r2, c2) = cpu
    (s1, g1), (s2, g2) = gpu
    if r1 == r2 or s1 == s2:
        raise ValueError("crossover_rows needs two distinct batch sizes per engine")
    cb = (c2 - c1) / (r2 - r1)
    gb = (g2 - g1) / (s2 - s1)
    ca, ga = c1 - cb * r1, g1 - gb * s1
    if gb >= cb:  # the GPU's per-row cost is not lower: it wins only if it starts lower
        return 1 if ga < ca else _AUTO_NEVER
    rows = (ga - ca) / (cb - gb)
    if rows <= 1:
        return 1
    return int(min(math.ceil(rows - 1e-9 * rows), _AUTO_NEVER))  # tolerate rounding


# ---------------------------------------------------------------------------- inputs


def _frame_columns(X: Any) -> list[str] | None:
    """Column names of a pandas/polars DataFrame or an Arrow table, else None."""
    mod = type(X).__module__
    if mod.startswith(("pandas", "polars")) and hasattr(X, "columns"):
        return [str(c) for c in X.columns]
    if mod.startswith("pyarrow") and hasattr(X, "column_names"):
        return [str(c) for c in X.column_names]
    return None


def _select_by_name(X: Any, names: list[str]) -> Any:
    """X's columns in the model's feature order, matched by name (as XGBoost
    refuses a frame whose names differ, fastml refuses it too, naming them)."""
    cols = _frame_columns(X)
    if cols is None or cols == names:
        return X
    missing = [n for n in names if n not in cols]
    extra = [c for c in cols if c not in set(names)]
    if missing or extra or len(set(cols)) != len(cols):
        raise ValueError(
            "X's columns do not match the model's feature names: "
            + ", ".join(
                part
                for part in (
                    f"missing {missing}" if missing else "",
                    f"unknown {extra}" if extra else "",
                    "duplicate columns" if len(set(cols)) != len(cols) else "",
                )
                if part
            )
        )
    mod = type(X).__module__
    if mod.startswith("pandas"):
        return X[names]
    if mod.startswith("polars"):
        return X.select(names)
    return X.select(names)  # pyarrow Table / RecordBatch


def _as_matrix(X: Any) -> Any:
    """A 2-D float32/float64 array-like the native predict accepts (no copy when possible)."""
    if isinstance(X, np.ndarray):
        if X.dtype in (np.float32, np.float64):
            return X
        if X.dtype.kind in "biuf":
            return X.astype(np.float64)
        raise TypeError(f"X must be numeric, got dtype {X.dtype}")
    mod = type(X).__module__
    if mod.startswith("torch"):
        return X
    if mod.startswith("pandas"):
        import pandas as pd

        if isinstance(X, pd.DataFrame):
            cols = []
            for c in X.columns:
                s = X[c]
                if isinstance(s.dtype, pd.CategoricalDtype):
                    codes = s.cat.codes.to_numpy().astype(np.float64)
                    codes[codes < 0] = np.nan
                    cols.append(codes)
                else:
                    cols.append(s.to_numpy(dtype=np.float64, na_value=np.nan))
            if not cols:
                return np.zeros((len(X), 0))
            return np.ascontiguousarray(np.column_stack(cols))
    if mod.startswith("pyarrow"):
        import pyarrow as pa

        if isinstance(X, (pa.Table, pa.RecordBatch)):
            cols = []
            for col in X.columns:
                if pa.types.is_dictionary(col.type):
                    col = (
                        pa.chunked_array([c.indices for c in col.chunks])
                        if isinstance(col, pa.ChunkedArray)
                        else col.indices
                    )
                arr = col.to_numpy(zero_copy_only=False)
                cols.append(np.asarray(arr, dtype=np.float64))
            if not cols:
                return np.zeros((X.num_rows, 0))
            return np.ascontiguousarray(np.column_stack(cols))
    if mod.startswith("polars"):
        return np.ascontiguousarray(X.to_numpy(), dtype=np.float64)
    return X


def _parse_metadata(text: str) -> dict[str, Any]:
    """A forest's metadata: empty, or a JSON object (ValueError otherwise)."""
    if not text:
        return {}
    try:
        meta = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"its metadata is not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise ValueError(f"its metadata is a JSON {type(meta).__name__}, not an object")
    return meta


def _is_cuda_tensor(X: Any) -> bool:
    return type(X).__module__.startswith("torch") and getattr(X, "is_cuda", False)


# ---------------------------------------------------------------------------- Forest


class Forest:
    """A tree ensemble in fastml's compact native form.

    Build one with :meth:`from_xgboost`, :meth:`from_lightgbm`, :meth:`from_sklearn`
    or :meth:`load`. Prediction is exact to the source library's own predictor:
    XGBoost margins are bit-identical (float32 splits and accumulation, in XGBoost's
    tree order), LightGBM and scikit-learn accumulate in float64.
    """

    def __init__(self, core: Any) -> None:
        if not isinstance(core, _core.ForestCore):
            raise TypeError(
                "Forest is built with Forest.from_xgboost / from_lightgbm / from_sklearn / load"
            )
        spec = core.spec()
        meta = _parse_metadata(spec["metadata"])
        # Assigned last: a Forest either exists whole or not at all.
        self._core = core
        self._meta: dict[str, Any] = meta
        self._objective = str(spec["objective"])
        self._auto_rows: int | None = None  # see auto_crossover_rows
        # device="cuda" with a CUDA tensor: the result's torch dtype and the
        # shape after the rows (set at first use; the latency path of one row).
        self._cuda_out: tuple[Any, tuple[int, ...]] | None = None

    # -------------------------------------------------------------- constructors

    @classmethod
    def from_xgboost(cls, model: Any, *, iteration_range: tuple[int, int] | None = None) -> Forest:
        """Load an XGBoost model: a JSON or UBJSON file path (or its bytes), a Booster or an XGBModel.

        ``iteration_range=(begin, end)`` keeps boosting rounds ``[begin, end)``, as
        XGBoost's own ``iteration_range`` (``(0, 0)`` means all). By default a
        Booster keeps all rounds and an XGBModel fitted with early stopping keeps
        ``best_iteration + 1``, as ``XGBModel.predict`` does.
        """
        return cls(_load_xgboost(model, iteration_range))

    @classmethod
    def from_lightgbm(cls, model: Any, *, num_iteration: int | None = None) -> Forest:
        """Load a LightGBM model: a text model file path, a Booster or an LGBMModel.

        ``num_iteration`` keeps the first rounds; by default a Booster or LGBMModel keeps
        its best iteration when it has one (as ``predict`` does), a file keeps all.
        """
        return cls(_load_lightgbm(model, num_iteration))

    @classmethod
    def from_sklearn(cls, estimator: Any) -> Forest:
        """Load a fitted scikit-learn RandomForest*, ExtraTrees*, GradientBoosting*,
        HistGradientBoosting* (or DecisionTree*) estimator."""
        return cls(_load_sklearn(estimator))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Forest:
        """Read a forest written by :meth:`save`.

        The file is validated as a fresh build is: a truncated, corrupted or foreign
        file raises :class:`fastml.FormatError` (a ``ValueError``) naming the file,
        the field and its byte offset; a file that cannot be opened or read raises
        ``OSError``.
        """
        with open(path, "rb") as fh:
            data = fh.read()
        return cls._from_bytes(data, repr(os.fspath(path)))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> Forest:
        """Decode bytes written by :meth:`to_bytes` (validated as :meth:`load` is)."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"data must be bytes, got {type(data).__name__}")
        return cls._from_bytes(bytes(data), "data")

    @classmethod
    def _from_bytes(cls, data: bytes, source: str) -> Forest:
        core = _core.ForestCore.from_bytes(data, source)
        try:
            return cls(core)
        except ValueError as e:
            raise _core.FormatError(f"{source}: not a valid fastml forest file: {e}") from None

    def to_bytes(self) -> bytes:
        """The forest in fastml's versioned binary format (what :meth:`save` writes)."""
        return bytes(self._core.to_bytes())

    def __reduce__(self) -> tuple[Any, ...]:
        return (Forest.from_bytes, (self.to_bytes(),))

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the forest in fastml's versioned binary format (magic, version, checksum)."""
        data = self.to_bytes()
        tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)

    # -------------------------------------------------------------- properties

    @property
    def num_features(self) -> int:
        """Number of input features (columns of X)."""
        return int(self._core.num_features)

    @property
    def num_trees(self) -> int:
        """Number of trees kept (after iteration_range / num_iteration)."""
        return int(self._core.num_trees)

    @property
    def num_outputs(self) -> int:
        """Outputs per row: 1, or the number of classes of a multi-class model."""
        return int(self._core.num_outputs)

    @property
    def objective(self) -> str:
        """The source model's objective (e.g. ``'binary:logistic'``, ``'multiclass num_class:3'``,
        or the scikit-learn estimator's class name)."""
        return self._objective

    @property
    def output_dtype(self) -> np.dtype[Any]:
        """dtype of margin/value outputs: float32 for XGBoost, float64 otherwise."""
        return np.dtype(self._core.output_dtype)

    @property
    def max_depth(self) -> int:
        """Depth of the deepest tree."""
        return int(self._core.max_depth)

    def __repr__(self) -> str:
        return (
            f"Forest(objective={self.objective!r}, num_trees={self.num_trees}, "
            f"num_features={self.num_features}, num_outputs={self.num_outputs})"
        )

    def _fastml_native_handler(self) -> Any:
        """The native handler that fastml.infer.Batcher runs without the GIL
        (its output is predict(X, output='value'))."""
        return self._core

    # -------------------------------------------------------------- prediction

    def predict(
        self,
        X: Any,
        output: Output = "value",
        device: Device = "cpu",
        out: Any = None,
    ) -> Any:
        """Predict rows of ``X``.

        X: a 2-D float32/float64 NumPy array (other numeric dtypes are converted),
        a CPU or CUDA torch tensor, or a pandas/pyarrow table of numeric columns
        (categorical columns use their codes). NaN is a missing value.

        output: ``"margin"`` (raw score), ``"value"`` (after the objective's link:
        probabilities, exp for Poisson/Gamma/Tweedie, identity for regression and
        ranking) or ``"class"`` (int64 class index, or the estimator's class label
        for scikit-learn classifiers).

        device: ``"cpu"``, ``"cuda"`` (needs a CUDA build and GPU), or ``"auto"``
        (the GPU for CUDA tensors, and for host batches of at least
        :attr:`auto_crossover_rows` rows, a crossover measured for this forest
        at its first use, when a GPU is usable). A CUDA tensor with
        ``device="cpu"`` raises ValueError saying so.

        Returns a NumPy array of shape (rows,) when num_outputs == 1 else
        (rows, num_outputs), dtype :attr:`output_dtype` (int64 or the label dtype
        for "class"); a CUDA torch tensor when X is one and the GPU ran it, queued
        on torch's current stream without synchronising. ``out`` receives
        margin/value results in place (C-contiguous, right shape and dtype): a
        NumPy array, or, when X is a CUDA tensor, a CUDA tensor on X's device,
        which the kernel writes directly (no allocation per call: a static
        buffer for a CUDA-graph-captured serving step).
        One row given as a 1-D array of ``num_features`` values is answered with
        one row of output (``predict(X[0]) == predict(X[0:1])[0]``), as
        :class:`~fastml.infer.Batcher` answers it.
        """
        if output not in ("value", "margin", "class"):
            raise ValueError(f"output must be 'value', 'margin' or 'class', got {output!r}")
        if (
            type(X).__module__.split(".")[0] in ("numpy", "torch")
            and len(getattr(X, "shape", ())) == 1
        ):
            if out is not None:
                raise ValueError("out is for batches: give X as (rows, features) to use it")
            return self.predict(X[None], output=output, device=device)[0]
        if device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
        if output == "class":
            task = self._meta.get("task")
            if task not in ("binary", "multiclass", "proba", "multiclass_ova"):
                raise ValueError(
                    f"output='class' needs a classification model, this forest's objective "
                    f"is {self.objective!r}"
                )
        if device == "cpu" and _is_cuda_tensor(X):
            raise ValueError(
                f"X is a CUDA tensor (on {X.device}): pass device='cuda' (or 'auto') to predict "
                "on the GPU, or X.cpu() for the CPU engine"
            )
        use_cuda = device == "cuda" or (device == "auto" and self._auto_cuda(X))
        apply_link = output == "value"
        if (
            use_cuda
            and output != "class"
            and _is_cuda_tensor(X)
            and not isinstance(out, np.ndarray)
        ):
            return self._predict_cuda_tensor(X, apply_link, out)
        if use_cuda:
            res = self._predict_cuda(X, apply_link)
        else:
            Xm = _as_matrix(self._by_name(X))
            if output == "class" or out is None:
                res = self._core.predict(Xm, apply_link)
            else:
                return self._core.predict(Xm, apply_link, out)
        if output == "class":
            res = self._to_class(res)
        if out is not None:
            if type(res).__module__.startswith("torch"):
                res = res.cpu().numpy()
            if out.shape != res.shape:
                raise ValueError(f"out must have shape {res.shape}, got {out.shape}")
            np.copyto(out, res, casting="same_kind")
            return out
        return res

    @property
    def feature_names(self) -> list[str] | None:
        """The feature names the source model recorded (None when it had none).

        With names, a pandas/polars DataFrame or Arrow table passed to
        :meth:`predict` is matched by column name (reordered if needed); a frame
        whose names differ is refused, naming the missing and unknown columns.
        Arrays are always taken by position.
        """
        names = self._meta.get("feature_names")
        return list(names) if isinstance(names, list) else None

    def _by_name(self, X: Any) -> Any:
        names = self.feature_names
        return X if names is None else _select_by_name(X, names)

    def _auto_cuda(self, X: Any) -> bool:
        import fastml

        if not _core.forest_cuda_compiled() or not fastml.cuda_available():
            return False
        if _is_cuda_tensor(X):
            return True
        shape = getattr(X, "shape", None)
        return bool(shape) and int(shape[0]) >= self.auto_crossover_rows

    @property
    def auto_crossover_rows(self) -> int:
        """Rows from which ``device="auto"`` sends a host (NumPy, CPU tensor,
        frame) batch to the GPU; CUDA tensors always go to the GPU.

        Measured once per forest, at the first use, when a GPU is usable: both
        engines predict synthetic batches of this forest's width (float32, 5%
        missing) at 1,024 and 65,536 rows (best of 3 after a warm-up; the GPU
        timing includes the host-to-device copy a host caller pays), each is
        modelled as ``fixed + per_row * rows``, and the crossover of the two
        lines is kept (1: the GPU always wins; ``2**62``: never). Without a
        usable GPU it is ``2**62`` and nothing is measured. Assign an int to
        fix it instead (e.g. a value measured on the serving machine).
        """
        if self._auto_rows is None:
            import fastml

            if not _core.forest_cuda_compiled() or not fastml.cuda_available():
                return _AUTO_NEVER
            self._auto_rows = self._measure_crossover()
        return self._auto_rows

    @auto_crossover_rows.setter
    def auto_crossover_rows(self, rows: int) -> None:
        if isinstance(rows, bool) or not isinstance(rows, (int, np.integer)) or rows < 1:
            raise ValueError(f"auto_crossover_rows must be an int >= 1, got {rows!r}")
        self._auto_rows = int(rows)

    def _measure_crossover(self) -> int:
        rng = np.random.default_rng(0)
        big = max(_AUTO_SIZES)
        X = rng.standard_normal((big, self.num_features), dtype=np.float32)
        X[rng.random(X.shape) < 0.05] = np.nan
        timings: dict[str, list[tuple[int, float]]] = {"cpu": [], "cuda": []}
        for device in ("cpu", "cuda"):
            for rows in _AUTO_SIZES:
                batch = X[:rows]
                self.predict(batch, output="margin", device=device)  # warm-up
                best = math.inf
                for _ in range(_AUTO_REPEATS):
                    t0 = time.perf_counter()
                    self.predict(batch, output="margin", device=device)
                    best = min(best, time.perf_counter() - t0)
                timings[device].append((rows, best))
        return crossover_rows(timings["cpu"], timings["cuda"])

    def _predict_cuda(self, X: Any, apply_link: bool) -> Any:
        if _is_cuda_tensor(X):
            return self._predict_cuda_tensor(X, apply_link, None)
        return self._core.predict_cuda(_as_matrix(self._by_name(X)), apply_link)

    def _predict_cuda_tensor(self, X: Any, apply_link: bool, out: Any) -> Any:
        """A CUDA tensor in, a CUDA tensor out (``out`` when given), queued on
        torch's current stream of X's device without synchronising."""
        import torch

        if X.dim() != 2:
            raise ValueError(f"X must be 2-D (rows, features), got shape {tuple(X.shape)}")
        if X.dtype is torch.float32:
            dtype = "float32"
        elif X.dtype is torch.float64:
            dtype = "float64"
        else:
            raise TypeError(f"X must be float32 or float64, got {X.dtype}")
        if not X.is_contiguous():
            X = X.contiguous()
        rows = X.shape[0]
        if self._cuda_out is None:
            odt = torch.float32 if self.output_dtype == np.float32 else torch.float64
            self._cuda_out = (odt, () if self.num_outputs == 1 else (self.num_outputs,))
        odt, tail = self._cuda_out
        if out is None:
            res = torch.empty((rows, *tail), dtype=odt, device=X.device)
        else:
            res = out
            if not _is_cuda_tensor(out) or out.device != X.device:
                raise ValueError(
                    f"out must be a CUDA tensor on {X.device} when X is one, got "
                    f"{type(out).__name__} on {getattr(out, 'device', 'the host')}"
                )
            if out.dtype != odt or tuple(out.shape) != (rows, *tail) or not out.is_contiguous():
                raise ValueError(
                    f"out must be a contiguous {odt} tensor of shape {(rows, *tail)}, got "
                    f"{out.dtype} {tuple(out.shape)}"
                    + ("" if out.is_contiguous() else " (not contiguous)")
                )
        self._core.predict_cuda_ptr(
            X.data_ptr(),
            rows,
            X.shape[1],
            dtype,
            res.data_ptr(),
            apply_link,
            current_stream_handle(X.device),
        )
        return res

    def _to_class(self, margin: Any) -> Any:
        if type(margin).__module__.startswith("torch"):
            margin = margin.cpu().numpy()
        # From margins: > 0 is class 1 for every one-output link; argmax otherwise
        # (the links are monotonic, so argmax of the margin is argmax of the value).
        if margin.ndim == 1:
            idx = (margin > 0).astype(np.int64)
        else:
            idx = np.argmax(margin, axis=1).astype(np.int64)
        classes = self._meta.get("classes")
        if classes is not None:
            return np.asarray(classes)[idx]
        return idx
