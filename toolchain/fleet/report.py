"""`toolchain fleet`: what the store knows about the fleet, as a table, JSON or an HTML
page with plots (self-contained SVG, no plotting library needed to read it)."""

from __future__ import annotations

import html
import time
from typing import Any

from toolchain.fleet.store import Store

RECENT = 20
DEAD_LETTERS_SHOWN = 5


def _gaps(seqs: list[int]) -> tuple[int, list[list[int]]]:
    """Missing sequence numbers in 1..max(seqs): their count and (up to 10) ranges."""
    missing, ranges, expect = 0, [], 1
    for s in seqs:
        if s > expect:
            missing += s - expect
            if len(ranges) < 10:
                ranges.append([expect, s - 1])
        expect = s + 1
    return missing, ranges


def summarize(store: Store) -> dict[str, Any]:
    devices = []
    for d in store.devices():
        seqs = store.message_seqs(d["device_id"])
        missing, ranges = _gaps(seqs)
        wins = store.recent_windows(d["device_id"], RECENT)
        counts = store.window_totals(d["device_id"])
        latest = wins[0] if wins else {}
        devices.append({
            "device_id": d["device_id"], "state": d["state"] or "unknown",
            "model": d["model"], "model_version": d["model_version"], "profile": d["profile"],
            "backend": d["backend"], "last_seen": d["last_seen"],
            "messages": len(seqs), "last_seq": seqs[-1] if seqs else None,
            "sequence_gaps": missing, "gap_ranges": ranges,
            "windows": counts["windows"], "inferences": counts["inferences"],
            "errors": counts["errors"], "spool_dropped": counts["dropped"],
            "latency_ms": {k: latest.get(f"{k}_ms") for k in ("p50", "p95", "p99")},
            "budget_p95_ms": latest.get("budget_p95_ms"),
            "drift": {k: latest.get(k) for k in ("drift_score", "input_psi", "class_psi",
                                                 "confidence_psi", "input_ks_p")},
            "recent": [{k: w[k] for k in ("seq", "end_wall", "p95_ms", "drift_score",
                                          "error_rate")} for w in reversed(wins)],
        })
    triggers = store.triggers()
    for t in triggers:
        t["active"] = t["cleared_at"] is None
    return {"generated_at": time.time(), "store": store.url, "devices": devices,
            "versions": store.versions(), "triggers": triggers,
            "listeners": store.listener_stats(),
            "dead_letters": {"count": store.dead_letter_count(),
                             "latest": store.dead_letters(DEAD_LETTERS_SHOWN)}}


def _fmt(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def render_text(s: dict[str, Any]) -> str:
    lines = [f"fleet in {s['store']}: {len(s['devices'])} device(s)", ""]
    head = (f"{'device':<16} {'state':<8} {'model@version':<20} {'windows':>7} {'infer':>7} "
            f"{'gaps':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'drift':>7} {'errors':>6}")
    lines += [head, "-" * len(head)]
    for d in s["devices"]:
        lat = d["latency_ms"]
        version = f"{d['model']}@{d['model_version']}"
        lines.append(
            f"{d['device_id']:<16} {d['state']:<8} {version:<20} "
            f"{d['windows']:>7} {d['inferences']:>7} {d['sequence_gaps']:>5} "
            f"{_fmt(lat['p50']):>8} {_fmt(lat['p95']):>8} {_fmt(lat['p99']):>8} "
            f"{_fmt(d['drift']['drift_score']):>7} {d['errors']:>6}")
    lines += ["", "(latency and drift: the latest window; gaps: sequence numbers never "
                  "received)", ""]
    if s["triggers"]:
        lines.append("triggers:")
        for t in s["triggers"]:
            state = "ACTIVE" if t["active"] else f"cleared {_when(t['cleared_at'])}"
            rc = "" if t["command"] is None else f", command exit {_fmt(t['command_rc'])}"
            lines.append(f"  {_when(t['fired_at'])}  {t['rule']} on {t['scope']} "
                         f"({', '.join(t['devices'])}): {state}{rc}")
    else:
        lines.append("triggers: none")
    for li in s["listeners"]:
        lines.append(f"listener {li['listener_id']}: {li['received']} received, {li['stored']} "
                     f"stored, {li['duplicates']} duplicates, {li['rejected']} dead letters, "
                     f"{_fmt(li.get('store_errors'))} store errors, "
                     f"{_fmt(li.get('connects'))} connects")
    dead = s["dead_letters"]
    lines.append(f"dead letters: {dead['count']}" + (" (newest first):" if dead["count"] else ""))
    for d in dead["latest"]:
        lines.append(f"  {_when(d['received_at'])}  {d['device_id'] or '-'}: {d['reason']}")
    return "\n".join(lines)


def _svg_lines(title: str, series: dict[str, list[tuple[float, float]]],
               threshold: float | None = None) -> str:
    w, h, pad = 640, 220, 40
    points = [p for pts in series.values() for p in pts]
    if not points:
        return f"<p>{html.escape(title)}: no data</p>"
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if threshold is not None:
        ys.append(threshold)
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = 0.0, max(ys) * 1.1 or 1.0

    def sx(x: float) -> float:
        return pad + (x - x0) / (x1 - x0) * (w - 2 * pad)

    def sy(y: float) -> float:
        return h - pad - (y - y0) / (y1 - y0) * (h - 2 * pad)

    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}">',
             f'<text x="{pad}" y="16" font-size="13">{html.escape(title)}</text>',
             f'<line x1="{pad}" y1="{h - pad}" x2="{w - pad}" y2="{h - pad}" stroke="#999"/>',
             f'<text x="4" y="{sy(y1 / 1.1) + 4:.0f}" font-size="10">{y1 / 1.1:.3g}</text>',
             f'<text x="4" y="{h - pad + 4}" font-size="10">0</text>']
    if threshold is not None:
        parts.append(f'<line x1="{pad}" y1="{sy(threshold):.1f}" x2="{w - pad}" '
                     f'y2="{sy(threshold):.1f}" stroke="#888" stroke-dasharray="4"/>')
    for i, (name, pts) in enumerate(sorted(series.items())):
        c = colors[i % len(colors)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{path}"/>')
        parts.append(f'<text x="{w - pad + 2 - 100}" y="{30 + 12 * i}" font-size="10" '
                     f'fill="{c}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_html(s: dict[str, Any], store: Store) -> str:
    rows = store.window_series()
    p95: dict[str, list] = {}
    drift: dict[str, list] = {}
    for r in rows:
        if r["end_wall"] is None:
            continue
        if r["p95_ms"] is not None:
            p95.setdefault(r["device_id"], []).append((r["end_wall"], r["p95_ms"]))
        if r["drift_score"] is not None:
            drift.setdefault(r["device_id"], []).append((r["end_wall"], r["drift_score"]))
    esc = html.escape
    dev_rows = "".join(
        f"<tr><td>{esc(d['device_id'])}</td><td>{esc(d['state'])}</td>"
        f"<td>{esc(str(d['model']))}@{esc(str(d['model_version']))}</td>"
        f"<td>{d['windows']}</td><td>{d['inferences']}</td><td>{d['sequence_gaps']}</td>"
        f"<td>{_fmt(d['latency_ms']['p50'])}</td><td>{_fmt(d['latency_ms']['p95'])}</td>"
        f"<td>{_fmt(d['latency_ms']['p99'])}</td><td>{_fmt(d['drift']['drift_score'])}</td>"
        f"<td>{d['errors']}</td></tr>" for d in s["devices"])
    trig_rows = "".join(
        f"<tr><td>{_when(t['fired_at'])}</td><td>{esc(t['rule'])}</td><td>{esc(t['scope'])}"
        f"</td><td>{esc(', '.join(t['devices']))}</td><td>{'active' if t['active'] else 'cleared'}"
        f"</td><td>{esc(t['detail'].get('condition', ''))}</td><td>{_fmt(t['command_rc'])}</td>"
        f"</tr>" for t in s["triggers"])
    dead_rows = "".join(
        f"<tr><td>{_when(d['received_at'])}</td><td>{esc(str(d['device_id'] or '-'))}</td>"
        f"<td>{esc(d['reason'])}</td></tr>" for d in s["dead_letters"]["latest"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edgepack fleet</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}</style></head><body>
<h1>Fleet</h1><p>store {esc(s['store'])}, generated {_when(s['generated_at'])}</p>
<h2>Devices</h2><table><tr><th>device</th><th>state</th><th>model@version</th><th>windows</th>
<th>inferences</th><th>seq gaps</th><th>p50 ms</th><th>p95 ms</th><th>p99 ms</th>
<th>drift</th><th>errors</th></tr>{dev_rows}</table>
<h2>Latency</h2>{_svg_lines("p95 latency per window (ms)", p95)}
<h2>Drift</h2>{_svg_lines("drift score per window (PSI; dashed: 0.25)", drift, 0.25)}
<h2>Triggers</h2><table><tr><th>fired</th><th>rule</th><th>scope</th><th>devices</th>
<th>state</th><th>condition</th><th>command exit</th></tr>{trig_rows}</table>
<h2>Dead letters</h2><p>{s['dead_letters']['count']} message(s) that could not be stored for
what they contain</p><table><tr><th>received</th><th>device</th><th>reason</th></tr>{dead_rows}
</table></body></html>"""
