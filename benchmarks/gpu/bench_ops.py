"""GPU check entry point for fastml.ops: runs benchmarks/ops/* and writes one JSON.

python benchmarks/gpu/bench_ops.py [--quick | --smoke] --json PATH   (called by check.sh)
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OPS = HERE.parent / "ops"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, OPS / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up here
    sys.path.insert(0, str(OPS))
    spec.loader.exec_module(mod)
    return mod


def _key(out: dict) -> dict:
    """The figures the GPU check's summary prints."""
    key: dict = {}
    ops = out.get("bench_ops", {})
    for k, v in ops.get("summary", {}).items():
        if k.startswith(
            (
                "geomean_speedup_vs_torch.compile",
                "geomean_speedup_vs_liger",
                "geomean_copy_share",
                "slower_than_compile_and_liger",
            )
        ):
            key[k] = ", ".join(v) or "none" if isinstance(v, list) else v
    if ops.get("copy_bytes_per_s"):
        key["device_copy_GB_per_s"] = ops["copy_bytes_per_s"] / 1e9
    if ops.get("errors"):
        key["failed_candidates"] = ", ".join(ops["errors"])
    lce = out.get("bench_linear_cross_entropy", {})
    for r in lce.get("results", []) if isinstance(lce.get("results"), list) else []:
        if "ms" in r:
            key[f"lce_{r.get('candidate')}_ms"] = r["ms"][1]
    for r in out.get("bench_adamw", {}).get("results", []):
        if "ms" in r:
            key[f"adamw_{r['candidate']}_ms"] = r["ms"][1]
        if "copy_share" in r:
            key[f"adamw_{r['candidate']}_copy_share"] = r["copy_share"]
        if "max_abs_diff" in r:
            key["adamw_max_abs_diff"] = r["max_abs_diff"]
    for name, d in out.get("bench_adamw", {}).get("bf16_drift", {}).items():
        if isinstance(d, dict):  # distance of bf16 parameters from a float64 run
            key[f"adamw_bf16_drift {name}"] = d
    if ops.get("tuned_configs"):
        key["ops_tuned_configs"] = ops["tuned_configs"]
    return key


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, no timing (CPU ok)")
    ap.add_argument("--quick", action="store_true", help="fewer shapes (the check's --quick)")
    args = ap.parse_args()
    extra = ["--smoke"] if args.smoke else ["--quick"] if args.quick else []
    out = {}
    failed = False
    for name in ("bench_ops", "bench_linear_cross_entropy", "bench_adamw"):
        print(f"== {name}", flush=True)
        # The LM-head shape alone takes ~15 s; --quick keeps it (it is the CE goal).
        args_for = [a for a in extra if not (name != "bench_ops" and a == "--quick")]
        try:
            out[name] = _load(name).main(args_for)
        except Exception as exc:  # report and carry on: one benchmark must not hide the other
            print(f"{name} failed: {type(exc).__name__}: {exc}")
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            failed = True
        # A peer that fails (an optional one, e.g. Liger on an unsupported shape) is
        # reported in the key figures; only fastml's own failures fail the check.
        if any(e.endswith(" fastml") for e in out[name].get("errors") or []):
            failed = True
    out["key"] = _key(out)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
