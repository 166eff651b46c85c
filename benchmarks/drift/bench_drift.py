"""fastml.drift against what a user would otherwise pick, in one run.

1. Numeric ingest (histogram + moments + missing/non-finite counts, one thread)
   vs ``numpy.histogram`` alone, float32 columns, column by column, same edges.
2. Exact two-sample KS vs ``scipy.stats.ks_2samp`` at 1M vs 1M.
   fastml uses the pool's default thread count here (the other sections one).
3. ADWIN over a stream vs River's ``drift.ADWIN`` update loop.

    python benchmarks/drift/bench_drift.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import fastml
from fastml import drift
from fastml.bench.harness import compare, ratio, table


def bench_ingest(rows: int, cols: int, repeat: int) -> dict:
    """Profile.update in each mode (the public calls Monitor.update runs) against
    numpy.histogram on the same edges, one thread, a 2-D float32 batch."""
    rng = np.random.default_rng(0)
    X = np.stack([rng.normal(j % 4, 1.0 + j % 3, size=rows) for j in range(cols)], axis=1).astype(
        np.float32
    )
    names = [f"f{j}" for j in range(cols)]
    frame = {k: X[:, j] for j, k in enumerate(names)}
    head = {k: v[:100_000] for k, v in frame.items()}
    profiles = {
        mode: drift.Profile.from_data(head, mode=mode, bins=20)
        for mode in ("exact", "histogram", "sketch")
    }
    edges = {k: profiles["exact"].summary(k)["edges"] for k in names}

    def numpy_histogram():
        for j, k in enumerate(names):
            np.histogram(X[:, j], bins=edges[k])

    cands = {"numpy.histogram (same edges)": numpy_histogram}
    for mode, p in profiles.items():
        cands[f'Profile(mode="{mode}").update'] = lambda p=p: p.empty().update(frame)
    t = compare(cands, repeat=repeat, work=rows * cols, unit="values")
    print(
        table(
            t,
            baseline="numpy.histogram (same edges)",
            title=f"\n== Profile.update, {cols} x {rows:,} float32 columns of one array, 1 thread",
        )
    )
    return {k: v.to_dict() for k, v in t.items()} | {
        f"ratio_{mode}": ratio(t, f'Profile(mode="{mode}").update', "numpy.histogram (same edges)")
        for mode in profiles
    }


def bench_ks(n: int, repeat: int, threads: int) -> dict:
    import scipy.stats as ss

    # KS runs on the pool's default thread count (the two sorts and the
    # p-value sum use it); the other sections are pinned to one thread.
    fastml.set_num_threads(threads)

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=n), rng.normal(0.01, size=n)
    t = compare(
        {
            "fastml drift.ks_2samp": lambda: drift.ks_2samp(a, b),
            "scipy.stats.ks_2samp": lambda: ss.ks_2samp(a, b),
        },
        repeat=repeat,
        work=2 * n,
        unit="values",
    )
    fastml.set_num_threads(1)
    title = f"\n== exact KS, {n:,} vs {n:,}, fastml on {threads} threads"
    print(table(t, baseline="scipy.stats.ks_2samp", title=title))
    return {k: v.to_dict() for k, v in t.items()} | {
        "ratio": ratio(t, "fastml drift.ks_2samp", "scipy.stats.ks_2samp")
    }


def bench_adwin(n: int, repeat: int) -> dict:
    from river import drift as rdrift

    rng = np.random.default_rng(2)
    values = np.concatenate([rng.normal(0, 1, n // 2), rng.normal(0.5, 1, n - n // 2)])
    as_list = values.tolist()

    def river_adwin():
        det = rdrift.ADWIN()
        for v in as_list:
            det.update(v)

    t = compare(
        {
            "fastml drift.ADWIN.update(array)": lambda: drift.ADWIN().update(values),
            "river ADWIN.update loop": river_adwin,
        },
        repeat=repeat,
        work=n,
        unit="values",
    )
    print(table(t, baseline="river ADWIN.update loop", title=f"\n== ADWIN, {n:,} values"))
    return {k: v.to_dict() for k, v in t.items()} | {
        "ratio": ratio(t, "fastml drift.ADWIN.update(array)", "river ADWIN.update loop")
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smaller sizes (a smoke run)")
    parser.add_argument("--json", metavar="PATH", help="write the timings as JSON")
    args = parser.parse_args()
    threads = fastml.get_num_threads()
    fastml.set_num_threads(1)
    try:
        rows, ks_n, adwin_n, repeat = (
            (200_000, 100_000, 20_000, 3) if args.quick else (2_000_000, 1_000_000, 200_000, 7)
        )
        results = {
            "ingest": bench_ingest(rows, 16, repeat),
            "ks": bench_ks(ks_n, repeat, threads),
            # A fastml call is ~3 ms here: 2 * repeat + 1 samples, so one
            # preemption of one call cannot move the median (River's loop
            # costs ~40 ms per sample, so this stays under a second).
            "adwin": bench_adwin(adwin_n, 2 * repeat + 1),
            "build": fastml.build_info(),
        }
    finally:
        fastml.set_num_threads(threads)
    print(
        f"\nratios: ingest exact {results['ingest']['ratio_exact']:.2f}x numpy.histogram (goal 3x), "
        f"histogram {results['ingest']['ratio_histogram']:.2f}x (goal 10x), "
        f"sketch {results['ingest']['ratio_sketch']:.2f}x; "
        f"KS {results['ks']['ratio']:.2f}x SciPy (goal 5x), ADWIN {results['adwin']['ratio']:.2f}x River (goal 10x)"
    )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=2, default=str)


if __name__ == "__main__":
    main()
