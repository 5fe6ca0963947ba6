"""The load test's HTML report: one self-contained file, inline SVG charts, no script, no network.

``render_html(report)`` takes the JSON report of ``bridge.loadtest`` (schema
``media-bridge-loadtest/1``) and returns the page: a summary table, latency
distributions (caller text->first audio, caller barge-in, the bridge's
forwarding delay and text->first frame histograms from ``/metrics``) and time
series (active calls, bridge CPU %, bridge RSS).
"""

from __future__ import annotations

import html
import math
from typing import Any

from .spoken_report import spoken_html_rows

W, H = 560, 260
ML, MR, MT, MB = 56, 16, 30, 44
COLORS = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c")


def _e(s: Any) -> str:
    return html.escape(str(s), quote=True)


def _fmt(v: Any, unit: str = "") -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        v = f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
    return f"{v}{unit}"


def _nice_max(v: float) -> float:
    if v <= 0:
        return 1.0
    exp = 10 ** math.floor(math.log10(v))
    for m in (1, 2, 2.5, 5, 10):
        if v <= m * exp:
            return float(m * exp)
    return float(10 * exp)


def _frame(title: str, x_label: str, y_label: str, y_max: float, body: str, x_ticks: str) -> str:
    pw, ph = W - ML - MR, H - MT - MB
    grid = []
    for i in range(5):
        y = MT + ph - ph * i / 4
        grid.append(f'<line x1="{ML}" y1="{y:.1f}" x2="{W - MR}" y2="{y:.1f}" stroke="#e5e7eb"/>'
                    f'<text x="{ML - 6}" y="{y + 4:.1f}" text-anchor="end" class="tick">{_fmt(y_max * i / 4)}</text>')
    return (
        f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        f'role="img" aria-label="{_e(title)}">'
        f'<rect width="{W}" height="{H}" fill="#ffffff"/>'
        f'<text x="{W / 2}" y="18" text-anchor="middle" class="title">{_e(title)}</text>'
        + "".join(grid)
        + f'<line x1="{ML}" y1="{MT + ph}" x2="{W - MR}" y2="{MT + ph}" stroke="#6b7280"/>'
        + f'<line x1="{ML}" y1="{MT}" x2="{ML}" y2="{MT + ph}" stroke="#6b7280"/>'
        + body + x_ticks
        + f'<text x="{ML + pw / 2}" y="{H - 6}" text-anchor="middle" class="axis">{_e(x_label)}</text>'
        + f'<text x="14" y="{MT + ph / 2}" text-anchor="middle" class="axis" '
          f'transform="rotate(-90 14 {MT + ph / 2})">{_e(y_label)}</text>'
        + "</svg>"
    )


def _empty(title: str, why: str) -> str:
    return (f'<svg class="chart" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}">'
            f'<rect width="{W}" height="{H}" fill="#f9fafb" stroke="#e5e7eb"/>'
            f'<text x="{W / 2}" y="18" text-anchor="middle" class="title">{_e(title)}</text>'
            f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" class="axis">{_e(why)}</text></svg>')


def bar_chart(title: str, labels: list[str], values: list[float], x_label: str, y_label: str = "count",
              color: str = COLORS[0]) -> str:
    """Vertical bars, one per label (histogram buckets)."""
    if not values or not any(values):
        return _empty(title, "no data")
    pw, ph = W - ML - MR, H - MT - MB
    y_max = _nice_max(max(values))
    n = len(values)
    bw = pw / n
    bars, ticks = [], []
    step = max(1, math.ceil(n / 10))
    for i, (lab, v) in enumerate(zip(labels, values, strict=True)):
        h = ph * v / y_max
        x = ML + i * bw
        bars.append(f'<rect class="bar" x="{x + 1:.1f}" y="{MT + ph - h:.1f}" width="{max(1.0, bw - 2):.1f}" '
                    f'height="{h:.1f}" fill="{color}"><title>{_e(lab)}: {_fmt(v)}</title></rect>')
        if i % step == 0:
            ticks.append(f'<text x="{x + bw / 2:.1f}" y="{MT + ph + 14}" text-anchor="middle" class="tick">'
                         f'{_e(lab)}</text>')
    return _frame(title, x_label, y_label, y_max, "".join(bars), "".join(ticks))


def histogram(title: str, values: list[float], x_label: str, bins: int = 24, color: str = COLORS[0]) -> str:
    """Histogram of raw values with equal-width bins from 0 (or the minimum) to the maximum."""
    if not values:
        return _empty(title, "no samples")
    lo, hi = min(values), max(values)
    lo = 0.0 if lo >= 0 and lo < (hi - lo) else lo
    width = (hi - lo) / bins or 1.0
    counts = [0.0] * bins
    for v in values:
        counts[min(bins - 1, int((v - lo) / width))] += 1
    labels = [f"{lo + width * (i + 0.5):.3g}" for i in range(bins)]
    return bar_chart(title, labels, counts, x_label, color=color)


def line_chart(title: str, series: list[tuple[str, list[tuple[float, float]]]], x_label: str, y_label: str) -> str:
    pts = [p for _n, s in series for p in s]
    if not pts:
        return _empty(title, "no samples")
    pw, ph = W - ML - MR, H - MT - MB
    x_max = max(p[0] for p in pts) or 1.0
    y_max = _nice_max(max(p[1] for p in pts))
    body = []
    for k, (name, s) in enumerate(series):
        if not s:
            continue
        color = COLORS[k % len(COLORS)]
        path = " ".join(f"{ML + pw * x / x_max:.1f},{MT + ph - ph * y / y_max:.1f}" for x, y in s)
        body.append(f'<polyline class="series" fill="none" stroke="{color}" stroke-width="2" points="{path}">'
                    f'<title>{_e(name)}</title></polyline>')
        body.append(f'<rect x="{ML + 8 + 150 * k}" y="{MT + 4}" width="10" height="10" fill="{color}"/>'
                    f'<text x="{ML + 22 + 150 * k}" y="{MT + 13}" class="tick">{_e(name)}</text>')
    ticks = "".join(
        f'<text x="{ML + pw * i / 5:.1f}" y="{MT + ph + 14}" text-anchor="middle" class="tick">{x_max * i / 5:.3g}</text>'
        for i in range(6))
    return _frame(title, x_label, y_label, y_max, "".join(body), ticks)


def _bucket_chart(title: str, buckets: list[list[float]]) -> str:
    # Trim empty buckets at both ends so the shape is visible.
    nz = [i for i, (_b, c) in enumerate(buckets) if c > 0]
    if not nz:
        return _empty(title, "no observations")
    sel = buckets[nz[0]:nz[-1] + 1]
    labels = ["+Inf" if b >= 1e9 else f"≤{b * 1000:g}" for b, _c in sel]
    return bar_chart(title, labels, [c for _b, c in sel], "ms (Prometheus bucket upper bound)", color=COLORS[2])


def render_html(report: dict[str, Any]) -> str:
    cfg, calls, caller = report["config"], report["calls"], report["caller"]
    integ, bm, br = report["integrity"], report["bridge_metrics"], report["bridge"]
    ts = [s for s in report.get("timeseries", []) if not s.get("final")]
    ttfa = [v for c in report.get("per_call", []) for v in c.get("ttfa_ms", [])]
    rows = [
        ("Calls attempted / connected / completed / failed",
         f"{calls['attempted']} / {calls['connected']} / {calls['completed']} / {calls['failed']}"),
        ("Failed by reason", ", ".join(f"{k}: {v}" for k, v in calls["failed_by_reason"].items()) or "none"),
        ("Text → first audio at caller p50 / p95 / p99",
         f"{_fmt(caller['ttfa_ms']['p50'])} / {_fmt(caller['ttfa_ms']['p95'])} / {_fmt(caller['ttfa_ms']['p99'])} ms"
         f" (n={caller['ttfa_ms']['count']})"),
        ("Bridge forwarding delay p50 / p99",
         f"{_fmt(bm['forwarding_delay_ms']['p50'])} / {_fmt(bm['forwarding_delay_ms']['p99'])} ms"
         f" (n={bm['forwarding_delay_ms']['count']})"),
        ("Playout underruns (count / total)",
         f"{caller['underruns']['count']} / {caller['underruns']['total_ms']} ms ({caller['underruns']['method']})"),
        ("Inter-frame jitter at caller p50 / p99",
         f"{_fmt(caller['jitter_ms']['p50'])} / {_fmt(caller['jitter_ms']['p99'])} ms"),
        ("Barge-in latency at caller p50 / p99",
         f"{_fmt(caller['barge_in_ms']['p50'])} / {_fmt(caller['barge_in_ms']['p99'])} ms"
         f" (n={caller['barge_in_ms']['count']})"),
        ("Audio integrity mismatches", f"{integ['mismatches']} — {integ['method']}"),
        ("Bridge CPU (steady mean / max)",
         f"{_fmt(br['cpu_percent']['mean_steady'], '%')} / {_fmt(br['cpu_percent']['max'], '%')}"),
        ("Bridge RSS start / peak", f"{_fmt(br['rss_mb']['start'])} / {_fmt(br['rss_mb']['peak'])} MB"),
        ("Per call (at peak active calls)",
         f"{_fmt(br['per_call']['cpu_percent'], '%')} CPU, {_fmt(br['per_call']['rss_kb'])} KB RSS, "
         f"{br['per_call']['peak_active_calls']} calls"),
        ("Load tester CPU mean / max",
         f"{_fmt(report['loadtester']['cpu_percent_mean'], '%')} / {_fmt(report['loadtester']['cpu_percent_max'], '%')}"),
    ]
    spoken = report.get("spoken")
    if spoken:
        rows += spoken_html_rows(spoken)
    table = "".join(f"<tr><th>{_e(k)}</th><td>{_e(v)}</td></tr>" for k, v in rows)
    charts_latency = [
        histogram("Text → first audio at the caller", ttfa, "ms"),
        _bucket_chart("Bridge forwarding delay (/metrics)", bm["forwarding_delay_ms"].get("buckets", [])),
        _bucket_chart("Bridge text → first frame (/metrics)", bm["text_to_first_frame_ms"].get("buckets", [])),
        _bucket_chart("Bridge barge-in latency (/metrics)", bm["barge_in_latency_ms"].get("buckets", [])),
    ]
    if spoken:
        charts_latency += [
            histogram("End of speech → first reply audio at the caller",
                      [v for c in report.get("per_call", []) for v in c.get("reply_ms", [])], "ms"),
            _bucket_chart("Bridge STT latency (/metrics)", spoken["bridge"]["stt_latency_ms"].get("buckets", [])),
            _bucket_chart("Bridge turn TTFA (/metrics)", spoken["bridge"]["turn_ttfa_ms"].get("buckets", [])),
        ]
    series_calls = [("simulated calls active", [(s["t"], s["active_calls"]) for s in ts])]
    bridge_active = [(s["t"], s["bridge_active_calls"]) for s in ts if s.get("bridge_active_calls") is not None]
    if bridge_active:
        series_calls.append(("bridge_active_calls", bridge_active))
    cpu = [(s["t"], s["bridge_cpu_percent"]) for s in ts if s.get("bridge_cpu_percent") is not None]
    tester = [(s["t"], s["loadtester_cpu_percent"]) for s in ts if s.get("loadtester_cpu_percent") is not None]
    rss = [(s["t"], s["bridge_rss_mb"]) for s in ts if s.get("bridge_rss_mb") is not None]
    charts_time = [
        line_chart("Active calls over time", series_calls, "seconds", "calls"),
        line_chart("CPU over time", [("bridge", cpu), ("load tester", tester)], "seconds", "% of one core"),
        line_chart("Bridge RSS over time", [("bridge RSS", rss)], "seconds", "MB"),
    ]
    title = (f"media-bridge load test: {cfg['calls']} calls, {cfg['scenario']}, "
             f"ramp {cfg['ramp_s']:g} s, duration {cfg['duration_s']:g} s")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'; img-src data:">
<title>{_e(title)}</title>
<style>
body{{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#111827;background:#f3f4f6}}
h1{{font-size:20px}} h2{{font-size:16px;margin-top:28px}}
table{{border-collapse:collapse;background:#fff}} th,td{{border:1px solid #d1d5db;padding:4px 10px;text-align:left}}
th{{background:#f9fafb;font-weight:600}}
.charts{{display:flex;flex-wrap:wrap;gap:12px}} .chart{{background:#fff;border:1px solid #d1d5db}}
.title{{font-size:13px;font-weight:600;fill:#111827}} .tick{{font-size:10px;fill:#374151}} .axis{{font-size:11px;fill:#374151}}
.meta{{color:#4b5563}}
</style></head><body>
<h1>{_e(title)}</h1>
<p class="meta">Started {_e(report.get('started_at'))}, wall {_e(report.get('wall_s'))} s, target
{_e(cfg.get('target') or 'local bridge process + emulator')}{', TIMED OUT' if report.get('timed_out') else ''}.
Emulator: {_e(cfg.get('emulator_args'))}. Text → first audio = trigger (start/DTMF sent) → first media of the
utterance at the caller.</p>
<table id="summary">{table}</table>
<h2>Latency distributions</h2>
<div class="charts" id="latency">{''.join(charts_latency)}</div>
<h2>Over time</h2>
<div class="charts" id="timeseries">{''.join(charts_time)}</div>
</body></html>
"""
