"""The ``fastml`` command line: ``fastml info``, ``fastml demo``, ``fastml bench``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import fastml
from fastml._system import system_info


def _gib(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


def _print_info(info: dict[str, Any]) -> None:
    b = info["fastml"]
    rows = [
        ("fastml", b["version"]),
        ("compiler", b["compiler"]),
        (
            "cuda compiled in",
            f"{b['cuda']}" + (f" (runtime {b['cuda_version']})" if b["cuda"] else ""),
        ),
        ("simd", b["simd"]),
        ("native threads", str(b["num_threads"])),
        ("python", f"{info['python']} on {info['platform']}"),
        ("cpu", info["cpu"]["model"]),
        (
            "cores",
            f"{info['cpu']['logical_cores']} logical, {info['cpu']['physical_cores']} physical, "
            f"{info['cpu']['usable_cores']} usable",
        ),
        ("memory", _gib(info["memory_bytes"])),
    ]
    if info["gpus"]:
        for g in info["gpus"]:
            cc = ".".join(map(str, g["compute_capability"]))
            rows.append(
                (
                    f"gpu {g['index']}",
                    f"{g['name']}, {_gib(g['total_memory'])}, {g['sm_count']} SMs, sm_{cc.replace('.', '')}, "
                    f"driver {g['driver']} (via {g['source']})",
                )
            )
    else:
        rows.append(("gpu", "none"))
    for name, ver in info["packages"].items():
        rows.append((name, ver or "not installed"))
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _cmd_info(args: argparse.Namespace) -> int:
    info = system_info()
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        _print_info(info)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from fastml.demo.pipeline import format_summary, run_demo

    try:
        result = run_demo(
            rows=args.rows,
            out=args.out,
            device=args.device,
            seed=args.seed,
            serve_requests=args.requests,
            progress=not args.no_progress,
        )
    except (ValueError, RuntimeError) as e:
        print(f"fastml demo: {e}", file=sys.stderr)
        return 2
    print(format_summary(result))
    return 0


def _progress_printer() -> Any:
    def emit(msg: str) -> None:
        print(f"  .. {msg}", file=sys.stderr, flush=True)

    return emit


def _cmd_bench(args: argparse.Namespace) -> int:
    from fastml.bench import suite

    only = None if args.only is None else [c.strip() for c in args.only.split(",") if c.strip()]
    device = args.device
    if device == "auto":
        device = "cuda" if fastml.cuda_available() or _torch_cuda() else "cpu"
    try:
        doc = suite.run_suite(only, quick=args.quick, device=device, progress=_progress_printer())
    except ValueError as e:
        print(f"fastml bench: {e}", file=sys.stderr)
        return 2
    print(suite.format_run(doc))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(doc, f, indent=2)
        print(f"wrote {args.out}")
    if args.mlflow:
        try:
            run_id = suite.log_mlflow(doc)
        except RuntimeError as e:
            print(f"fastml bench: {e}", file=sys.stderr)
            return 1
        print(f"logged to MLflow run {run_id}")
    return 0


def _cmd_bench_compare(args: argparse.Namespace) -> int:
    from pathlib import Path

    from fastml.bench import suite

    try:
        docs = [suite.load(p) for p in args.files]
    except (OSError, ValueError) as e:
        print(f"fastml bench compare: {e}", file=sys.stderr)
        return 2
    names = []
    for p, d in zip(args.files, docs, strict=True):
        gpu = d["hardware"]["gpus"][0]["name"] if d["hardware"]["gpus"] else ""
        names.append(f"{Path(p).stem}" + (f" ({gpu})" if gpu else ""))
    text, rows = suite.compare(docs, names)
    print(text)
    if args.plot:
        suite.plot_compare(rows, names, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _torch_cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastml", description="fastml command line")
    parser.add_argument("--version", action="version", version=f"fastml {fastml.__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="print build, CPU, memory, GPU and package information")
    p_info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p_info.set_defaults(func=_cmd_info)

    p_demo = sub.add_parser(
        "demo", help="run the whole loop (data -> train -> serve -> drift) on generated fraud data"
    )
    p_demo.add_argument("--rows", type=int, default=200_000, help="training rows (default 200,000)")
    p_demo.add_argument("--out", default=None, help="work directory (default: a new folder here)")
    p_demo.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p_demo.add_argument("--seed", type=int, default=0)
    p_demo.add_argument(
        "--requests", type=int, default=None, help="served requests (default rows/10)"
    )
    p_demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    p_demo.set_defaults(func=_cmd_demo)

    p_bench = sub.add_parser(
        "bench", help="measure every component against its peer on this machine"
    )
    p_bench.add_argument("--quick", action="store_true", help="a short run (about a minute)")
    p_bench.add_argument(
        "--only",
        default=None,
        help="comma-separated components: data,drift,infer,ops (default: all)",
    )
    p_bench.add_argument("--out", default=None, help="write the run's JSON here")
    p_bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p_bench.add_argument("--mlflow", action="store_true", help="log the run to MLflow")
    p_bench.set_defaults(func=_cmd_bench)
    bench_sub = p_bench.add_subparsers(dest="bench_command")
    p_cmp = bench_sub.add_parser("compare", help="compare bench JSON files side by side")
    p_cmp.add_argument("files", nargs="+", help="bench JSON files (the first is the baseline)")
    p_cmp.add_argument("--plot", default=None, help="draw the ratios as a bar chart (PNG)")
    p_cmp.set_defaults(func=_cmd_bench_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fastml`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
