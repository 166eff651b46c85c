"""The ``fastml demo`` pipeline: generate -> load + train -> serve -> monitor -> summarise.

Every stage runs through fastml: the loader feeds training, the fused ops
build the model, the batcher serves it, and the drift monitor watches the
served traffic, into which a drift is injected halfway.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fastml.demo.data import (
    CATEGORICAL_FEATURES,
    COUNTRIES,
    MERCHANT_CATEGORIES,
    NUMERIC_FEATURES,
    Transactions,
    generate,
)

FEATURES = [*NUMERIC_FEATURES, "merchant_code", "country_code"]


@dataclass
class DemoResult:
    """What ``fastml demo`` measured, and where it wrote its reports."""

    out_dir: Path
    rows: int
    device: str
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    model_quality: dict[str, float] = field(default_factory=dict)
    drifted_features: list[str] = field(default_factory=list)
    drift_detected_at_row: int | None = None
    drift_injected_at_row: int | None = None
    reports: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_dir": str(self.out_dir),
            "rows": self.rows,
            "device": self.device,
            "stages": self.stages,
            "model_quality": self.model_quality,
            "drifted_features": self.drifted_features,
            "drift_detected_at_row": self.drift_detected_at_row,
            "drift_injected_at_row": self.drift_injected_at_row,
            "reports": self.reports,
        }


class _Progress:
    """rich progress when available, plain lines otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self._rich = None
        if enabled:
            try:
                from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

                self._rich = Progress(
                    TextColumn("{task.description:<28}"),
                    BarColumn(),
                    TextColumn("{task.percentage:>5.1f}%"),
                    TimeElapsedColumn(),
                    transient=False,
                )
            except ImportError:
                self._rich = None

    def __enter__(self) -> _Progress:
        if self._rich is not None:
            self._rich.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._rich is not None:
            self._rich.__exit__(*exc)

    @contextmanager
    def task(self, description: str, total: float) -> Iterator[Callable[[float], None]]:
        if self._rich is not None:
            tid = self._rich.add_task(description, total=total)
            yield lambda n: self._rich.update(tid, advance=n)
            self._rich.update(tid, completed=total)
        else:
            if self.enabled:
                print(f"  {description} ...", flush=True)
            yield lambda n: None


def _codes(values: np.ndarray, vocabulary: tuple[str, ...]) -> np.ndarray:
    """Stable integer codes; values outside the vocabulary get len(vocabulary)."""
    lookup = {v: i for i, v in enumerate(vocabulary)}
    other = len(vocabulary)
    return np.fromiter((lookup.get(v, other) for v in values), dtype=np.int32, count=len(values))


def _write_parquet(t: Transactions, path: Path, row_group_size: int) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = {name: t.columns[name] for name in NUMERIC_FEATURES}
    cols["merchant_code"] = _codes(t.columns["merchant_category"], MERCHANT_CATEGORIES)
    cols["country_code"] = _codes(t.columns["country"], COUNTRIES)
    cols["label"] = t.columns["label"]
    table = pa.table({k: pa.array(v) for k, v in cols.items()})
    table = table.append_column(
        "timestamp", pa.array(t.columns["timestamp"], type=pa.timestamp("s"))
    )
    for name in CATEGORICAL_FEATURES:
        table = table.append_column(name, pa.array(t.columns[name].astype(str)))
    pq.write_table(table, path, row_group_size=row_group_size)


def _feature_matrix(columns: dict[str, np.ndarray]) -> np.ndarray:
    """(rows, features) float32 in FEATURES order, from a batch or a table's columns."""
    return np.stack([np.asarray(columns[f], dtype=np.float32) for f in FEATURES], axis=1)


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (scipy.stats.rankdata's default)."""
    x = np.asarray(x)
    order = np.argsort(x, kind="stable")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])  # first index of each tie group
    ends = np.r_[starts[1:], len(xs)]
    ranks = np.empty(len(xs), dtype=np.float64)
    ranks[order] = np.repeat((starts + ends + 1) / 2.0, ends - starts)
    return ranks


def _auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC by the rank-sum formula (ties get average ranks)."""
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = _average_ranks(scores)
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _norm_params(train: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """(centre, scale) per numeric feature; robust ones for the heavy-tailed features."""
    out = {}
    for f in NUMERIC_FEATURES:
        col = np.asarray(train[f], dtype=np.float64)
        if f in ("amount", "distance_km", "account_age_days"):
            centre, scale = (
                float(np.median(col)),
                float(np.percentile(col, 90) - np.percentile(col, 10)),
            )
        else:
            centre, scale = float(col.mean()), float(col.std())
        out[f] = (centre, scale if scale > 0 else 1.0)
    return out


def _standardize_transforms(params: dict[str, tuple[float, float]]) -> dict[str, list[Any]]:
    """Per-column FillNa -> Standardize -> Clip -> Cast, fused into the loader's gather."""
    from fastml import data

    return {
        f: [data.FillNa(0.0), data.Standardize(c, s), data.Clip(-5.0, 5.0), data.Cast("float32")]
        for f, (c, s) in params.items()
    }


def _build_mlp(n_features: int, n_merchants: int, n_countries: int, device: str) -> Any:
    import torch
    from torch import nn

    from fastml import ops

    class FraudMLP(nn.Module):
        """Numeric features + category embeddings -> RMSNorm -> SwiGLU block -> 2 logits."""

        def __init__(self) -> None:
            super().__init__()
            self.merchant = nn.Embedding(n_merchants + 1, 4)
            self.country = nn.Embedding(n_countries + 1, 4)
            width = n_features + 8
            self.inp = nn.Linear(width, 64)
            self.norm = ops.RMSNorm(64)
            self.block = ops.SwiGLU(64, 128)
            self.head = nn.Linear(64, 2)

        def forward(
            self, numeric: torch.Tensor, merchant: torch.Tensor, country: torch.Tensor
        ) -> Any:
            h = torch.cat([numeric, self.merchant(merchant), self.country(country)], dim=1)
            h = self.inp(h)
            h = h + self.block(self.norm(h))
            return self.head(h)

    return FraudMLP().to(device)


def _train_mlp(
    parquet: Path,
    train_cols: dict[str, np.ndarray],
    device: str,
    seed: int,
    epochs: int,
    progress: _Progress,
) -> tuple[Any, dict[str, Any]]:
    import torch

    from fastml import data, ops

    torch.manual_seed(seed)
    ds = data.Dataset.from_parquet(str(parquet), columns=[*FEATURES, "label"])
    loader = data.Loader(
        ds,
        batch_size=1024,
        shuffle=True,
        seed=seed,
        output="torch",
        device=device if device == "cuda" else "cpu",
        transforms=_standardize_transforms(_norm_params(train_cols)),
    )
    model = _build_mlp(len(NUMERIC_FEATURES), len(MERCHANT_CATEGORIES), len(COUNTRIES), device)
    # Fraud is rare: weight the positive class so the model does not ignore it.
    opt = ops.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    rows = 0
    t0 = time.perf_counter()
    losses = []
    with progress.task("train MLP (fastml.ops)", total=epochs * len(loader)) as advance:
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for batch in loader:
                numeric = torch.stack([batch[f] for f in NUMERIC_FEATURES], dim=1).to(device)
                merchant = batch["merchant_code"].to(device=device, dtype=torch.long)
                country = batch["country_code"].to(device=device, dtype=torch.long)
                target = batch["label"].to(device=device, dtype=torch.long)
                logits = model(numeric, merchant, country)
                loss = ops.cross_entropy(logits, target)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(float(loss.detach()))
                rows += int(target.shape[0])
                advance(1)
    seconds = time.perf_counter() - t0
    stats = loader.stats()
    loader.close()
    return model, {
        "rows": rows,
        "seconds": seconds,
        "rows_per_s": rows / seconds,
        "final_loss": float(np.mean(losses[-20:])) if losses else float("nan"),
        "loader_wait_s": float(stats.get("wait_seconds", stats.get("consumer_wait_s", 0.0)) or 0.0),
    }


def _mlp_scores(
    model: Any, cols: dict[str, np.ndarray], train_cols: dict[str, np.ndarray], device: str
) -> Any:
    import torch

    from fastml import data

    ds = data.Dataset.from_numpy({f: np.asarray(cols[f]) for f in FEATURES})
    loader = data.Loader(
        ds,
        batch_size=8192,
        shuffle=False,
        output="torch",
        transforms=_standardize_transforms(_norm_params(train_cols)),
    )
    out = []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            numeric = torch.stack([batch[f] for f in NUMERIC_FEATURES], dim=1).to(device)
            logits = model(
                numeric,
                batch["merchant_code"].to(device=device, dtype=torch.long),
                batch["country_code"].to(device=device, dtype=torch.long),
            )
            out.append(torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy())
    loader.close()
    return np.concatenate(out)


def _train_xgboost(
    train: dict[str, np.ndarray], seed: int, rounds: int
) -> tuple[Any, dict[str, Any]] | None:
    try:
        import xgboost as xgb
    except ImportError:
        return None
    from fastml import infer

    X = _feature_matrix(train)
    y = train["label"]
    t0 = time.perf_counter()
    booster = xgb.train(
        {
            "objective": "binary:logistic",
            "max_depth": 6,
            "eta": 0.1,
            "tree_method": "hist",
            "seed": seed,
            "nthread": 0,
            "scale_pos_weight": 5.0,
        },
        xgb.DMatrix(X, label=y),
        num_boost_round=rounds,
    )
    train_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    forest = infer.Forest.from_xgboost(booster)
    load_s = time.perf_counter() - t0
    return (booster, forest), {
        "train_seconds": train_s,
        "load_seconds": load_s,
        "trees": forest.num_trees,
    }


def _serve(
    predict_rows: Callable[[np.ndarray], np.ndarray] | Any,
    X: np.ndarray,
    clients: int,
    progress: _Progress,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Serve every row of X as a single-row request from `clients` threads at once."""
    from fastml import infer

    n = X.shape[0]
    scores = np.empty(n, dtype=np.float32)
    latencies = np.empty(n, dtype=np.float64)
    next_row = iter(range(n))
    lock = threading.Lock()
    errors: list[BaseException] = []

    with (
        infer.Batcher(
            predict_rows, max_batch_size=256, max_delay_us=200, name="fraud-model"
        ) as batcher,
        progress.task(f"serve ({clients} client threads)", total=n) as advance,
    ):

        def client() -> None:
            done = 0
            try:
                while True:
                    with lock:
                        i = next(next_row, None)
                    if i is None:
                        break
                    t0 = time.perf_counter()
                    y = batcher.predict(X[i : i + 1])
                    latencies[i] = time.perf_counter() - t0
                    scores[i] = float(np.asarray(y).reshape(-1)[-1])
                    done += 1
                    if done % 256 == 0:
                        advance(256)
            except BaseException as e:  # reported after the threads join
                errors.append(e)

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, name=f"demo-client-{k}") for k in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - t0
        stats = batcher.stats()
    if errors:
        raise RuntimeError(f"serving failed: {errors[0]!r}") from errors[0]
    q = np.percentile(latencies * 1e6, [50, 90, 99])
    return scores, {
        "requests": n,
        "seconds": seconds,
        "requests_per_s": n / seconds,
        "latency_us_p50": float(q[0]),
        "latency_us_p90": float(q[1]),
        "latency_us_p99": float(q[2]),
        "batches": int(stats.get("batches", 0)),
        "mean_batch_rows": n / max(int(stats.get("batches", 0)), 1),
    }


def _monitor(
    reference: dict[str, np.ndarray],
    traffic: dict[str, np.ndarray],
    window_rows: int,
    out_dir: Path,
    progress: _Progress,
) -> dict[str, Any]:
    from fastml import drift

    monitored = [*NUMERIC_FEATURES, *CATEGORICAL_FEATURES]
    ref = drift.Profile.from_data(
        {f: reference[f] for f in monitored}, categorical=list(CATEGORICAL_FEATURES)
    )
    first_drift: dict[str, int] = {}
    rows_seen = 0

    def on_drift(name: str, result: Any) -> None:
        first_drift.setdefault(name, rows_seen)

    mon = drift.Monitor(ref, window=window_rows, on_drift=on_drift)
    n = len(traffic["label"])
    chunk = 1000
    t0 = time.perf_counter()
    with progress.task("monitor drift", total=n) as advance:
        for start in range(0, n, chunk):
            stop = min(start + chunk, n)
            rows_seen = stop
            mon.update({f: traffic[f][start:stop] for f in monitored})
            advance(stop - start)
    seconds = time.perf_counter() - t0
    windows = mon.windows
    final = windows[-1] if windows else mon.report()
    html_path = out_dir / "drift_report.html"
    json_path = out_dir / "drift_report.json"
    final.to_html(html_path)
    timeline = [
        {"window": k, "end_row": (k + 1) * window_rows, "drifted": w.drifted_features}
        for k, w in enumerate(windows)
    ]
    doc = {"final_window": final.to_dict(), "timeline": timeline, "first_drift_row": first_drift}
    json_path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    return {
        "rows": n,
        "seconds": seconds,
        "rows_per_s": n / seconds,
        "values_per_s": n * len(monitored) / seconds,
        "first_drift_row": first_drift,
        "drifted_features": final.drifted_features,
        "dataset_drift": bool(final.dataset_drift),
        "html": str(html_path),
        "json": str(json_path),
    }


def run_demo(
    rows: int = 200_000,
    out: str | Path | None = None,
    device: str = "auto",
    seed: int = 0,
    serve_requests: int | None = None,
    epochs: int = 2,
    clients: int = 8,
    progress: bool = True,
) -> DemoResult:
    """Run the whole pipeline; returns what it measured (also written as summary.json)."""
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 2000:
        raise ValueError(f"rows must be an int >= 2000, got {rows!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device='cuda' was asked for but torch sees no CUDA device")
    if out is None:
        out_dir = Path.cwd() / time.strftime("fastml-demo-%Y%m%d-%H%M%S")
    else:
        out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    n_serve = serve_requests if serve_requests is not None else max(2000, rows // 10)
    result = DemoResult(out_dir=out_dir, rows=rows, device=device)

    with _Progress(progress) as prog:
        # 1. generate
        t0 = time.perf_counter()
        with prog.task("generate transactions", total=1) as advance:
            train = generate(rows, seed=seed)
            parquet = out_dir / "transactions.parquet"
            _write_parquet(train, parquet, row_group_size=max(rows // 16, 1024))
            advance(1)
        train_cols = dict(train.columns)
        train_cols["merchant_code"] = _codes(
            train.columns["merchant_category"], MERCHANT_CATEGORIES
        )
        train_cols["country_code"] = _codes(train.columns["country"], COUNTRIES)
        result.stages["generate"] = {
            "rows": rows,
            "seconds": time.perf_counter() - t0,
            "parquet": str(parquet),
            "fraud_rate": float(train.columns["label"].mean()),
        }

        # held-out data and the served traffic, drift injected halfway
        holdout = generate(max(rows // 5, 2000), seed=seed + 1)
        hold_cols = dict(holdout.columns)
        hold_cols["merchant_code"] = _codes(
            holdout.columns["merchant_category"], MERCHANT_CATEGORIES
        )
        hold_cols["country_code"] = _codes(holdout.columns["country"], COUNTRIES)
        traffic = generate(n_serve, seed=seed + 2, drift_from=n_serve // 2)
        traffic_cols = dict(traffic.columns)
        traffic_cols["merchant_code"] = _codes(
            traffic.columns["merchant_category"], MERCHANT_CATEGORIES
        )
        traffic_cols["country_code"] = _codes(traffic.columns["country"], COUNTRIES)
        result.drift_injected_at_row = n_serve // 2

        # 2. load + train
        model, train_stats = _train_mlp(parquet, train_cols, device, seed, epochs, prog)
        result.stages["train_mlp"] = train_stats
        mlp_scores = _mlp_scores(model, hold_cols, train_cols, device)
        result.model_quality["mlp_auc"] = _auc(hold_cols["label"], mlp_scores)

        gbm = _train_xgboost(train_cols, seed, rounds=100)
        if gbm is not None:
            (_booster, forest), gbm_stats = gbm
            result.stages["train_xgboost"] = gbm_stats
            hold_X = _feature_matrix(hold_cols)
            gbm_scores = forest.predict(hold_X)
            result.model_quality["xgboost_auc"] = _auc(
                hold_cols["label"], np.asarray(gbm_scores).reshape(-1)
            )
            served_model: Any = forest
            result.stages["serve_model"] = {
                "model": "xgboost via fastml.infer.Forest (native handler)"
            }
        else:
            served_model = _mlp_predictor(model, train_cols, device)
            result.stages["serve_model"] = {
                "model": "torch MLP (Python handler); xgboost not installed"
            }

        # 3. serve
        traffic_X = _feature_matrix(traffic_cols)
        _, serve_stats = _serve(served_model, traffic_X, clients, prog)
        result.stages["serve"] = {**result.stages.pop("serve_model"), **serve_stats}

        # 4. monitor drift on the served traffic
        # Whole chunks per window, at least 1,000 rows: smaller windows judge noise.
        window_rows = max(n_serve // 10 // 1000, 1) * 1000
        mon = _monitor(train_cols, traffic_cols, window_rows, out_dir, prog)
        result.stages["drift"] = {k: v for k, v in mon.items() if k not in ("html", "json")}
        result.drifted_features = sorted(mon["first_drift_row"])
        result.drift_detected_at_row = (
            min(mon["first_drift_row"].values()) if mon["first_drift_row"] else None
        )
        result.reports = {"html": mon["html"], "json": mon["json"]}

    (out_dir / "summary.json").write_text(json.dumps(result.to_dict(), indent=2), encoding="utf-8")
    result.reports["summary"] = str(out_dir / "summary.json")
    return result


def _mlp_predictor(
    model: Any, train_cols: dict[str, np.ndarray], device: str
) -> Callable[[np.ndarray], np.ndarray]:
    """A Batcher handler over the MLP: (rows, FEATURES) float32 -> fraud probability."""
    import torch

    params = _norm_params(train_cols)

    def predict(X: np.ndarray) -> np.ndarray:
        cols = {f: X[:, i] for i, f in enumerate(FEATURES)}
        numeric = np.stack([_apply_norm(cols[f], *params[f]) for f in NUMERIC_FEATURES], axis=1)
        with torch.no_grad():
            logits = model(
                torch.from_numpy(numeric).to(device),
                torch.from_numpy(cols["merchant_code"].astype(np.int64)).to(device),
                torch.from_numpy(cols["country_code"].astype(np.int64)).to(device),
            )
            return torch.softmax(logits.float(), dim=1)[:, 1].cpu().numpy()

    return predict


def _apply_norm(col: np.ndarray, centre: float, scale: float) -> np.ndarray:
    """The same FillNa -> Standardize -> Clip as the loader's transforms, in NumPy."""
    x = np.nan_to_num(col.astype(np.float64), nan=0.0)
    return np.clip((x - centre) / scale, -5.0, 5.0).astype(np.float32)


def format_summary(result: DemoResult) -> str:
    """The short text summary printed at the end of ``fastml demo``."""
    s = result.stages
    lines = [
        f"fastml demo: {result.rows:,} training rows on {result.device}, outputs in {result.out_dir}"
    ]
    lines.append(
        f"  generate   {s['generate']['seconds']:.1f} s, fraud rate {s['generate']['fraud_rate']:.2%}"
    )
    t = s["train_mlp"]
    lines.append(
        f"  train MLP  {t['rows_per_s']:,.0f} rows/s through fastml.data + fastml.ops, "
        f"final loss {t['final_loss']:.4f}, AUC {result.model_quality.get('mlp_auc', float('nan')):.3f}"
    )
    if "train_xgboost" in s:
        x = s["train_xgboost"]
        lines.append(
            f"  xgboost    {x['trees']} trees trained in {x['train_seconds']:.1f} s, loaded into "
            f"fastml.infer.Forest in {x['load_seconds'] * 1e3:.1f} ms, AUC {result.model_quality['xgboost_auc']:.3f}"
        )
    v = s["serve"]
    lines.append(
        f"  serve      {v['requests']:,} requests, {v['requests_per_s']:,.0f} req/s, latency p50 "
        f"{v['latency_us_p50']:.0f} us / p90 {v['latency_us_p90']:.0f} us / p99 {v['latency_us_p99']:.0f} us, "
        f"{v['mean_batch_rows']:.1f} rows per batch ({v['model']})"
    )
    d = s["drift"]
    lines.append(f"  drift      {d['values_per_s']:,.0f} values/s through fastml.drift.Monitor")
    if result.drifted_features:
        at = "?" if result.drift_detected_at_row is None else f"{result.drift_detected_at_row:,}"
        lines.append(
            f"             drift injected at row {result.drift_injected_at_row:,}, detected at the window "
            f"ending at row {at}: " + ", ".join(result.drifted_features)
        )
        if d.get("transient_alarms"):
            lines.append(
                "             transient alarms (not drifting at the end): "
                + ", ".join(d["transient_alarms"])
            )
    else:
        lines.append("             no drift detected (one was injected: check the report)")
    lines.append(f"  reports    {result.reports['html']}")
    lines.append(f"             {result.reports['json']}")
    lines.append(f"             {result.reports['summary']}")
    return "\n".join(lines)
