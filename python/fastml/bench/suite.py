"""``fastml bench``: the standard suite, its JSON record and machine comparison.

A run is a list of *figures*. Each figure is one fastml measurement beside the
peer it is measured against in the same run (``peer`` is None when the peer is
not installed: that is recorded, never faked), and, where a physical limit
applies, beside that limit as measured on this machine in the same run
(``limit`` and ``fraction_of_limit``; see :mod:`fastml.bench.limits`). The
JSON schema is versioned (``SCHEMA``) and documented in docs/bench.md; files
of earlier schemas still load.
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
from fastml._system import package_versions, system_info
from fastml.bench.harness import Timing
from fastml.bench.limits import Limit

SCHEMA = "fastml-bench/2"
# Schemas this version reads: 1 had no limits (they load with none).
READABLE_SCHEMAS = ("fastml-bench/1", SCHEMA)
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
    # The hardware limit this figure is bounded by, and how the figure converts to
    # the limit's unit: fastml.value * per_unit is in limit.unit (the byte accounting).
    limit: Limit | None = None
    per_unit: float = 1.0
    accounting: str = ""

    @property
    def ratio(self) -> float | None:
        if self.peer is None or self.peer.value == 0 or self.fastml.value == 0:
            return None
        if self.higher_is_better:
            return self.fastml.value / self.peer.value
        return self.peer.value / self.fastml.value

    @property
    def fraction_of_limit(self) -> float | None:
        """How much of the hardware limit fastml's figure reaches (rates only)."""
        if self.limit is None or not self.limit.value or not self.higher_is_better:
            return None
        return self.fastml.value * self.per_unit / self.limit.value

    def against(
        self, limits: dict[str, Limit], name: str, per_unit: float, accounting: str
    ) -> Figure:
        """Report this figure against limit ``name`` when this run measured it."""
        self.limit = limits.get(name)
        self.per_unit = per_unit
        self.accounting = accounting
        return self

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
            "limit": None
            if self.limit is None
            else dict(self.limit.to_dict(), per_unit=self.per_unit, accounting=self.accounting),
            "fraction_of_limit": self.fraction_of_limit,
        }


@dataclass
class BenchContext:
    """What a component's benchmark gets: the size knob and a progress hook."""

    quick: bool
    device: str = "cpu"
    progress: Callable[[str], None] = field(default=lambda msg: None)
    limits: dict[str, Limit] = field(default_factory=dict)


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
    from fastml.bench import limits as limits_mod

    progress = progress or (lambda msg: None)
    progress(
        "limits: memory copy and gather bandwidth" + (", GPU copies" if device == "cuda" else "")
    )
    limits = limits_mod.measure(device, quick)
    ctx = BenchContext(quick=quick, device=device, progress=progress, limits=limits)
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
        "limits": {k: v.to_dict() for k, v in limits.items()},
        "figures": [f.to_dict() for f in figures],
        "skipped": skipped,
    }


class _Skip(Exception):
    """Raised by a component that cannot run here (e.g. ops without a GPU)."""


def skip(reason: str) -> None:
    raise _Skip(reason)


def load(path: str | Path) -> dict[str, Any]:
    """Read a bench JSON of any readable schema, upgraded in memory to the current one."""
    with open(path, encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a fastml bench JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("schema") not in READABLE_SCHEMAS:
        got = doc.get("schema") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{path}: expected schema {' or '.join(READABLE_SCHEMAS)}, got {got!r}")
    if doc["schema"] == "fastml-bench/1":  # no limits were measured then
        doc = dict(doc, schema=SCHEMA, limits={}, upgraded_from="fastml-bench/1")
        doc["figures"] = [dict(f, limit=None, fraction_of_limit=None) for f in doc["figures"]]
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
        f"{'component':<7} {'figure':<34} {'unit':<10} {'fastml':>10} {'±':>5} {'peer':>10}  "
        f"{'ratio':>7} {'of limit':>8}  peer name",
    ]
    for f in doc["figures"]:
        peer = f["peer"]
        ratio = f"{f['ratio']:.2f}x" if f["ratio"] else "-"
        frac = f.get("fraction_of_limit")
        frac_s = f"{frac * 100:.0f}%" if frac is not None else "-"
        lines.append(
            f"{f['component']:<7} {f['name']:<34} {f['unit']:<10} {_fmt(f['fastml']['value'], f['unit']):>10} "
            f"{f['fastml']['spread'] * 100:>4.0f}% {_fmt(peer['value'] if peer else None, f['unit']):>10}  "
            f"{ratio:>7} {frac_s:>8}  {peer['name'] if peer else ('(absolute figure)' if f.get('absolute') else 'peer not installed')}"
        )
    for c, why in doc.get("skipped", {}).items():
        lines.append(f"{c:<7} skipped: {why}")
    limits = doc.get("limits") or {}
    if limits:
        lines.append("limits measured in this run (the 'of limit' column):")
        for name, lim in limits.items():
            lines.append(
                f"  {name:<16} {_fmt(lim['value'], lim['unit']):>10} {lim['unit']:<8} {lim['what']}"
            )
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
        fractions = [None if f is None else f.get("fraction_of_limit") for f in per]
        rows.append(
            {
                "component": k[0],
                "name": k[1],
                "unit": unit,
                "values": per,
                "ratios": ratios,
                "fractions": fractions,
            }
        )

    width = 26
    head = f"{'figure':<42} {'unit':<10}" + "".join(f" {n[-width:]:>{width}}" for n in names)
    lines = [head]
    for r in rows:
        cells = []
        for f, ratio, frac in zip(r["values"], r["ratios"], r["fractions"], strict=True):
            if f is None:
                cells.append(f" {'-':>{width}}")
            else:
                rs = "" if ratio is None else f" ({ratio:.2f}x)"
                fs = "" if frac is None else f" {frac * 100:.0f}%"
                cells.append(f" {_fmt(f['fastml']['value'], r['unit']) + rs + fs:>{width}}")
        lines.append(f"{r['component'] + '.' + r['name']:<42} {r['unit']:<10}" + "".join(cells))
    lines.append(
        "(x: against the first file, >1 better; %: of that machine's limit, where one applies)"
    )
    return "\n".join(lines), rows


def plot_compare(rows: list[dict[str, Any]], names: list[str], path: str | Path) -> None:
    """Bar charts per figure: each run's ratio against the first, and each run's
    fraction of its own machine's limit (where one applies). Needs matplotlib
    (``pip install "fastml[bench]"``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError(
            'fastml bench compare --plot needs matplotlib: pip install "fastml[bench]" '
            "(or pip install matplotlib)"
        ) from e
    import numpy as np

    labels = [f"{r['component']}.{r['name']}" for r in rows]
    n = len(names)
    y = np.arange(len(labels))
    height = 0.8 / max(n, 1)
    fig, (ax, ax2) = plt.subplots(
        1, 2, figsize=(14, 0.45 * len(labels) + 1.8), sharey=True, gridspec_kw={"wspace": 0.05}
    )
    for i, name in enumerate(names):
        vals = [r["ratios"][i] if r["ratios"][i] is not None else 0.0 for r in rows]
        ax.barh(y + i * height, vals, height, label=name)
        fracs = [100 * r["fractions"][i] if r["fractions"][i] is not None else 0.0 for r in rows]
        ax2.barh(y + i * height, fracs, height, label=name)
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(y + height * (n - 1) / 2, labels)
    ax.invert_yaxis()
    ax.set_xlabel(f"ratio against {names[0]} (>1: better)")
    ax.legend(loc="lower right", fontsize="small")
    ax2.axvline(100.0, color="black", linewidth=0.8)
    ax2.set_xlabel("% of the machine's own limit (no bar: none applies)")
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
            if f.get("fraction_of_limit") is not None:
                mlflow.log_metric(key + ".fraction_of_limit", f["fraction_of_limit"])
        mlflow.log_dict(doc, "fastml-bench.json")
        return run.info.run_id
