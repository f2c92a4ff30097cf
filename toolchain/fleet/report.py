"""`toolchain fleet`: what the store knows about the fleet, as a table, JSON or an HTML
page with plots (self-contained SVG, no plotting library needed to read it)."""

from __future__ import annotations

import html
import time
from collections.abc import Callable
from typing import Any

from toolchain.fleet.rollup import HOUR_S, hour_of
from toolchain.fleet.store import Store

SHOWN = 20  # devices in the text table (and the HTML one) unless --devices says otherwise
WORST = 5  # devices named, and plotted, for the worst latest p95 and drift
GAP_RANGE_DEVICES = 50  # devices (most gaps first) whose missing seq ranges are listed
TREND_HOURS = 24
DEAD_LETTERS_SHOWN = 5
ROLLOUTS_SHOWN = 5  # the newest rollouts in the report (`toolchain rollout status` has all)
DRIFT_LINE = 0.25  # the default drift rule's threshold, drawn on the drift plots


def _device(d: dict[str, Any], breaching: list[str]) -> dict[str, Any]:
    """A devices row (with its running summary) as the report shows it."""
    latest = {k: d[f"latest_{k}"] for k in ("p50_ms", "p95_ms", "p99_ms", "budget_p95_ms",
                                            "drift_score", "input_psi", "class_psi",
                                            "confidence_psi", "input_ks_p")}
    gaps = max(0, (d["max_seq"] or 0) - d["messages"])
    over = (latest["p95_ms"] is not None and latest["budget_p95_ms"] is not None
            and latest["p95_ms"] > latest["budget_p95_ms"])
    drifting = latest["drift_score"] is not None and latest["drift_score"] > DRIFT_LINE
    state = d["state"] or "unknown"
    why = ([f"breaching {', '.join(breaching)}"] if breaching else []) + (
        ["p95 over budget"] if over else []) + (
        [f"drift over {DRIFT_LINE}"] if drifting else []) + (
        [f"{gaps} seq gaps"] if gaps else []) + (
        [f"{d['spool_dropped']} dropped"] if d["spool_dropped"] else []) + (
        ["offline"] if state == "offline" else [])
    return {
        "device_id": d["device_id"], "state": state,
        "model": d["model"], "model_version": d["model_version"], "profile": d["profile"],
        "backend": d["backend"], "last_seen": d["last_seen"],
        "messages": d["messages"], "last_seq": d["max_seq"],
        "sequence_gaps": gaps, "gap_ranges": None,
        "windows": d["windows"], "inferences": d["inferences"], "errors": d["errors"],
        "spool_dropped": d["spool_dropped"],
        "latest_window": {"seq": d["latest_seq"], "end_wall": d["latest_end_wall"]},
        "latency_ms": {k: latest[f"{k}_ms"] for k in ("p50", "p95", "p99")},
        "budget_p95_ms": latest["budget_p95_ms"],
        "drift": {k: latest[k] for k in ("drift_score", "input_psi", "class_psi",
                                         "confidence_psi", "input_ks_p")},
        "breaching": breaching, "over_budget": over, "drifting": drifting, "attention": why,
        "retained_seq": d["retained_seq"],
    }


def _severity(d: dict[str, Any]) -> tuple:
    """Sort key, most urgent first: breaching rules, over budget, drifting, gaps, drops,
    offline, then the highest drift score."""
    return (-len(d["breaching"]), not d["over_budget"], not d["drifting"], -d["sequence_gaps"],
            -d["spool_dropped"], d["state"] != "offline",
            -(d["drift"]["drift_score"] or 0.0), d["device_id"])


def _worst(devices: list[dict[str, Any]], value: Callable[[dict], Any]) -> list[dict[str, Any]]:
    have = [d for d in devices if value(d) is not None]
    return [{"device_id": d["device_id"], "value": value(d)}
            for d in sorted(have, key=lambda d: (-value(d), d["device_id"]))[:WORST]]


def summarize(store: Store, shown: int | None = SHOWN) -> dict[str, Any]:
    """What `toolchain fleet` prints, from the device summaries and the hourly rollups:
    the time it takes does not grow with the windows stored. `shown`: devices in the
    text/HTML table (None: all); the JSON always holds every device."""
    now = time.time()
    breaching = store.breaching()
    devices = [_device(d, breaching.get(d["device_id"], [])) for d in store.devices()]
    for d in sorted((d for d in devices if d["sequence_gaps"]),
                    key=lambda d: -d["sequence_gaps"])[:GAP_RANGE_DEVICES]:
        d["gap_ranges"] = store.gap_ranges(d["device_id"], d["retained_seq"])
    newest = store.latest_hour()
    trend_end = None if newest is None else min(newest, hour_of(now))
    trend_start = None if trend_end is None else trend_end - (TREND_HOURS - 1) * HOUR_S
    trend = [] if trend_end is None else store.fleet_trend(trend_start, trend_end)
    worst = {"p95_ms": _worst(devices, lambda d: d["latency_ms"]["p95"]),
             "drift_score": _worst(devices, lambda d: d["drift"]["drift_score"])}
    by_id = {d["device_id"]: d for d in devices}
    series = {}
    for device_id in dict.fromkeys(w["device_id"] for ws in worst.values() for w in ws):
        end = by_id[device_id]["latest_window"]["end_wall"] or trend_end or now
        series[device_id] = store.device_series(device_id, end - TREND_HOURS * HOUR_S)
    attention = [d for d in devices if d["attention"]]
    listed = (sorted(devices, key=lambda d: d["device_id"])
              if shown is None or len(devices) <= shown
              else sorted(attention, key=_severity)[:shown])
    triggers = store.triggers()
    for t in triggers:
        t["active"] = t["cleared_at"] is None
    return {"rollouts": _rollouts(store), "generated_at": now, "store": store.url,
            "devices": devices,
            "totals": _totals(devices), "listed": [d["device_id"] for d in listed],
            "versions": store.versions(),
            "trend": {"hours": TREND_HOURS, "from": trend_start, "to": trend_end,
                      "per_hour": trend},
            "worst": worst, "series": series, "triggers": triggers,
            "listeners": store.listener_stats(),
            "dead_letters": {"count": store.dead_letter_count(),
                             "latest": store.dead_letters(DEAD_LETTERS_SHOWN)}}


def _rollouts(store: Store) -> list[dict[str, Any]]:
    """The last ROLLOUTS_SHOWN rollouts with their cohorts and verdicts (statistics in
    each verdict's detail)."""
    from toolchain.fleet import rollout_store as rs

    return [{**r, "devices": rs.rollout_devices(store, r["id"]),
             "verdicts": rs.verdicts(store, r["id"])}
            for r in rs.all_rollouts(store)[:ROLLOUTS_SHOWN]]


def rollout_lines(r: dict[str, Any], verbose: bool = True) -> list[str]:
    """A rollout as text: its state, cohorts by role, and each verdict with, when
    `verbose`, its per-metric statistics."""
    from toolchain.fleet.rollout import describe_metrics, stage_name

    roles: dict[str, list[str]] = {}
    for d in r["devices"]:
        roles.setdefault(d["role"], []).append(
            d["device_id"] + ("" if d["state"] in ("done", "idle") else f" ({d['state']})"))
    stages = ",".join(f"{p:g}" for p in r["config"]["stages"])
    where = (stage_name(r) + f", {r['phase']}") if r["state"] not in (
        "completed", "rolled_back", "aborted") else r["state"].replace("_", " ")
    lines = [f"rollout {r['id']}: {r['model']} {r['from_version']} -> {r['to_version']} "
             f"[{r['state']}] {where}; stages {stages}"
             + (" after a shadow run" if r["config"]["shadow_first"] else "")
             + (f"; driver {r['owner']}" if r["owner"] else "")]
    if r.get("message"):
        lines.append(f"  {r['message']}")
    for role in ("canary", "shadow", "control", "rollback"):
        if role in roles:
            lines.append(f"  {role} ({len(roles[role])}): {', '.join(roles[role])}")
    for v in r["verdicts"]:
        lines.append(f"  {_when(v['decided_at'])}  {stage_name(r, v['stage'])}: "
                     f"{v['decision']} ({v['reason']})")
        if verbose:
            lines += [f"      {line}" for line in describe_metrics(
                v["detail"].get("metrics", []))]
    return lines


def _totals(devices: list[dict[str, Any]]) -> dict[str, Any]:
    states: dict[str, int] = {}
    for d in devices:
        states[d["state"]] = states.get(d["state"], 0) + 1
    return {
        "devices": len(devices), "states": dict(sorted(states.items())),
        **{k: sum(d[k] for d in devices) for k in ("messages", "windows", "inferences",
                                                    "errors", "spool_dropped",
                                                    "sequence_gaps")},
        "with_gaps": sum(1 for d in devices if d["sequence_gaps"]),
        "breaching": sum(1 for d in devices if d["breaching"]),
        "over_budget": sum(1 for d in devices if d["over_budget"]),
        "drifting": sum(1 for d in devices if d["drifting"]),
        "needing_attention": sum(1 for d in devices if d["attention"]),
    }


def _fmt(v: Any, spec: str = ".3g") -> str:
    return "-" if v is None else format(v, spec) if isinstance(v, float) else str(v)


def _when(t: float | None) -> str:
    return "-" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _device_table(s: dict[str, Any]) -> list[dict[str, Any]]:
    by_id = {d["device_id"]: d for d in s["devices"]}
    return [by_id[i] for i in s["listed"]]


def render_text(s: dict[str, Any]) -> str:
    t = s["totals"]
    states = ", ".join(f"{n} {state}" for state, n in t["states"].items())
    lines = [f"fleet in {s['store']}: {t['devices']} device(s)" + (f": {states}" if states
                                                                  else ""),
             f"  {t['windows']} windows, {t['inferences']} inferences, {t['errors']} errors, "
             f"{t['spool_dropped']} spool drops; {t['sequence_gaps']} sequence gaps on "
             f"{t['with_gaps']} device(s)"]
    if s["versions"]:
        lines += ["", "versions (devices on it now; windows and means over all history):"]
        for v in s["versions"]:
            lines.append(f"  {v['model']}@{v['model_version']}: {v['devices']} device(s), "
                         f"{v['windows']} windows, {v['inferences']} inferences, "
                         f"{v['errors']} errors, mean p95 {_fmt(v['mean_p95_ms'])} ms, "
                         f"mean drift {_fmt(v['mean_drift_score'])}")
    for key, label, unit in (("p95_ms", "worst latest p95", " ms"),
                             ("drift_score", "worst latest drift", "")):
        if s["worst"][key]:
            lines.append(f"{label}: " + ", ".join(f"{w['device_id']} {_fmt(w['value'])}{unit}"
                                                  for w in s["worst"][key]))
    listed = _device_table(s)
    if len(listed) == t["devices"]:
        title = "devices:"
    elif not listed:
        title = "devices needing attention: none (--devices all lists every device)"
    else:
        title = (f"devices needing attention: {t['needing_attention']} ({t['breaching']} "
                 f"breaching a rule, {t['over_budget']} over the p95 budget, {t['drifting']} "
                 f"with drift over {DRIFT_LINE}, {t['with_gaps']} with sequence gaps, "
                 f"{t['states'].get('offline', 0)} offline); the "
                 f"{len(listed)} most urgent (--devices all lists every device, --json too):")
    head = (f"{'device':<16} {'state':<8} {'model@version':<20} {'windows':>7} {'infer':>7} "
            f"{'gaps':>5} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8} {'drift':>7} {'errors':>6}"
            f"  attention")
    lines += ["", title, head, "-" * len(head)]
    for d in listed:
        lat = d["latency_ms"]
        version = f"{d['model']}@{d['model_version']}"
        lines.append(
            f"{d['device_id']:<16} {d['state']:<8} {version:<20} "
            f"{d['windows']:>7} {d['inferences']:>7} {d['sequence_gaps']:>5} "
            f"{_fmt(lat['p50']):>8} {_fmt(lat['p95']):>8} {_fmt(lat['p99']):>8} "
            f"{_fmt(d['drift']['drift_score']):>7} {d['errors']:>6}  "
            f"{'; '.join(d['attention']) or '-'}")
    lines += ["", "(latency and drift: the latest window; gaps: sequence numbers never "
                  "received)", ""]
    for r in s["rollouts"]:
        lines += rollout_lines(r)
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
    parts += [f'<text x="{pad}" y="{h - pad + 14}" font-size="10">{_when(x0)}</text>',
              f'<text x="{w - pad}" y="{h - pad + 14}" font-size="10" '
              f'text-anchor="end">{_when(max(xs))}</text>']
    for i, (name, pts) in enumerate(sorted(series.items())):
        c = colors[i % len(colors)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts)
        parts.append(f'<polyline fill="none" stroke="{c}" stroke-width="1.5" points="{path}"/>')
        if len(pts) <= 48:  # few points: mark them (a single one draws no line)
            parts += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2" fill="{c}"/>'
                      for x, y in pts]
        parts.append(f'<text x="{w - pad + 2 - 100}" y="{30 + 12 * i}" font-size="10" '
                     f'fill="{c}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _plot_series(s: dict[str, Any], key: str, metric: str) -> dict[str, list]:
    """The worst devices' (by `key`) own series of `metric`."""
    out: dict[str, list] = {}
    for w in s["worst"][key]:
        pts = [(p["t"], p[metric]) for p in s["series"].get(w["device_id"], [])
               if p[metric] is not None]
        if pts:
            out[w["device_id"]] = pts
    return out


def _trend_series(s: dict[str, Any], names: dict[str, str]) -> dict[str, list]:
    return {label: [(h["hour_start"], h[col]) for h in s["trend"]["per_hour"]
                    if h[col] is not None] for col, label in names.items()}


def render_html(s: dict[str, Any]) -> str:
    """The page: the fleet's hourly trend over the last TREND_HOURS hours the store has,
    the worst devices' own series, the devices table as in the text, triggers and dead
    letters. Everything plotted is bounded: TREND_HOURS points per fleet line, and WORST
    devices of at most a day of windows each."""
    esc = html.escape
    dev_rows = "".join(
        f"<tr><td>{esc(d['device_id'])}</td><td>{esc(d['state'])}</td>"
        f"<td>{esc(str(d['model']))}@{esc(str(d['model_version']))}</td>"
        f"<td>{d['windows']}</td><td>{d['inferences']}</td><td>{d['sequence_gaps']}</td>"
        f"<td>{_fmt(d['latency_ms']['p50'])}</td><td>{_fmt(d['latency_ms']['p95'])}</td>"
        f"<td>{_fmt(d['latency_ms']['p99'])}</td><td>{_fmt(d['drift']['drift_score'])}</td>"
        f"<td>{d['errors']}</td><td>{esc('; '.join(d['attention']))}</td></tr>"
        for d in _device_table(s))
    trig_rows = "".join(
        f"<tr><td>{_when(t['fired_at'])}</td><td>{esc(t['rule'])}</td><td>{esc(t['scope'])}"
        f"</td><td>{esc(', '.join(t['devices']))}</td><td>{'active' if t['active'] else 'cleared'}"
        f"</td><td>{esc(t['detail'].get('condition', ''))}</td><td>{_fmt(t['command_rc'])}</td>"
        f"</tr>" for t in s["triggers"])
    rollouts = "".join(f"<pre>{esc(chr(10).join(rollout_lines(r)))}</pre>"
                       for r in s["rollouts"]) or "<p>none</p>"
    dead_rows = "".join(
        f"<tr><td>{_when(d['received_at'])}</td><td>{esc(str(d['device_id'] or '-'))}</td>"
        f"<td>{esc(d['reason'])}</td></tr>" for d in s["dead_letters"]["latest"])
    t, hours = s["totals"], s["trend"]["hours"]
    listed = len(s["listed"])
    shown = ("every device" if listed == t["devices"] else
             f"the {listed} needing attention most, of {t['needing_attention']} (the JSON "
             "output lists every device)")
    latency = _svg_lines(f"fleet latency per hour, last {hours} h (ms)", _trend_series(
        s, {"mean_p50_ms": "mean p50", "mean_p95_ms": "mean p95", "max_p95_ms": "max p95"}))
    drift = _svg_lines(f"fleet drift score per hour, last {hours} h (dashed: {DRIFT_LINE})",
                       _trend_series(s, {"mean_drift_score": "mean",
                                         "max_drift_score": "max"}), DRIFT_LINE)
    worst_p95 = _svg_lines(f"p95 per window (ms), the {WORST} devices with the worst latest "
                           "p95", _plot_series(s, "p95_ms", "p95_ms"))
    worst_drift = _svg_lines(f"drift score per window, the {WORST} devices with the worst "
                             f"latest drift (dashed: {DRIFT_LINE})",
                             _plot_series(s, "drift_score", "drift_score"), DRIFT_LINE)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>edgepack fleet</title>
<style>body{{font-family:sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:3px 8px;text-align:right}}</style></head><body>
<h1>Fleet</h1><p>store {esc(s['store'])}, generated {_when(s['generated_at'])}:
{t['devices']} device(s), {t['windows']} windows, {t['inferences']} inferences</p>
<h2>Fleet, per hour</h2><p>All model versions together, from the hourly rollup kept at ingest
(retention does not touch it): per hour, the mean of the windows' p50 and p95, the highest p95,
and the mean and highest drift score, over the last {hours} hours the store has.</p>
{latency}{drift}
<h2>Worst devices</h2><p>Each device's own windows over the day before its latest window; where
retention rolled windows up, its hourly means.</p>{worst_p95}{worst_drift}
<h2>Devices</h2><p>{esc(shown)}</p><table><tr><th>device</th><th>state</th>
<th>model@version</th><th>windows</th><th>inferences</th><th>seq gaps</th><th>p50 ms</th>
<th>p95 ms</th><th>p99 ms</th><th>drift</th><th>errors</th><th>attention</th></tr>{dev_rows}
</table>
<h2>Rollouts</h2>{rollouts}
<h2>Triggers</h2><table><tr><th>fired</th><th>rule</th><th>scope</th><th>devices</th>
<th>state</th><th>condition</th><th>command exit</th></tr>{trig_rows}</table>
<h2>Dead letters</h2><p>{s['dead_letters']['count']} message(s) that could not be stored for
what they contain</p><table><tr><th>received</th><th>device</th><th>reason</th></tr>{dead_rows}
</table></body></html>"""
