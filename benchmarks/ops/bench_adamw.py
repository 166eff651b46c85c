"""fastml.ops.AdamW against torch.optim.AdamW (fused=True, foreach) on one optimiser step.

The parameter set of a Llama-style 8B slice: eight large fp32 matrices and 67
small vectors, ~250 M parameters in 75 tensors, gradients set once (the step
does not change them). Median step time (``triton.testing.do_bench``), the
share of the device copy bandwidth measured in the same run (an fp32 AdamW
step reads param, grad and both moments and writes param and both moments:
28 bytes per parameter), and the agreement with torch's fused step after
three steps from the same state.

    python benchmarks/ops/bench_adamw.py [--json PATH]
    python benchmarks/ops/bench_adamw.py --smoke      # tiny, CPU ok (TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _gpu_bench import copy_bandwidth, cuda_ms, device_info, timing, write_json

from fastml import ops
from fastml.bench.harness import table

# (rows, cols) of the large matrices; 67 vectors of 4096 come on top.
LARGE = [(4096, 14336)] * 3 + [(4096, 4096)] * 4 + [(16032, 4096)]
SMALL = [(4096,)] * 67


def _params(shapes: list[tuple[int, ...]], device: str, seed: int) -> list[torch.Tensor]:
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    for s in shapes:
        p = torch.randn(s, device=device, generator=gen).mul_(0.02).requires_grad_()
        p.grad = torch.randn(s, device=device, generator=gen).mul_(1e-3)
        out.append(p)
    return out


def _clone(params: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for p in params:
        q = p.detach().clone().requires_grad_()
        q.grad = p.grad.clone()
        out.append(q)
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    if args.smoke:
        shapes: list[tuple[int, ...]] = [(64, 48), (3000,), (1,), (1025,)] * 3
    elif not torch.cuda.is_available():
        print("bench_adamw needs a CUDA device (use --smoke on CPU)")
        return {}
    else:
        shapes = LARGE + SMALL
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    base = _params(shapes, dev, seed=0)
    n_params = sum(p.numel() for p in base)
    nbytes = 28.0 * n_params
    kw = dict(lr=1e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    candidates: dict[str, tuple[type, dict]] = {
        "fastml AdamW": (ops.AdamW, {}),
        "torch AdamW fused": (torch.optim.AdamW, {"fused": True}),
        "torch AdamW foreach": (torch.optim.AdamW, {"foreach": True}),
    }
    if dev == "cpu":
        candidates.pop("torch AdamW fused")  # torch's fused step is CUDA-only in older torch
    info = device_info()
    bw = copy_bandwidth(args.smoke)
    print(
        f"device: {info.get('gpu', dev)}  torch {info['torch']}  triton {info['triton']}\n"
        f"AdamW step, {len(shapes)} fp32 tensors, {n_params / 1e6:.0f} M parameters "
        f"({nbytes / 1e9:.2f} GB moved per step); device copy {bw / 1e9:.0f} GB/s\n"
    )
    results, timings, finals = [], {}, {}
    for name, (cls, extra) in candidates.items():
        rec: dict[str, Any] = {"candidate": name}
        try:
            params = _clone(base)
            opt = cls(params, **kw, **extra)
            for _ in range(3):  # same three steps for every candidate: compared below
                opt.step()
            finals[name] = [p.detach().clone() for p in params[:3]] + [params[-1].detach().clone()]
            rec["ms"] = cuda_ms(opt.step, args.smoke)
            if not args.smoke:
                rec["copy_share"] = nbytes / (rec["ms"][1] * 1e-3) / bw
            timings[name] = timing(name, rec["ms"], nbytes)
            del opt, params
        except Exception as exc:
            rec["error"] = f"{type(exc).__name__}: {exc}"[:300]
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        results.append(rec)
    ref = "torch AdamW fused" if "torch AdamW fused" in finals else "torch AdamW foreach"
    if ref in finals and "fastml AdamW" in finals:
        diff = max(
            float((a - b).abs().max())
            for a, b in zip(finals["fastml AdamW"], finals[ref], strict=True)
        )
        print(f"max |fastml - {ref}| after 3 steps: {diff:.3g}")
        results.append({"candidate": "agreement", "reference": ref, "max_abs_diff": diff})
    if timings and not args.smoke:
        print(table(timings, baseline="torch AdamW fused"))
        for r in results:
            if "copy_share" in r:
                print(f"{r['candidate']:<22} {r['copy_share']:.0%} of copy bandwidth")
    for r in results:
        if "error" in r:
            print(f"{r['candidate']:<22} {r['error']}")
    payload = {
        "device": info,
        "copy_bytes_per_s": bw,
        "parameters": n_params,
        "tensors": len(shapes),
        "results": results,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
