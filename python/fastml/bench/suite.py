"""``fastml bench``: the standard suite, its JSON record and machine comparison.

A run is a list of *figures*. Each figure is one fastml measurement beside the
peer it is measured against in the same run (``peer`` is None when the peer is
not installed: that is recorded, never faked). The JSON schema is versioned
(``SCHEMA``) and documented in docs/bench.md.
"""

from __future__ import annotations

import datetime as _dt
import json
import platform
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastml
from fastml.bench.harness import Timing

SCHEMA = "fastml-bench/1"
COMPONENTS = ("data", "drift", "infer", "ops")


@dataclass
class Measured:
    """One side of a figure: a rate (or latency) and its spread over repeats."""

    name: str
    value: float
    spread: float
    repeats: int

    @classmethod
    def from_timing(cls, t: Timing, *, latency: bool = False, scale: float = 1.0) -> Measured:
        value = t.median * scale if latency else (t.rate or 0.0)
        return cls(t.name, float(value), float(t.spread), len(t.seconds))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "spread": self.spread,
            "repeats": self.repeats,
        }


@dataclass
class Figure:
    """A fastml figure beside its peer, with the ratio in fastml's favour (>1: fastml better)."""

    component: str
    name: str
    unit: str
    fastml: Measured
    peer: Measured | None
    higher_is_better: bool = True
    note: str = ""
    goal: float | None = None  # the ratio an issue asks for, when there is one
    absolute: bool = False  # a figure with no peer by nature (e.g. added latency)

    @property
    def ratio(self) -> float | None:
        if self.peer is None or self.peer.value == 0 or self.fastml.value == 0:
            return None
        if self.higher_is_better:
            return self.fastml.value / self.peer.value
        return self.peer.value / self.fastml.value

    def to_dict(self) -> dict[str, Any]:
        return {
            "component": self.component,
            "name": self.name,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "fastml": self.fastml.to_dict(),
            "peer": None if self.peer is None else self.peer.to_dict(),
            "ratio": self.ratio,
            "goal": self.goal,
            "note": self.note,
            "absolute": self.absolute,
        }


@dataclass
class BenchContext:
    """What a component's benchmark gets: the size knob and a progress hook."""

    quick: bool
    device: str = "cpu"
    progress: Callable[[str], None] = field(default=lambda msg: None)


# component -> function(ctx) -> list of figures; filled by fastml.bench.components
_REGISTRY: dict[str, Callable[[BenchContext], list[Figure]]] = {}


def register(
    component: str,
) -> Callable[[Callable[[BenchContext], list[Figure]]], Callable[..., Any]]:
    """Decorator: register the benchmark function of one component."""
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")

    def deco(fn: Callable[[BenchContext], list[Figure]]) -> Callable[..., Any]:
        _REGISTRY[component] = fn
        return fn

    return deco


def hardware_info() -> dict[str, Any]:
    """CPU, memory and GPUs of this machine, as recorded in a bench JSON."""
    from fastml.cli import system_info

    info = system_info()
    return {
        "cpu_model": info["cpu"]["model"],
        "logical_cores": info["cpu"]["logical_cores"],
        "physical_cores": info["cpu"]["physical_cores"],
        "usable_cores": info["cpu"]["usable_cores"],
        "memory_bytes": info["memory_bytes"],
        "gpus": info["gpus"],
        "cuda_version": info["fastml"]["cuda_version"],
        "machine": platform.machine(),
        "platform": info["platform"],
        "hostname": platform.node(),
    }


def software_info() -> dict[str, Any]:
    from fastml.cli import package_versions

    return {
        "python": platform.python_version(),
        "fastml": fastml.build_info(),
        "packages": package_versions(),
    }


def run_suite(
    only: Iterable[str] | None = None,
    *,
    quick: bool = False,
    device: str = "cpu",
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run the selected components and return the JSON-serialisable record."""
    from fastml.bench import components  # noqa: F401  (registers the components)

    selected = list(COMPONENTS if only is None else only)
    for c in selected:
        if c not in COMPONENTS:
            raise ValueError(
                f"only: unknown component {c!r}; expected some of {', '.join(COMPONENTS)}"
            )
    ctx = BenchContext(quick=quick, device=device, progress=progress or (lambda msg: None))
    figures: list[Figure] = []
    skipped: dict[str, str] = {}
    started = _dt.datetime.now(_dt.timezone.utc)
    for c in selected:
        fn = _REGISTRY.get(c)
        if fn is None:
            skipped[c] = "no benchmark registered"
            continue
        try:
            figures.extend(fn(ctx))
        except _Skip as e:
            skipped[c] = str(e)
    return {
        "schema": SCHEMA,
        "date": started.isoformat(timespec="seconds"),
        "duration_s": (_dt.datetime.now(_dt.timezone.utc) - started).total_seconds(),
        "quick": quick,
        "hardware": hardware_info(),
        "software": software_info(),
        "figures": [f.to_dict() for f in figures],
        "skipped": skipped,
    }


class _Skip(Exception):
    """Raised by a component that cannot run here (e.g. ops without a GPU)."""


def skip(reason: str) -> None:
    raise _Skip(reason)


def load(path: str | Path) -> dict[str, Any]:
    """Read a bench JSON and check its schema."""
    with open(path, encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a fastml bench JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") != SCHEMA:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{path}: expected schema {SCHEMA!r}, got {got!r}")
    return doc


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit.endswith("/s"):
        for scale, p in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
            if abs(v) >= scale:
                return f"{v / scale:.2f}{p}"
        return f"{v:.1f}"
    return f"{v:.3g}"


def format_run(doc: dict[str, Any]) -> str:
    """A table of one run's figures."""
    lines = [
        f"fastml bench ({doc['date']}, {doc['hardware']['cpu_model']}, "
        f"{doc['hardware']['usable_cores']} cores"
        + (f", {doc['hardware']['gpus'][0]['name']}" if doc["hardware"]["gpus"] else "")
        + ")",
        f"{'component':<7} {'figure':<34} {'unit':<10} {'fastml':>10} {'±':>5} {'peer':>10}  {'ratio':>7}  peer name",
    ]
    for f in doc["figures"]:
        peer = f["peer"]
        ratio = f"{f['ratio']:.2f}x" if f["ratio"] else "-"
        lines.append(
            f"{f['component']:<7} {f['name']:<34} {f['unit']:<10} {_fmt(f['fastml']['value'], f['unit']):>10} "
            f"{f['fastml']['spread'] * 100:>4.0f}% {_fmt(peer['value'] if peer else None, f['unit']):>10}  "
            f"{ratio:>7}  {peer['name'] if peer else ('(absolute figure)' if f.get('absolute') else 'peer not installed')}"
        )
    for c, why in doc.get("skipped", {}).items():
        lines.append(f"{c:<7} skipped: {why}")
    return "\n".join(lines)


def compare(docs: list[dict[str, Any]], names: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """Side-by-side table of the same figures from several runs.

    Ratios are of each run against the first, oriented so that >1 means the
    later machine is better at that figure.
    """
    keys: list[tuple[str, str]] = []
    for d in docs:
        for f in d["figures"]:
            k = (f["component"], f["name"])
            if k not in keys:
                keys.append(k)
    rows = []
    for k in keys:
        per = []
        for d in docs:
            match = next((f for f in d["figures"] if (f["component"], f["name"]) == k), None)
            per.append(match)
        base = per[0]
        ratios: list[float | None] = []
        for f in per:
            if f is None or base is None or not base["fastml"]["value"] or not f["fastml"]["value"]:
                ratios.append(None)
            elif base["higher_is_better"]:
                ratios.append(f["fastml"]["value"] / base["fastml"]["value"])
            else:
                ratios.append(base["fastml"]["value"] / f["fastml"]["value"])
        unit = next(f["unit"] for f in per if f is not None)
        rows.append(
            {"component": k[0], "name": k[1], "unit": unit, "values": per, "ratios": ratios}
        )

    head = f"{'figure':<42} {'unit':<10}" + "".join(f" {n[-18:]:>18}" for n in names)
    lines = [head]
    for r in rows:
        cells = []
        for f, ratio in zip(r["values"], r["ratios"], strict=True):
            if f is None:
                cells.append(f" {'-':>18}")
            else:
                rs = "" if ratio is None else f" ({ratio:.2f}x)"
                cells.append(f" {_fmt(f['fastml']['value'], r['unit']) + rs:>18}")
        lines.append(f"{r['component'] + '.' + r['name']:<42} {r['unit']:<10}" + "".join(cells))
    return "\n".join(lines), rows


def plot_compare(rows: list[dict[str, Any]], names: list[str], path: str | Path) -> None:
    """A bar chart of each run's ratio against the first, per figure (matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError("--plot needs matplotlib: pip install matplotlib") from e
    import numpy as np

    labels = [f"{r['component']}.{r['name']}" for r in rows]
    n = len(names)
    y = np.arange(len(labels))
    height = 0.8 / max(n, 1)
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(labels) + 1.8))
    for i, name in enumerate(names):
        vals = [r["ratios"][i] if r["ratios"][i] is not None else 0.0 for r in rows]
        ax.barh(y + i * height, vals, height, label=name)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(y + height * (n - 1) / 2, labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"ratio against {names[0]} (>1: better)")
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_mlflow(doc: dict[str, Any], experiment: str = "fastml-bench") -> str:
    """Log a run's figures and hardware as an MLflow run; returns the run id."""
    try:
        import mlflow
    except ImportError as e:
        raise RuntimeError(
            "--mlflow needs mlflow, which is not installed: pip install mlflow"
        ) from e
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=f"fastml-bench {doc['date']}") as run:
        hw = doc["hardware"]
        mlflow.log_params(
            {
                "cpu_model": hw["cpu_model"],
                "usable_cores": hw["usable_cores"],
                "memory_gib": round((hw["memory_bytes"] or 0) / 2**30, 1),
                "gpu": hw["gpus"][0]["name"] if hw["gpus"] else "none",
                "fastml": doc["software"]["fastml"]["version"],
                "quick": doc["quick"],
            }
        )
        for f in doc["figures"]:
            key = f"{f['component']}.{f['name']}"
            mlflow.log_metric(key, f["fastml"]["value"])
            if f["ratio"] is not None:
                mlflow.log_metric(key + ".ratio", f["ratio"])
        mlflow.log_dict(doc, "fastml-bench.json")
        return run.info.run_id
