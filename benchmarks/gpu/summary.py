"""The key figures of a GPU check run: each benchmark JSON's "key" section, and
``fastml bench``'s ratios and fractions of the machine's limits.

    python benchmarks/gpu/summary.py OUT_DIR        (called last by check.sh)
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "n/a"
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return str(v)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__)
        return 2
    out = Path(argv[0])
    for name in ("bench_ops", "bench_forest", "bench_data", "bench_drift"):
        path = out / f"{name}.json"
        if not path.exists():
            continue
        try:
            doc = json.loads(path.read_text())
        except ValueError as e:
            print(f"-- {name}: unreadable JSON ({e})")
            continue
        key = doc.get("key", {})
        print(f"-- {name}")
        for k, v in key.items():
            print(f"   {k:<44} {_fmt(v)}")
        if not key:
            print("   (no key figures)")
    bench = out / "bench-gpu.json"
    if bench.exists():
        doc = json.loads(bench.read_text())
        print("-- fastml bench --quick --device cuda")
        for f in doc.get("figures", []):
            ratio = f.get("ratio")
            frac = f.get("fraction_of_limit")
            print(
                f"   {f['component']:<7} {f['name']:<34} ratio {_fmt(ratio) if ratio else '-':>6}"
                f"  of limit {_fmt(frac) if frac is not None else '-':>6}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
