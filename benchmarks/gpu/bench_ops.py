"""GPU check entry point for fastml.ops: runs benchmarks/ops/* and writes one JSON.

python benchmarks/gpu/bench_ops.py --json PATH        (called by benchmarks/gpu/check.sh)
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--json", default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, no timing (CPU ok)")
    args = ap.parse_args()
    extra = ["--smoke"] if args.smoke else []
    out = {}
    failed = False
    for name in ("bench_ops", "bench_linear_cross_entropy"):
        print(f"== {name}", flush=True)
        try:
            out[name] = _load(name).main(extra)
        except Exception as exc:  # report and carry on: one benchmark must not hide the other
            print(f"{name} failed: {type(exc).__name__}: {exc}")
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            failed = True
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(out, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
