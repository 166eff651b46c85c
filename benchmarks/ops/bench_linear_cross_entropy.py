"""linear_cross_entropy against eager ``F.cross_entropy(x @ W.T, t)`` and torch.compile.

Forward+backward median time and peak extra memory (beyond the inputs) at the
issue's shape BT=32768, H=4096, V=128256 in bf16 (an 8B-class LM head).

    python benchmarks/ops/bench_linear_cross_entropy.py [--bt 32768 --h 4096 --v 128256] [--json PATH]
    python benchmarks/ops/bench_linear_cross_entropy.py --smoke   # tiny, CPU ok
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_bench import (
    cuda_ms,
    device_info,
    liger_functional,
    peak_extra_bytes,
    timing,
    write_json,
)

from fastml import ops
from fastml.bench.harness import table


def eager(x, w, t):
    return F.cross_entropy((x @ w.T).float(), t)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--bt", type=int, default=32768)
    ap.add_argument("--h", type=int, default=4096)
    ap.add_argument("--v", type=int, default=128256)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        args.bt, args.h, args.v = 64, 32, 100
    elif not torch.cuda.is_available():
        print("bench_linear_cross_entropy needs a CUDA device (use --smoke on CPU)")
        return {}
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16
    torch.manual_seed(0)
    x = torch.randn(args.bt, args.h, device=dev, dtype=dtype).requires_grad_()
    w = (torch.randn(args.v, args.h, device=dev) * 0.02).to(dtype).requires_grad_()
    t = torch.randint(0, args.v, (args.bt,), device=dev)
    t[::10] = -100

    def run(fn):
        def go():
            x.grad = w.grad = None
            fn(x, w, t).backward()

        return go

    candidates = {"fastml": lambda a, b, c: ops.linear_cross_entropy(a, b, c), "torch": eager}
    if not args.no_compile and not args.smoke:
        candidates["torch.compile"] = torch.compile(eager, fullgraph=True)
    lf = liger_functional()
    if lf is not None:  # optional peer: LigerFusedLinearCrossEntropy with its defaults
        candidates["liger"] = lambda a, b, c: lf.liger_fused_linear_cross_entropy(a, b, c)
    info = device_info()
    print(
        f"device: {info.get('gpu', dev)}  driver {info.get('driver')}  torch {info['torch']}  "
        f"triton {info['triton']}"
    )
    print(f"linear_cross_entropy BT={args.bt} H={args.h} V={args.v} bf16, fwd+bwd\n")
    results, timings = [], {}
    inputs_bytes = (x.numel() + w.numel()) * 2
    for name, fn in candidates.items():
        rec: dict[str, Any] = {"candidate": name}
        try:
            rec["peak_extra_bytes"] = peak_extra_bytes(run(fn))
            rec["ms"] = cuda_ms(run(fn), args.smoke)
            timings[name] = timing(name, rec["ms"], None)
        except torch.cuda.OutOfMemoryError as exc:
            rec["error"] = f"out of memory: {exc}"[:300]
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        x.grad = w.grad = None
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results.append(rec)
    if timings and not args.smoke:
        print(table(timings, baseline="torch"))
    for r in results:
        if "error" in r:
            print(f"{r['candidate']:<16} {r['error']}")
        else:
            print(
                f"{r['candidate']:<16} peak extra memory {r['peak_extra_bytes'] / 2**30:.2f} GiB "
                f"(inputs {inputs_bytes / 2**30:.2f} GiB)"
            )
    payload = {
        "device": info,
        "shape": {"bt": args.bt, "h": args.h, "v": args.v, "dtype": "bf16"},
        "results": results,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
