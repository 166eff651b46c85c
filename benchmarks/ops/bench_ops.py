"""fastml.ops against eager torch and torch.compile on a CUDA device.

For each op and shape: forward, backward and forward+backward medians
(``triton.testing.do_bench``), achieved GB/s and its share of the
device-to-device copy bandwidth measured in the same run, and the peak extra
memory of forward+backward. The summary gives the geometric-mean speedup over
``torch.compile`` (and Liger Kernel, when installed: ``pip install liger-kernel``,
an optional peer measured through its functional API with its defaults) and the
share of copy bandwidth, and lists the op/shapes where fastml's forward+backward
is slower than both torch.compile and Liger (those of them measured there).

    python benchmarks/ops/bench_ops.py [--dtype bf16] [--ops rms_norm,softmax] [--json PATH]
    python benchmarks/ops/bench_ops.py --quick     # two shapes per op (the GPU check's --quick)
    python benchmarks/ops/bench_ops.py --smoke     # tiny shapes, no timing: checks the script (CPU ok)

Backward alone is timed by repeating ``autograd.grad(..., retain_graph=True)`` on
one graph. A compiled backward with donated buffers refuses that, so the
torch.compile candidate is compiled with ``donated_buffer=False``: the same
kernels; without donation its backward keeps its saved activations, which only
changes its peak memory (reported per candidate).
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_bench import (
    copy_bandwidth,
    cuda_ms,
    device_info,
    liger_functional,
    peak_extra_bytes,
    timing,
    write_json,
)

from fastml import ops
from fastml.bench.harness import table


@dataclass
class OpCase:
    """One benchmarked op: how to build inputs, the fastml call and the torch call."""

    name: str
    make: Callable[[tuple[int, int], torch.dtype, str], list[torch.Tensor]]
    fastml: Callable[..., Any]
    torch_fn: Callable[..., Any]
    bytes_fwd: float  # elements of (rows x cols) moved by an ideal forward, in units of M*N
    bytes_bwd: float


def _x(shape, dtype, dev, grad=True):
    return torch.randn(shape, device=dev, dtype=dtype).requires_grad_(grad)


def _w(n, dtype, dev):
    return torch.randn(n, device=dev, dtype=dtype).requires_grad_()


def _first(r):
    return r[0] if isinstance(r, tuple) else r


CASES = [
    OpCase(
        "rms_norm",
        lambda s, d, dev: [_x(s, d, dev), _w(s[1], d, dev)],
        lambda x, w: ops.rms_norm(x, w),
        lambda x, w: F.rms_norm(x, (x.shape[-1],), w, 1e-6),
        2,
        3,
    ),
    OpCase(
        "layer_norm",
        lambda s, d, dev: [_x(s, d, dev), _w(s[1], d, dev), _w(s[1], d, dev)],
        lambda x, w, b: ops.layer_norm(x, w, b),
        lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b),
        2,
        3,
    ),
    OpCase(
        "add_rms_norm",
        lambda s, d, dev: [_x(s, d, dev), _x(s, d, dev), _w(s[1], d, dev)],
        lambda x, r, w: ops.add_rms_norm(x, r, w),
        lambda x, r, w: (F.rms_norm(x + r, (x.shape[-1],), w, 1e-6), x + r),
        4,
        4,
    ),
    OpCase(
        "softmax",
        lambda s, d, dev: [_x(s, d, dev)],
        ops.softmax,
        lambda x: torch.softmax(x, -1),
        2,
        3,
    ),
    OpCase(
        "log_softmax",
        lambda s, d, dev: [_x(s, d, dev)],
        ops.log_softmax,
        lambda x: torch.log_softmax(x, -1),
        2,
        3,
    ),
    OpCase(
        "cross_entropy",
        lambda s, d, dev: [_x(s, d, dev), torch.randint(0, s[1], (s[0],), device=dev)],
        lambda x, t: ops.cross_entropy(x, t),
        lambda x, t: F.cross_entropy(x, t),
        1,
        2,
    ),
    OpCase(
        "swiglu",
        lambda s, d, dev: [_x(s, d, dev), _x(s, d, dev)],
        ops.swiglu,
        lambda g, u: F.silu(g) * u,
        3,
        5,
    ),
    OpCase(
        "geglu",
        lambda s, d, dev: [_x(s, d, dev), _x(s, d, dev)],
        ops.geglu,
        lambda g, u: F.gelu(g) * u,
        3,
        5,
    ),
]

# (64, 131072) and (16, 262144): fewer rows than SMs (issue #17 goal 2).
SHAPES = [(16384, 4096), (4096, 16384), (64, 131072), (16, 262144)]
QUICK_SHAPES = [(16384, 4096), (64, 131072), (16, 262144)]


def liger_peers() -> dict[str, Callable[..., Any]]:
    """Liger Kernel's implementation of each op it has, with its defaults (its
    RMSNorm writes dX into dY in the backward; its GEGLU uses GELU's tanh
    approximation where the other candidates use the exact GELU); empty when
    Liger is not installed."""
    lf = liger_functional()
    if lf is None:
        return {}
    peers: dict[str, Callable[..., Any]] = {
        "rms_norm": lambda x, w: lf.liger_rms_norm(x, w, 1e-6),
        "layer_norm": lambda x, w, b: lf.liger_layer_norm(x, w, b, 1e-5),
        "cross_entropy": lambda x, t: lf.liger_cross_entropy(x, t),
        "swiglu": lf.liger_swiglu,
        "geglu": lf.liger_geglu,
    }
    if hasattr(lf, "liger_softmax"):
        peers["softmax"] = lf.liger_softmax
    if hasattr(lf, "liger_fused_add_rms_norm"):
        peers["add_rms_norm"] = lambda x, r, w: lf.liger_fused_add_rms_norm(x, r, w, 1e-6)
    return peers


SMOKE_SHAPES = [(4, 64)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def _outputs(r):
    return list(r) if isinstance(r, (tuple, list)) else [r]


def bench_case(
    case: OpCase, shape, dtype, dev, smoke: bool, use_compile: bool, liger: dict | None = None
) -> list[dict]:
    inputs = case.make(shape, dtype, dev)
    grads_of = [t for t in inputs if t.requires_grad]
    elem = torch.finfo(dtype).bits // 8
    mn = shape[0] * shape[1]
    candidates: dict[str, Callable[..., Any]] = {"fastml": case.fastml, "torch": case.torch_fn}
    if use_compile:
        # Smoke runs on CPU check the candidate's code path with a fast backend.
        backend = "aot_eager" if smoke else "inductor"
        candidates["torch.compile"] = torch.compile(case.torch_fn, fullgraph=True, backend=backend)
    if liger and case.name in liger:
        candidates["liger"] = liger[case.name]
    rows = []
    for cand, fn in candidates.items():
        rec: dict[str, Any] = {"op": case.name, "shape": list(shape), "candidate": cand}
        try:
            outs = _outputs(fn(*inputs))
            douts = [torch.randn_like(o) for o in outs]

            def fwd(fn=fn):
                with torch.no_grad():
                    return fn(*inputs)

            def bwd(outs=outs, douts=douts):
                torch.autograd.grad(outs, grads_of, douts, retain_graph=True)

            def both(fn=fn):
                o = _outputs(fn(*inputs))
                torch.autograd.grad(o, grads_of, [torch.ones_like(a) for a in o])

            for mode, f, factor in (
                ("fwd", fwd, case.bytes_fwd),
                ("bwd", bwd, case.bytes_bwd),
                ("fwd+bwd", both, case.bytes_fwd + case.bytes_bwd),
            ):
                rec[mode] = {"ms": cuda_ms(f, smoke), "bytes": factor * mn * elem}
            rec["peak_extra_bytes"] = peak_extra_bytes(both)
        except Exception as exc:  # one failing candidate (e.g. out of memory) keeps the rest
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        rows.append(rec)
        torch.cuda.empty_cache() if torch.cuda.is_available() else None
    return rows


def _no_donated_buffers() -> None:
    """See the module docstring: backward alone repeats on one graph."""
    try:
        import torch._functorch.config as functorch_config
    except ImportError:
        return
    if hasattr(functorch_config, "donated_buffer"):
        functorch_config.donated_buffer = False


def summarise(results: list[dict], copy_bps: float) -> dict[str, Any]:
    """Geometric-mean speedups of fastml and its share of the copy bandwidth."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for r in results:
        by_key.setdefault((r["op"], tuple(r["shape"])), {})[r["candidate"]] = r
    out: dict[str, Any] = {}
    for peer in ("torch", "torch.compile", "liger"):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            logs = [
                math.log(c[peer][mode]["ms"][1] / c["fastml"][mode]["ms"][1])
                for c in by_key.values()
                if peer in c
                and mode in c[peer]
                and mode in c.get("fastml", {})
                and c["fastml"][mode]["ms"][1] > 0
            ]
            if logs:
                out[f"geomean_speedup_vs_{peer}_{mode}"] = math.exp(sum(logs) / len(logs))
    for mode in ("fwd", "bwd"):
        shares = [
            c["fastml"][mode]["bytes"] / (c["fastml"][mode]["ms"][1] * 1e-3) / copy_bps
            for (_op, shape), c in by_key.items()
            if "fastml" in c
            and mode in c["fastml"]
            and shape[1] >= 4096
            and c["fastml"][mode]["ms"][1] > 0
        ]
        if shares:
            out[f"min_copy_share_{mode}_rows_ge_4k"] = min(shares)
            out[f"geomean_copy_share_{mode}_rows_ge_4k"] = math.exp(
                sum(math.log(s) for s in shares) / len(shares)
            )
    # Goal 3's "no op/shape slower than both" (torch.compile and Liger Kernel,
    # those of them measured at the op/shape): forward+backward medians.
    behind = []
    for (op, shape), c in by_key.items():
        mine = c.get("fastml", {}).get("fwd+bwd")
        peers = [
            c[k]["fwd+bwd"]["ms"][1]
            for k in ("torch.compile", "liger")
            if k in c and "fwd+bwd" in c[k]
        ]
        if mine and peers and mine["ms"][1] > max(peers):
            behind.append(f"{op} {shape[0]}x{shape[1]}")
    out["slower_than_compile_and_liger_fwd+bwd"] = behind
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument(
        "--ops", default="", help="comma-separated subset of: " + ",".join(c.name for c in CASES)
    )
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile candidate")
    ap.add_argument(
        "--no-liger", action="store_true", help="skip Liger Kernel even when it is installed"
    )
    ap.add_argument("--quick", action="store_true", help="two shapes per op")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, one call each, no timing")
    ap.add_argument("--json", default=None, help="write results as JSON here")
    args = ap.parse_args(argv)
    smoke = args.smoke
    if not smoke and not torch.cuda.is_available():
        print("bench_ops needs a CUDA device (use --smoke to check the script on CPU)")
        return {}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = DTYPES[args.dtype]
    if dev == "cpu" and dtype == torch.bfloat16:
        dtype = torch.float32  # smoke on CPU: bf16 is not what is checked here
    _no_donated_buffers()
    wanted = {s for s in args.ops.split(",") if s}
    cases = [c for c in CASES if not wanted or c.name in wanted]
    copy_bps = copy_bandwidth(smoke)
    liger = {} if args.no_liger else liger_peers()
    info = device_info()
    print(
        f"device: {info.get('gpu', dev)}  driver {info.get('driver')}  torch {info['torch']}  "
        f"triton {info['triton']}  dtype {args.dtype}"
    )
    print(f"device-to-device copy: {copy_bps / 1e9:.1f} GB/s (read + write)")
    print(f"Liger Kernel: {', '.join(sorted(liger)) if liger else 'not installed'}\n")
    results = []
    for case in cases:
        for shape in SMOKE_SHAPES if smoke else QUICK_SHAPES if args.quick else SHAPES:
            rows = bench_case(case, shape, dtype, dev, smoke, not args.no_compile, liger)
            results.extend(rows)
            for mode in ("fwd", "bwd", "fwd+bwd"):
                timings = {
                    r["candidate"]: timing(r["candidate"], r[mode]["ms"], r[mode]["bytes"])
                    for r in rows
                    if mode in r
                }
                if timings and not smoke:
                    base = "torch.compile" if "torch.compile" in timings else "torch"
                    print(table(timings, baseline=base, title=f"{case.name} {shape} {mode}"))
                    f = timings.get("fastml")
                    if f is not None and f.rate:
                        print(f"  fastml: {100 * f.rate / copy_bps:.0f}% of copy bandwidth")
            for r in rows:
                if "error" in r:
                    print(f"  {r['candidate']}: {r['error']}")
                elif smoke:
                    print(f"{case.name} {shape} {r['candidate']}: ok")
                else:
                    print(
                        f"  {r['candidate']}: peak extra memory {r['peak_extra_bytes'] / 2**20:.1f} MiB"
                    )
            print()
    summary = summarise(results, copy_bps) if not smoke else {}
    for k, v in summary.items():
        print(f"{k:<48} {v:.3f}" if isinstance(v, float) else f"{k:<48} {v}")
    errors = [f"{r['op']} {r['shape']} {r['candidate']}" for r in results if "error" in r]
    tuned = {" ".join(map(str, k)): list(v) for k, v in ops.tuned_configs().items()}
    for k, v in tuned.items():  # (rows per tile, warps, programs per SM) per shape class
        print(f"tuned {k}: {v}")
    payload = {
        "tuned_configs": tuned,
        "device": info,
        "dtype": args.dtype,
        "copy_bytes_per_s": copy_bps,
        "results": results,
        "summary": summary,
        "errors": errors,
    }
    if errors:
        print(f"{len(errors)} candidate(s) failed: {', '.join(errors)}")
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
