"""A self-contained HTML drift report: inline CSS and SVG, no scripts, no network."""

from __future__ import annotations

import html
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastml.drift._report import FeatureResult, Report

_COLORS = {"drift": "#c0392b", "ok": "#1e8449", "inconclusive": "#b9770e", "no_data": "#7f8c8d"}
_MAX_BARS = 40


def _fmt(x: float | None) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.4g}"


def _svg_histogram(r: FeatureResult) -> str:
    """Paired bars per bin: reference (blue) and current (orange) shares."""
    labels = r.labels[:_MAX_BARS]
    ref = r.reference_share[:_MAX_BARS]
    cur = r.current_share[:_MAX_BARS]
    n = max(1, len(labels))
    width, height, pad = max(320, 18 * n + 60), 180, 30
    top = max([*ref, *cur, 1e-12])
    bar = (width - 2 * pad) / n
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="hist" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-label="histogram of {html.escape(r.name)}">',
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#555"/>',
    ]
    for k, label in enumerate(labels):
        x0 = pad + k * bar
        for j, (share, color) in enumerate(((ref[k], "#2e86c1"), (cur[k], "#e67e22"))):
            h = (height - 2 * pad) * share / top
            parts.append(
                f'<rect class="{"ref" if j == 0 else "cur"}" x="{x0 + j * bar / 2 + 1:.1f}" '
                f'y="{height - pad - h:.1f}" width="{max(bar / 2 - 2, 1):.1f}" height="{h:.1f}" '
                f'fill="{color}"><title>{html.escape(label)}: '
                f"{'reference' if j == 0 else 'current'} {share:.2%}</title></rect>"
            )
    parts.append(
        f'<text x="{pad}" y="16" font-size="11" fill="#2e86c1">reference</text>'
        f'<text x="{pad + 70}" y="16" font-size="11" fill="#e67e22">current</text>'
    )
    if len(r.labels) > _MAX_BARS:
        parts.append(
            f'<text x="{width - pad}" y="16" font-size="11" text-anchor="end">first {_MAX_BARS} '
            f"of {len(r.labels)} bins</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def render_html(report: Report) -> str:
    rows = []
    for r in report.features.values():
        color = _COLORS.get(r.status, "#333")
        rows.append(
            "<tr>"
            f'<td><a href="#f-{html.escape(r.name)}">{html.escape(r.name)}</a></td>'
            f"<td>{r.kind}</td><td>{r.test}</td><td>{_fmt(r.statistic)}</td>"
            f"<td>{_fmt(r.p_value)}</td><td>{_fmt(r.bound)}</td><td>{_fmt(r.threshold)}</td>"
            f'<td class="status" style="color:{color}">{r.status}</td>'
            f"<td>{html.escape(', '.join(r.reasons))}</td>"
            "</tr>"
        )
    sections = []
    for r in report.features.values():
        metrics = "".join(
            f"<tr><td>{html.escape(k)}</td><td>{_fmt(v)}</td></tr>"
            for k, v in sorted(r.metrics.items())
        )
        quality = "".join(
            f"<tr><td>{html.escape(q.check)}</td><td>{_fmt(q.reference)}</td>"
            f"<td>{_fmt(q.current)}</td><td>{_fmt(q.p_value)}</td>"
            f'<td style="color:{_COLORS.get(q.status, "#333")}">{q.status}</td></tr>'
            for q in r.quality
        )
        if quality:
            quality = (
                '<table class="quality"><thead><tr><th>data quality</th><th>reference</th>'
                "<th>current</th><th>p-value</th><th>status</th></tr></thead><tbody>"
                + quality
                + "</tbody></table>"
            )
        sections.append(
            f'<section class="feature" id="f-{html.escape(r.name)}"><h2>{html.escape(r.name)} '
            f'<span style="color:{_COLORS.get(r.status, "#333")}">({r.status})</span></h2>'
            f'{_svg_histogram(r)}{quality}<table class="metrics">{metrics}</table></section>'
        )
    verdict = "drift detected" if report.dataset_drift else "no data set drift"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        "<title>fastml drift report</title><style>"
        "body{font-family:system-ui,sans-serif;margin:2em;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px}"
        "th{background:#f4f4f4}.feature{margin:2em 0}.metrics td{font-size:12px}"
        "</style></head><body>"
        f'<h1 id="verdict">fastml drift report: {verdict}</h1>'
        f"<p>{len(report.drifted_features)} of {len(report.features)} features drift "
        f"(share {report.drift_share:.2f}, data set threshold {report.dataset_share:.2f}); "
        f"reference rows {report.reference_rows:g}, current rows {report.current_rows:g}.</p>"
        '<table id="summary"><thead><tr><th>feature</th><th>kind</th><th>test</th><th>statistic</th>'
        "<th>p-value</th><th>bound</th><th>threshold</th><th>status</th><th>reasons</th>"
        "</tr></thead><tbody>"
        + "".join(rows)
        + "</tbody></table>"
        + (
            "<p>Columns not monitored (not in the reference): "
            + html.escape(", ".join(report.unmonitored))
            + "</p>"
            if report.unmonitored
            else ""
        )
        + "".join(sections)
        + "</body></html>\n"
    )
