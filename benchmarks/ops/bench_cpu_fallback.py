"""fastml.ops on CPU tensors (the torch fallbacks) against the eager torch ops they replace.

On CPU fastml.ops runs torch implementations with the kernels' semantics (fp32
accumulation) behind registered custom ops; this measures what that costs a
CPU user: dispatch overhead on small tensors, and the extra fp32 passes on
larger ones. It says nothing about the GPU kernels (see bench_ops.py).

    python benchmarks/ops/bench_cpu_fallback.py [--json PATH]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from fastml import ops
from fastml.bench.harness import compare, ratio, table

SHAPES = [(8, 64), (4096, 1024)]


def _pairs(x, r, w, b, t):
    """(fastml, eager torch) callables per op, bound to these inputs."""
    n = x.shape[-1]
    return {
        "rms_norm": (lambda: ops.rms_norm(x, w), lambda: F.rms_norm(x, (n,), w, 1e-6)),
        "layer_norm": (lambda: ops.layer_norm(x, w, b), lambda: F.layer_norm(x, (n,), w, b)),
        "add_rms_norm": (
            lambda: ops.add_rms_norm(x, r, w),
            lambda: F.rms_norm(x + r, (n,), w, 1e-6),
        ),
        "softmax": (lambda: ops.softmax(x), lambda: torch.softmax(x, -1)),
        "cross_entropy": (lambda: ops.cross_entropy(x, t), lambda: F.cross_entropy(x, t)),
        "swiglu": (lambda: ops.swiglu(x, r), lambda: F.silu(x) * r),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = {}
    for shape in SHAPES:
        x, r = torch.randn(shape), torch.randn(shape)
        w, b = torch.randn(shape[1]), torch.randn(shape[1])
        t = torch.randint(0, shape[1], (shape[0],))
        number = 200 if shape[0] * shape[1] < 10_000 else 3
        pairs = _pairs(x, r, w, b, t)
        for name, (ours, theirs) in pairs.items():
            tm = compare(
                {"fastml (torch fallback)": ours, "eager torch": theirs},
                repeat=args.repeat,
                number=number,
                work=shape[0] * shape[1],
                unit="elem",
            )
            print(table(tm, baseline="eager torch", title=f"{name} {shape} fp32 forward, CPU"))
            out[f"{name} {shape}"] = {
                "timings": {k: v.to_dict() for k, v in tm.items()},
                "fastml_over_eager": ratio(tm, "fastml (torch fallback)", "eager torch"),
            }
            print()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
