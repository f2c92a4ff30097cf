"""`toolchain profile`'s terminal report and plot."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def render(r: dict[str, Any]) -> str:
    m = r["measured_host"]
    lat = m["latency_ms"]
    est = r.get("estimated_target")
    lines = [f"{r['source']}: {r['backend']} {r['precision']}, {r['threads']} thread(s), "
             f"{r['ops']} ops, {r['macs'] / 1e6:.2f} M MACs", ""]
    head = ("", "this host (measured-host)", f"{r['target']} ({est['source']})" if est else "")
    rows = [head,
            ("p50", f"{lat['p50']:.4f} ms", f"{est['p50']:.4f} ms" if est else ""),
            ("p90", f"{lat['p90']:.4f} ms", ""),
            ("p95", f"{lat['p95']:.4f} ms" + (" (busy host, see note)" if r.get("host_busy")
                                               else ""),
             f"{est['p95']:.4f} ms" if est else ""),
            ("p99", f"{lat['p99']:.4f} ms", ""),
            ("spread (IQR)", f"{lat['iqr']:.4f} ms over {lat['runs']} runs", ""),
            ("cold start", f"{m['cold_start_ms']:.1f} ms", ""),
            ("peak memory", f"{m['peak_rss_mb']:.1f} MiB", ""),
            ("size on disk", f"{m['size_bytes']} bytes", "")]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
              for row in rows]
    host_est = r["estimated_host"]
    error = f"{(host_est['p50'] - lat['p50']) / lat['p50']:+.0%} vs measured"
    fit = host_est.get("fit")
    if fit is None:
        lines.append(f"the estimator here: p50 {host_est['p50']:.4f} ms ({error}; "
                     f"{host_est['method']})")
    elif fit["native"]:
        lines.append(f"the estimator on this host: p50 {host_est['p50']:.4f} ms ({error}; "
                     f"{host_est['method']})")
    else:  # never presented as this host's: it describes another CPU
        lines.append(f"the estimator with the fit from {fit['cpu']} (not this host): p50 "
                     f"{host_est['p50']:.4f} ms ({error})")
    if r.get("calibration"):
        lines.append(f"latency cost model: {r['calibration']}")
    if est:
        lines.append(f"estimate: {est['method']}")
        lines.append(f"lower bound on {r['target']}: {est['lower_bound_ms']:.4f} ms "
                     f"({est['lower_bound_note']})")
        lines.append(f"p95 on {r['target']}: {est['p95_note']}")
    lines += [f"note: {note}" for note in r.get("notes", [])]
    lines.append("")
    if r["layers"]:
        lines.append(f"slowest layers ({r['layers_source']}):")
        for layer in r["layers"]:
            lines.append(f"  {layer['name'][:40]:<40} {layer['type'][:18]:<18} "
                         f"{layer['ms']:.4f} ms {layer['share']:6.1%}")
    else:
        lines.append(f"per-layer times: {r['layers_source']}")
    lines.append("")
    lines.append("budgets:")
    for b in r["budgets"]:
        status = {True: "ok", False: "MISSED", None: "not checked"}[b["ok"]]
        lines.append(f"  {b['name']:<18} limit {b['limit']:<10.4g} value {b['value']:<10.4g} "
                     f"{status}" + (f"  ({b['note']})" if b.get("note") else ""))
    return "\n".join(lines)


def plot(r: dict[str, Any], samples: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    lat = r["measured_host"]["latency_ms"]
    upper = lat["p99"] * 1.5  # a few long stalls would squeeze the whole distribution flat
    beyond = sum(t > upper for t in samples)
    left.hist([t for t in samples if t <= upper], bins=60, color="#4477aa")
    if beyond:
        left.text(0.98, 0.5, f"{beyond} runs above {upper:.3f} ms not shown",
                  transform=left.transAxes, ha="right", fontsize=8)
    for key, style in (("p50", "-"), ("p95", "--"), ("p99", ":")):
        left.axvline(lat[key], color="black", linestyle=style, label=f"{key} {lat[key]:.4f} ms")
    if est := r.get("estimated_target"):
        left.axvline(est["p50"], color="#cc6677", label=f"{r['target']} p50 (estimated)")
    left.set_xlabel("latency (ms), this host")
    left.set_ylabel("runs")
    left.set_title(f"{r['backend']} {r['precision']}, {r['threads']} thread(s)")
    left.legend(fontsize=8)
    layers = r["layers"][::-1]
    if layers:
        right.barh([f"{x['name'][:28]} ({x['type']})" for x in layers],
                   [x["ms"] for x in layers], color="#228833")
        right.set_xlabel("mean time per run (ms)")
        right.set_title(f"slowest layers ({r['layers_source']})")
        right.tick_params(axis="y", labelsize=7)
    else:
        right.text(0.5, 0.5, r["layers_source"], ha="center", va="center", wrap=True)
        right.set_axis_off()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
