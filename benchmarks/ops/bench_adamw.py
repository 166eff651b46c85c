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


def _graphed(opt: torch.optim.Optimizer) -> Any:
    """``opt.step`` captured in a CUDA graph (after warm-up steps on a side stream)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            opt.step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        opt.step()
    return graph.replay


def bf16_drift(dev: str, smoke: bool) -> dict[str, Any]:
    """How far bf16 parameters drift from a float64 run of the same AdamW steps.

    16 M parameters (4 M on CPU smoke) at typical scale (N(0, 0.02)), amsgrad, lr
    1e-4, five steps of fresh N(0, 1e-3) gradients: max and mean |p - p_float64|
    for torch's fused step, fastml rounding to nearest and fastml with stochastic
    rounding (moments in bf16, as ``zeros_like(param)`` makes them), and fastml
    with float32 moments (``state_dtype``) and stochastic rounding,
    and the mean signed error (rounding to nearest drops updates smaller than
    half an ulp: a bias).
    """
    n = (1 << 16) if smoke else (1 << 24)
    gen = torch.Generator(device=dev).manual_seed(7)
    start = torch.randn(n, device=dev, generator=gen).mul_(0.02)
    grads = [torch.randn(n, device=dev, generator=gen).mul_(1e-3) for _ in range(5)]
    kw = dict(lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, amsgrad=True)

    def run(make, dtype):
        p = start.to(dtype).clone().requires_grad_()
        opt = make([p])
        for g in grads:
            p.grad = g.to(dtype)
            opt.step()
        return p.detach().double()

    ref = run(lambda ps: torch.optim.AdamW(ps, **kw), torch.float64)
    out: dict[str, Any] = {}
    makers = {
        "torch AdamW fused (bf16 moments)": lambda ps: torch.optim.AdamW(ps, fused=True, **kw),
        "fastml AdamW (bf16 moments)": lambda ps: ops.AdamW(ps, **kw),
        "fastml AdamW, stochastic rounding": lambda ps: ops.AdamW(
            ps, stochastic_rounding=True, seed=1, **kw
        ),
        "fastml AdamW, fp32 moments + SR": lambda ps: ops.AdamW(
            ps, stochastic_rounding=True, seed=1, state_dtype=torch.float32, **kw
        ),
    }
    if dev == "cpu":
        makers.pop("torch AdamW fused (bf16 moments)")
    for name, make in makers.items():
        diff = (run(make, torch.bfloat16) - ref).abs()
        out[name] = {"max_abs": float(diff.max()), "mean_abs": float(diff.mean())}
    for name, make in makers.items():
        out[name]["mean_signed"] = float((run(make, torch.bfloat16) - ref).mean())
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
    else:  # a step captured in a CUDA graph (no launch or host overhead per step)
        candidates["fastml AdamW capturable, graph"] = (ops.AdamW, {"capturable": True})
        candidates["torch AdamW fused capturable, graph"] = (
            torch.optim.AdamW,
            {"fused": True, "capturable": True},
        )
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
            rec["ms"] = cuda_ms(_graphed(opt) if name.endswith("graph") else opt.step, args.smoke)
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
    try:
        drift = bf16_drift(dev, args.smoke)
    except Exception as exc:  # reported, the timings above stand
        drift = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    print("\nbf16 parameters, 5 amsgrad steps, distance from a float64 run:")
    for name, d in drift.items():
        print(f"  {name:<38} {d}")
    payload = {
        "device": info,
        "copy_bytes_per_s": bw,
        "parameters": n_params,
        "tensors": len(shapes),
        "results": results,
        "bf16_drift": drift,
    }
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
