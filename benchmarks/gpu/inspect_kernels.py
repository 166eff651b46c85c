"""Compile fastml.ops' Triton kernels for an H100/H200 without a GPU and report them.

Triton builds PTX and SASS for ``sm_90a`` on a machine without a device. This
script runs the ops on CPU tensors with the Triton backend, but every launch
only compiles (nothing runs: outputs are garbage, which does not matter), with
the specialisation a real launch on an H100/H200 would get (132 SMs assumed
for grids; pointer alignment and divisible-by-16 integers as Triton specialises
them). For each kernel launched it prints the grid, warps, registers per
thread, spill bytes, shared memory and the width of each global access
(``ld.v4b32x6``: six 16-byte loads per thread). Use it to check that a change
keeps 16-byte accesses and does not spill before a GPU is available; timing
still needs the GPU (``benchmarks/gpu/check.sh``).

    python benchmarks/gpu/inspect_kernels.py
    python benchmarks/gpu/inspect_kernels.py --ops rms,ln --shapes 16384x4096,64x131072
    python benchmarks/gpu/inspect_kernels.py --force '{"rms_norm_bwd": [2, 16, 4]}'

Needs triton with its bundled ``ptxas`` (3.x wheels have it); unset
``TRITON_INTERPRET``.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from triton.runtime.jit import JITFunction

SMS = 132  # H100 SXM / H200
OPS = ("rms", "addrms", "ln", "softmax", "logsoftmax", "swiglu", "ce", "adamw")
SHAPES = "16384x4096,4096x16384,64x131072"


class _CompileOnlyDriver:
    """Stands in for the CUDA driver: an sm_90 target, device 0, stream 0."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


_LAUNCHES: list[tuple[str, Any, tuple]] = []


def _install() -> None:
    """Make every Triton launch compile only, and fastml's dispatch treat CPU
    tensors as an H100/H200's."""
    driver.set_active(_CompileOnlyDriver())
    run = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        shape = grid(None) if callable(grid) else grid
        _LAUNCHES.append((self.fn.__name__, kernel, tuple(shape)))
        return kernel

    JITFunction.run = compile_only
    # This checkout's sources when they are built (a development tree), else the
    # installed package (a clean clone whose extension lives in site-packages).
    src = str(Path(__file__).resolve().parents[2] / "python")
    sys.path.insert(0, src)
    try:
        importlib.import_module("fastml")
    except ImportError:
        sys.path.remove(src)
        for name in [m for m in sys.modules if m == "fastml" or m.startswith("fastml.")]:
            del sys.modules[name]
        importlib.import_module("fastml")
    dispatch = importlib.import_module("fastml.ops._dispatch")
    dispatch._interpreting = lambda: True  # let the triton backend take CPU tensors
    dispatch._sms = lambda device: SMS

    def programs(rows: int, device: torch.device, n: int = 1, per_sm: int = 4) -> int:
        cap = max(SMS, (64 << 20) // (4 * max(n, 1)))
        return max(1, min(rows, per_sm * SMS, cap))

    for name in ("layer_norm", "rms_norm"):
        importlib.import_module(f"fastml.ops.{name}").persistent_programs = programs
    dispatch.set_backend("triton")


def _ptxas() -> str:
    base = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    for name in ("ptxas-blackwell", "ptxas"):
        if (base / name).exists():
            return str(base / name)
    raise SystemExit(f"no ptxas under {base}")


def describe(kernel: Any) -> dict[str, Any]:
    """Registers, spills, shared memory and global access widths of a compiled kernel."""
    ptx = kernel.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        out = subprocess.run(
            [_ptxas(), "-arch=sm_90a", "-v", f.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=False,
        ).stderr
    finally:
        os.unlink(f.name)
    regs = re.search(r"Used (\d+) registers", out)
    spill = re.search(r"(\d+) bytes spill stores", out)
    access = collections.Counter(
        re.sub(r"\.global", "", m) for m in re.findall(r"(?:ld|st)\.global[.\w]*", ptx)
    )
    return {
        "warps": kernel.metadata.num_warps,
        "registers": int(regs.group(1)) if regs else None,
        "spill_bytes": int(spill.group(1)) if spill else None,
        "shared_bytes": kernel.metadata.shared,
        "access": {k.replace(".", "", 1).replace(".", ""): v for k, v in access.items()},
    }


def _cases(ops: Any, which: list[str], shape: tuple[int, ...]) -> dict[str, Callable[[], None]]:
    bf = torch.bfloat16
    n = shape[-1]

    def row(fn: Callable, *extra: int) -> Callable[[], None]:
        def go() -> None:
            x = torch.randn(shape, dtype=bf, requires_grad=True)
            params = [torch.ones(n, dtype=bf, requires_grad=True) for _ in extra]
            y = fn(x, *params)
            (y[0] if isinstance(y, tuple) else y).backward(torch.ones(shape, dtype=bf))

        return go

    def add_rms() -> None:
        x, r = (torch.randn(shape, dtype=bf, requires_grad=True) for _ in range(2))
        y, s = ops.add_rms_norm(x, r, torch.ones(n, dtype=bf, requires_grad=True))
        (y.float().sum() + s.float().sum()).backward()

    def glu() -> None:
        a, b = (torch.randn(shape, dtype=bf, requires_grad=True) for _ in range(2))
        ops.swiglu(a, b).backward(torch.ones(shape, dtype=bf))

    def ce() -> None:
        x = torch.randn(shape, dtype=bf, requires_grad=True)
        ops.cross_entropy(x, torch.randint(0, n, shape[:1])).backward()

    def adamw() -> None:
        params = [torch.zeros(shape, requires_grad=True), torch.zeros(n, requires_grad=True)]
        for p in params:
            p.grad = torch.zeros_like(p)
        ops.AdamW(params).step()

    table = {
        "rms": row(ops.rms_norm, 1),
        "addrms": add_rms,
        "ln": row(ops.layer_norm, 1, 1),
        "softmax": row(ops.softmax),
        "logsoftmax": row(ops.log_softmax),
        "swiglu": glu,
        "ce": ce,
        "adamw": adamw,
    }
    return {k: table[k] for k in which}


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ops", default=",".join(OPS), help=f"comma-separated, of {OPS}")
    ap.add_argument("--shapes", default=SHAPES, help="comma-separated ROWSxCOLS (bf16)")
    ap.add_argument("--force", default=None, help="JSON {kernel: config} for tuned kernels")
    ap.add_argument("--json", default=None, help="also write the report here")
    args = ap.parse_args(argv)
    which = [w for w in args.ops.split(",") if w]
    unknown = sorted(set(which) - set(OPS))
    if unknown:
        ap.error(f"unknown --ops {unknown}; choose from {OPS}")
    _install()
    ops = importlib.import_module("fastml.ops")
    if args.force:
        dispatch = importlib.import_module("fastml.ops._dispatch")
        for kernel, config in json.loads(args.force).items():
            dispatch._FORCED[kernel] = tuple(config)
    report = []
    for text in args.shapes.split(","):
        shape = tuple(int(v) for v in text.lower().split("x"))
        for name, case in _cases(ops, which, shape).items():
            _LAUNCHES.clear()
            case()
            print(f"== {name} {shape}")
            seen = set()
            for kernel_name, kernel, grid in _LAUNCHES:
                if (kernel_name, id(kernel), grid) in seen:
                    continue
                seen.add((kernel_name, id(kernel), grid))
                d = describe(kernel)
                acc = " ".join(f"{k}x{v}" for k, v in sorted(d["access"].items()))
                print(
                    f"  {kernel_name:<34} grid={grid!s:<14} warps={d['warps']:<2} "
                    f"regs={d['registers']} spill={d['spill_bytes']} smem={d['shared_bytes']} "
                    f"{acc}"
                )
                report.append(
                    {"op": name, "shape": shape, "kernel": kernel_name, "grid": grid, **d}
                )
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
