"""The standard ``fastml bench`` suite: one function per component.

Each figure is measured beside the peer that ``benchmarks/`` measures it
against, in the same process and interleaved (``harness.compare``). Sizes are
smaller under ``--quick``. A peer that is not installed gives ``peer=None``.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from typing import Any

import numpy as np

import fastml
from fastml.bench.harness import Timing, compare
from fastml.bench.suite import BenchContext, Figure, Measured, register, skip


def _pair(
    component: str,
    name: str,
    unit: str,
    timings: dict[str, Timing],
    ours: str,
    peer: str | None,
    *,
    goal: float | None = None,
    note: str = "",
    latency: bool = False,
) -> Figure:
    scale = 1e6 if latency else 1.0
    return Figure(
        component=component,
        name=name,
        unit=unit,
        fastml=Measured.from_timing(timings[ours], latency=latency, scale=scale),
        peer=None
        if peer is None
        else Measured.from_timing(timings[peer], latency=latency, scale=scale),
        higher_is_better=not latency,
        goal=goal,
        note=note,
    )


class _OneThread:
    """fastml's pool at one thread for per-core figures; restored on exit."""

    def __enter__(self) -> None:
        self._n = fastml.get_num_threads()
        fastml.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        fastml.set_num_threads(self._n)


# ------------------------------------------------------------------ data


@register("data")
def bench_data(ctx: BenchContext) -> list[Figure]:
    from fastml import data

    # 1M rows (136 MB) even in --quick: larger than the caches, as the limit's table.
    rows = 1_000_000
    repeat = 3 if ctx.quick else 5
    rng = np.random.default_rng(0)
    X = rng.standard_normal((rows, 32), dtype=np.float32)
    y = rng.integers(0, 2, rows).astype(np.int64)
    batch = 1024
    figures = []

    ctx.progress(f"data: in-memory loader, {rows:,} rows x 32 float32")
    loader = data.Loader(
        data.Dataset.from_numpy({"x": X, "y": y}), batch_size=batch, shuffle=True, seed=0
    )
    epoch = [0]

    def fastml_epoch() -> None:
        loader.set_epoch(epoch[0])
        epoch[0] += 1
        for _ in loader:
            pass

    def numpy_take_epoch() -> None:
        perm = rng.permutation(rows)
        for i in range(0, rows, batch):
            idx = perm[i : i + batch]
            X.take(idx, axis=0)
            y.take(idx)

    t = compare(
        {"fastml.data.Loader": fastml_epoch, "numpy take loop": numpy_take_epoch},
        repeat=repeat,
        work=rows,
        unit="rows",
    )
    loader.close()
    figures.append(
        _pair(
            "data",
            "loader_memory_rows",
            "rows/s",
            t,
            "fastml.data.Loader",
            "numpy take loop",
            goal=1.5,
            note=f"{rows:,} rows x 32 float32 + int64 label, shuffled, batch {batch}",
        ).against(
            ctx.limits,
            "cpu_gather_all",
            3.0,
            "3 random 64-byte lines per row (a 128-byte feature row, an 8-byte label)",
        )
    )

    if ctx.device == "cuda":
        figures.append(_loader_h2d(ctx, X, y, batch, repeat))

    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        return figures
    ctx.progress("data: Parquet loader")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.parquet")
        cols = {f"f{i}": X[:, i] for i in range(32)}
        cols["label"] = y
        pq.write_table(pa.table(cols), path, row_group_size=65_536)
        ds = data.Dataset.from_parquet(path)
        pl = data.Loader(ds, batch_size=batch, shuffle=True, seed=0)
        pepoch = [0]

        def fastml_parquet() -> None:
            pl.set_epoch(pepoch[0])
            pepoch[0] += 1
            for _ in pl:
                pass

        t = compare(
            {
                "fastml.data.Loader (parquet)": fastml_parquet,
                "pyarrow.parquet.read_table": lambda: pq.read_table(path),
            },
            repeat=repeat,
            work=rows,
            unit="rows",
        )
        pl.close()
    figures.append(
        _pair(
            "data",
            "loader_parquet_rows",
            "rows/s",
            t,
            "fastml.data.Loader (parquet)",
            "pyarrow.parquet.read_table",
            goal=0.8,
            note="shuffled + batched vs a plain read",
        )
    )
    return figures


def _loader_h2d(ctx: BenchContext, X: np.ndarray, y: np.ndarray, batch: int, repeat: int) -> Figure:
    """device="cuda" loader bandwidth against a pinned host-to-device copy of the same bytes."""
    import torch

    from fastml import data

    ctx.progress("data: loader to CUDA vs pinned host-to-device copy")
    rows = X.shape[0]
    nbytes = X.nbytes + y.nbytes
    loader = data.Loader(
        data.Dataset.from_numpy({"x": X, "y": y}),
        batch_size=batch,
        shuffle=True,
        seed=0,
        device="cuda",
    )
    pinned_x = torch.from_numpy(X[: batch * 64]).pin_memory()
    reps = max(rows // (batch * 64), 1)

    def fastml_cuda_epoch() -> None:
        for _ in loader:
            pass
        torch.cuda.synchronize()

    def pinned_copy() -> None:
        for _ in range(reps):
            pinned_x.to("cuda", non_blocking=True)
        torch.cuda.synchronize()

    t = compare(
        {"fastml Loader(device=cuda)": fastml_cuda_epoch, "pinned H2D copy": pinned_copy},
        repeat=repeat,
    )
    loader.close()
    ours = nbytes / t["fastml Loader(device=cuda)"].median / 1e9
    peer = pinned_x.numel() * 4 * reps / t["pinned H2D copy"].median / 1e9
    return Figure(
        "data",
        "loader_cuda_h2d",
        "GB/s",
        Measured(
            "fastml Loader(device=cuda)", ours, t["fastml Loader(device=cuda)"].spread, repeat
        ),
        Measured("pinned H2D copy (torch)", peer, t["pinned H2D copy"].spread, repeat),
        goal=0.9,
        note="shuffled gather + pinned staging + async copies vs a plain pinned copy",
    ).against(ctx.limits, "gpu_h2d_pinned", 1e9, "the batches' bytes (136 per row) copied once")


# ------------------------------------------------------------------ drift


@register("drift")
def bench_drift(ctx: BenchContext) -> list[Figure]:
    from fastml import drift

    rows = 1_000_000 if ctx.quick else 2_000_000
    repeat = 3 if ctx.quick else 5
    rng = np.random.default_rng(1)
    cols = 16
    X = np.stack([rng.normal(j % 4, 1.0 + j % 3, size=rows) for j in range(cols)], axis=1).astype(
        np.float32
    )
    names = [f"f{j}" for j in range(cols)]
    frame = {k: X[:, j] for j, k in enumerate(names)}
    head = {k: v[:100_000] for k, v in frame.items()}
    figures = []
    # The public calls, one per profile mode: Profile.update on a profile made
    # by Profile.from_data(reference, mode=...).empty() (what Monitor.update runs).
    profiles = {
        mode: drift.Profile.from_data(head, mode=mode, bins=20)
        for mode in ("exact", "histogram", "sketch")
    }
    edges = {k: profiles["exact"].summary(k)["edges"] for k in names}

    def numpy_hist() -> None:
        for j, k in enumerate(names):
            np.histogram(X[:, j], bins=edges[k])

    cands: dict[str, Any] = {"numpy.histogram": numpy_hist}
    for mode, p in profiles.items():
        cands[f'Profile(mode="{mode}").update'] = lambda p=p: p.empty().update(frame)
    ctx.progress(f"drift: Profile.update, {cols} x {rows:,} float32, each mode (1 thread)")
    with _OneThread():
        t = compare(cands, repeat=repeat, work=rows * cols, unit="values")
    goals = {"exact": 3.0, "histogram": 10.0, "sketch": None}
    for mode in ("exact", "histogram", "sketch"):
        figures.append(
            _pair(
                "drift",
                "ingest_values" if mode == "exact" else f"ingest_values_{mode}",
                "values/s",
                t,
                f'Profile(mode="{mode}").update',
                "numpy.histogram",
                goal=goals[mode],
                note=f'Profile.from_data(ref, mode="{mode}").empty().update(frame): histogram, '
                f"moments, missing counts{', every value' if mode == 'exact' else ', a sketch' if mode == 'sketch' else ''}; "
                f"{cols} float32 columns, 1 thread; peer: numpy.histogram alone on the same edges",
            ).against(
                ctx.limits,
                "cpu_copy_1t",
                4.0,
                "4 bytes read per float32 value, against a 1-thread copy's bytes read + written",
            )
        )
    # The same default path on every thread (columns in parallel on the pool).
    t_all = compare(
        {
            'Profile(mode="exact").update, all threads': lambda: (
                profiles["exact"].empty().update(frame)
            ),
            "numpy.histogram": numpy_hist,
        },
        repeat=repeat,
        work=rows * cols,
        unit="values",
    )
    figures.append(
        _pair(
            "drift",
            "ingest_values_all_threads",
            "values/s",
            t_all,
            'Profile(mode="exact").update, all threads',
            "numpy.histogram",
            note=f"exact mode, {cols} columns in parallel on fastml's pool; numpy.histogram on one thread",
        ).against(ctx.limits, "cpu_copy_all", 4.0, "4 bytes read per float32 value")
    )

    n = 200_000 if ctx.quick else 1_000_000
    ctx.progress(f"drift: exact KS {n:,} vs {n:,}")
    a = rng.standard_normal(n)
    b = rng.standard_normal(n) + 0.01
    cands: dict[str, Any] = {"fastml drift.ks_2samp": lambda: drift.ks_2samp(a, b)}
    try:
        from scipy import stats

        cands["scipy.stats.ks_2samp"] = lambda: stats.ks_2samp(a, b)
        peer: str | None = "scipy.stats.ks_2samp"
    except ImportError:
        peer = None
    t = compare(cands, repeat=repeat, work=2 * n, unit="values")
    figures.append(
        _pair("drift", "ks_exact_values", "values/s", t, "fastml drift.ks_2samp", peer, goal=5.0)
    )

    m = 20_000 if ctx.quick else 100_000
    stream = np.concatenate([rng.normal(0, 1, m // 2), rng.normal(0.8, 1, m - m // 2)])
    ctx.progress(f"drift: ADWIN over {m:,} values")

    def fastml_adwin() -> None:
        drift.ADWIN(delta=0.002).update(stream)

    cands = {"fastml ADWIN": fastml_adwin}
    peer = None
    try:
        from river import drift as river_drift

        def river_adwin() -> None:
            det = river_drift.ADWIN(delta=0.002)
            for v in stream:
                det.update(v)

        cands["river ADWIN"] = river_adwin
        peer = "river ADWIN"
    except ImportError:
        pass
    t = compare(cands, repeat=3, work=m, unit="values")
    figures.append(_pair("drift", "adwin_values", "values/s", t, "fastml ADWIN", peer, goal=10.0))
    return figures


# ------------------------------------------------------------------ infer


def _xgb_model(quick: bool) -> tuple[Any, np.ndarray] | None:
    try:
        import xgboost as xgb
    except ImportError:
        return None
    rng = np.random.default_rng(2)
    n = 20_000 if quick else 50_000
    X = rng.standard_normal((n, 32)).astype(np.float32)
    X[rng.random(X.shape) < 0.05] = np.nan
    logit = X[:, 0] * 1.5 - np.nan_to_num(X[:, 1]) + np.sin(np.nan_to_num(X[:, 2]) * 3)
    y = (logit + rng.standard_normal(n) > 0).astype(np.float32)
    trees, depth = (100, 6) if quick else (500, 8)
    booster = xgb.train(
        {
            "objective": "binary:logistic",
            "max_depth": depth,
            "eta": 0.1,
            "nthread": 0,
            "tree_method": "hist",
        },
        xgb.DMatrix(X, label=y),
        num_boost_round=trees,
    )
    booster.set_param({"nthread": 1})
    return booster, X


def _lgb_default_model() -> tuple[Any, np.ndarray] | None:
    """LightGBM with its default tree parameters (num_leaves=31, no depth
    limit: the leaf-wise trees users train; issue #18), 100 trees, binary."""
    try:
        import lightgbm as lgb
    except ImportError:
        return None
    rng = np.random.default_rng(3)
    n = 20_000
    X = rng.standard_normal((n, 32))
    X[rng.random(X.shape) < 0.05] = np.nan
    logit = X[:, 0] * 1.5 - np.nan_to_num(X[:, 1]) + np.sin(np.nan_to_num(X[:, 2]) * 3)
    y = (logit + rng.standard_normal(n) > 0).astype(np.float64)
    booster = lgb.train(
        {"objective": "binary", "num_threads": 0, "verbose": -1}, lgb.Dataset(X, y), 100
    )
    return booster, X


def _forest_batch_figure(
    ctx: BenchContext,
    name: str,
    fastml_call: tuple[str, Any],
    peer_call: tuple[str, Any],
    goal: float,
    note: str,
) -> Figure:
    """A 1,024-row batch through fastml and a peer predictor, in one run."""
    t = compare(
        dict([fastml_call, peer_call]),
        repeat=5,
        number=3 if ctx.quick else 10,
        work=1024,
        unit="rows",
    )
    return _pair("infer", name, "rows/s", t, fastml_call[0], peer_call[0], goal=goal, note=note)


@register("infer")
def bench_infer(ctx: BenchContext) -> list[Figure]:
    from fastml import infer

    figures = []
    model = _xgb_model(ctx.quick)
    if model is not None:
        booster, X = model
        ctx.progress("infer: Forest vs XGBoost inplace_predict (1 thread)")
        forest = infer.Forest.from_xgboost(booster)
        batch = X[:1024]
        one = X[:1]
        with _OneThread():
            figures.append(
                _forest_batch_figure(
                    ctx,
                    "forest_rows_per_thread",
                    ("fastml Forest.predict", lambda: forest.predict(batch)),
                    ("xgboost inplace_predict", lambda: booster.inplace_predict(batch)),
                    goal=3.0,
                    note=f"{forest.num_trees} trees, batch 1024, 1 thread",
                )
            )
            t = compare(
                {
                    "fastml Forest.predict (1 row)": lambda: forest.predict(one),
                    "xgboost inplace_predict (1 row)": lambda: booster.inplace_predict(one),
                },
                repeat=7,
                number=50 if ctx.quick else 200,
            )
            figures.append(
                _pair(
                    "infer",
                    "forest_single_row_latency",
                    "us",
                    t,
                    "fastml Forest.predict (1 row)",
                    "xgboost inplace_predict (1 row)",
                    latency=True,
                )
            )

    lgb_model = _lgb_default_model()
    if lgb_model is not None:
        lbooster, LX = lgb_model
        ctx.progress("infer: Forest vs LightGBM predict, default-parameter model (1 thread)")
        lforest = infer.Forest.from_lightgbm(lbooster)
        lbatch = LX[:1024]
        with _OneThread():
            figures.append(
                _forest_batch_figure(
                    ctx,
                    "forest_lightgbm_defaults_rows_per_thread",
                    (
                        "fastml Forest.predict (lightgbm defaults)",
                        lambda: lforest.predict(lbatch),
                    ),
                    ("lightgbm predict", lambda: lbooster.predict(lbatch, num_threads=1)),
                    goal=8.0,
                    note=f"LightGBM defaults (num_leaves=31, no depth limit), 100 trees, "
                    f"engine {lforest._core.engine}, batch 1024 float64, 1 thread",
                )
            )

    ctx.progress("infer: Batcher submit throughput and added latency")
    n = 20_000 if ctx.quick else 100_000

    def noop(x: Any) -> Any:
        return x

    row = np.zeros((1, 4), dtype=np.float32)
    # The path requests take under load: submit() hands the batch to a worker
    # thread and the caller waits for the result. predict() on an idle batcher
    # runs the batch on the calling thread (it blocks anyway): its own figure.
    with infer.Batcher(noop, max_batch_size=256, max_delay_us=0) as b:

        def fastml_worker_loop() -> None:
            for _ in range(n // 10):
                b.submit(row).result()

        def fastml_predict_loop() -> None:
            for _ in range(n // 10):
                b.predict(row)

        def direct_loop() -> None:
            for _ in range(n // 10):
                noop(row)

        t = compare(
            {
                "fastml Batcher.submit().result()": fastml_worker_loop,
                "fastml Batcher.predict (inline)": fastml_predict_loop,
                "direct call": direct_loop,
            },
            repeat=5,
        )
    for key, name, note in (
        (
            "fastml Batcher.submit().result()",
            "batcher_added_latency",
            "worker hand-off: submit + worker runs a no-op + result, minus a direct call; "
            "max_delay_us=0, one Python caller; goal <= 10 us",
        ),
        (
            "fastml Batcher.predict (inline)",
            "batcher_added_latency_inline",
            "predict() on an idle batcher runs the batch on the calling thread; minus a direct call",
        ),
    ):
        per = (t[key].median - t["direct call"].median) / (n // 10)
        figures.append(
            Figure(
                "infer",
                name,
                "us",
                Measured(f"{key} minus direct call", per * 1e6, t[key].spread, 5),
                None,
                higher_is_better=False,
                note=note,
                absolute=True,
            )
        )

    from fastml.bench.baselines import AsyncQueueBatcher, drive_clients

    tasks, per_task = (50, 40) if ctx.quick else (100, 100)
    # The same clients against the asyncio batching pattern: with a no-op
    # handler (what batching itself costs per request; no asyncio batcher can
    # gain much there, see docs/batcher.md) and with a real model, an
    # XGBoost-trained Forest, which the pattern runs on the event loop and
    # fastml on a worker without the GIL (the goal of issue #15).
    made = _xgb_model(ctx.quick)
    cases: list[tuple[str, Any, Any, float | None, str]] = [
        ("batcher_async_requests", noop, None, None, "no-op handler")
    ]
    if made is not None:
        forest = infer.Forest.from_xgboost(made[0])
        row = np.ascontiguousarray(made[1][:1])
        cases.append(
            (
                "batcher_async_forest_requests",
                forest,
                row,
                # The goal is for the full run's 500-tree model; --quick's 100
                # shallow trees cost too little per row for batching off the
                # loop to pay.
                None if ctx.quick else 1.5,
                f"XGBoost-trained Forest ({forest.num_trees} trees), one row per request",
            )
        )
    for name, handler, x, goal, what in cases:
        loop = asyncio.new_event_loop()
        try:
            pattern_fn = handler.predict if isinstance(handler, infer.Forest) else handler

            async def make_pattern(fn: Any = pattern_fn) -> AsyncQueueBatcher:
                return AsyncQueueBatcher(fn, max_batch_size=64)

            pattern = loop.run_until_complete(make_pattern())
            with infer.Batcher(handler, max_batch_size=64, max_delay_us=0) as bb:
                t = compare(
                    {
                        "fastml Batcher.predict_async": lambda bb=bb, x=x, lp=loop: (
                            lp.run_until_complete(
                                drive_clients(bb.predict_async, tasks, per_task, x)
                            )
                        ),
                        "asyncio queue batching": lambda p=pattern, x=x, lp=loop: (
                            lp.run_until_complete(drive_clients(p.predict, tasks, per_task, x))
                        ),
                    },
                    repeat=5,
                    work=tasks * per_task,
                    unit="req",
                )
            pattern.close()
            loop.run_until_complete(asyncio.sleep(0))
        finally:
            loop.close()
        figures.append(
            _pair(
                "infer",
                name,
                "req/s",
                t,
                "fastml Batcher.predict_async",
                "asyncio queue batching",
                goal=goal,
                note=f"{tasks} tasks x {per_task} requests, {what}",
            )
        )
    return figures


# ------------------------------------------------------------------ ops


@register("ops")
def bench_ops(ctx: BenchContext) -> list[Figure]:
    try:
        import torch
    except ImportError:
        skip("torch is not installed")
    if ctx.device != "cuda" or not torch.cuda.is_available():
        skip("fastml.ops figures need a CUDA device (CPU tensors run torch's own kernels)")
    import triton.testing

    from fastml import ops

    figures = []
    dev = "cuda"
    shapes = [(4096, 4096)] if ctx.quick else [(4096, 4096), (8192, 8192)]
    for rows, cols in shapes:
        x = torch.randn(rows, cols, device=dev, dtype=torch.bfloat16)
        w = torch.ones(cols, device=dev, dtype=torch.bfloat16)

        def eager(x: Any = x, w: Any = w) -> Any:
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(x.dtype) * w

        ms_ours = triton.testing.do_bench(lambda x=x, w=w: ops.rms_norm(x, w))
        ms_eager = triton.testing.do_bench(eager)
        nbytes = 2 * x.numel() * x.element_size()
        figures.append(
            Figure(
                "ops",
                f"rms_norm_fwd_{rows}x{cols}_bf16",
                "GB/s",
                Measured("fastml ops.rms_norm", nbytes / ms_ours / 1e6, 0.0, 1),
                Measured("eager torch", nbytes / ms_eager / 1e6, 0.0, 1),
                note="triton.testing.do_bench median",
            ).against(
                ctx.limits,
                "gpu_copy",
                1e9,
                "x read once and y written once (weight reads ignored)",
            )
        )
    return figures
