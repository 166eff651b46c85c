"""The shared timing harness of ``benchmarks/`` and ``fastml bench``.

Every measurement runs fastml and its peer in the same process, interleaved
round by round so that a noisy neighbour slows both alike, and reports the
median, the spread and the ratio. Timings never decide a test's outcome.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Timing:
    """Seconds per call of one candidate over the repeats."""

    name: str
    seconds: list[float] = field(default_factory=list)
    work: float | None = None  # items processed per call (rows, values, bytes, ...)
    unit: str = "items"

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def spread(self) -> float:
        """Relative interquartile range of the repeats (0.05 = 5%)."""
        if len(self.seconds) < 4:
            return (max(self.seconds) - min(self.seconds)) / self.median if self.seconds else 0.0
        q = statistics.quantiles(self.seconds, n=4)
        return (q[2] - q[0]) / self.median

    @property
    def rate(self) -> float | None:
        """Work per second at the median, when ``work`` is known."""
        return None if self.work is None else self.work / self.median

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(median=self.median, spread=self.spread, rate=self.rate)
        return d


def _time_once(fn: Callable[[], Any], number: int) -> float:
    t0 = time.perf_counter()
    for _ in range(number):
        fn()
    return (time.perf_counter() - t0) / number


def compare(
    candidates: Mapping[str, Callable[[], Any]],
    *,
    repeat: int = 7,
    number: int = 1,
    warmup: int = 1,
    work: float | None = None,
    unit: str = "items",
) -> dict[str, Timing]:
    """Time each candidate ``repeat`` times (``number`` calls each), interleaved.

    ``work`` is the amount of work one call does, so rates can be reported.
    """
    timings = {name: Timing(name, work=work, unit=unit) for name in candidates}
    for fn in candidates.values():
        for _ in range(warmup):
            fn()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeat):
            for name, fn in candidates.items():
                timings[name].seconds.append(_time_once(fn, number))
    finally:
        if gc_was_enabled:
            gc.enable()
    return timings


def ratio(timings: Mapping[str, Timing], fast: str, slow: str) -> float:
    """How many times faster ``fast`` is than ``slow`` (median over median)."""
    return timings[slow].median / timings[fast].median


def format_rate(rate: float | None, unit: str) -> str:
    if rate is None:
        return "-"
    for scale, prefix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if rate >= scale:
            return f"{rate / scale:.2f} {prefix}{unit}/s"
    return f"{rate:.1f} {unit}/s"


def table(timings: Mapping[str, Timing], baseline: str | None = None, title: str = "") -> str:
    """A plain-text table of the timings, with ratios against ``baseline``."""
    lines = [title] if title else []
    lines.append(f"{'candidate':<34} {'median':>12} {'spread':>8} {'rate':>18} {'ratio':>8}")
    for t in timings.values():
        r = "" if baseline is None else f"{timings[baseline].median / t.median:.2f}x"
        med = t.median
        med_s = f"{med * 1e6:.1f} us" if med < 1e-3 else f"{med * 1e3:.2f} ms"
        lines.append(
            f"{t.name:<34} {med_s:>12} {t.spread * 100:>7.1f}% {format_rate(t.rate, t.unit):>18} {r:>8}"
        )
    return "\n".join(lines)
