"""The build report: one dict (the `--json` file) and the terminal table made from it."""

from __future__ import annotations

from typing import Any


def model_metrics(accuracy: float, size_bytes: int, params: int, macs: int,
                  latency: dict[str, Any]) -> dict[str, Any]:
    return {
        "accuracy": round(accuracy, 6),
        "size_bytes": size_bytes,
        "params": params,
        "macs": macs,
        "latency_ms": latency,
    }


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]


def _stage_table(report: dict[str, Any]) -> list[str]:
    ref = report["reference"]
    rows = [("stage", "precision", "test acc", "size", "params", "MACs", "p50 ms", "speedup",
             "seconds")]
    for st in report["stages"]:
        if "accuracy" not in st:
            rows.append((st["name"], "", "", "", "", "", "", "", f"{st['seconds']:.1f}"))
            continue
        speedup = ref["latency_ms"]["p50"] / st["latency_ms"]["p50"]
        rows.append((st["name"], st["precision"], f"{st['accuracy']:.2%}",
                     _human_bytes(st["size_bytes"]), _count(st["params"]), _count(st["macs"]),
                     f"{st['latency_ms']['p50']:.3f}", f"{speedup:.2f}x",
                     f"{st['seconds']:.1f}"))
    lines = _table(rows)
    for st in report["stages"]:
        if st.get("did"):
            lines.append(f"  {st['name']}: {st['did']}")
    return lines


def render(report: dict[str, Any]) -> str:
    ref, fin = report["reference"], report["final"]
    # first, because every accuracy figure below is measured against that reference
    lines = [f"WARNING: {report['not_learned']}"] if report.get("not_learned") else []
    lines += [f"target {report['target']} -> backend {report['backend']} "
             f"({report['threads']} thread(s)), latency {fin['latency_ms']['source']}", ""]
    lines += _stage_table(report)
    lines.append("")
    lines.append(f"final vs reference: {ref['size_bytes'] / fin['size_bytes']:.1f}x smaller, "
                 f"{ref['latency_ms']['p50'] / fin['latency_ms']['p50']:.2f}x faster (p50), "
                 f"accuracy {fin['accuracy']:.2%} vs {ref['accuracy']:.2%}")
    if est := fin.get("target_latency_ms"):
        lines.append(f"{est['source']} on the target: p50 {est['p50']:.3f} ms, p95 "
                     f"{est['p95']:.3f} ms ({est['method']})")
        if est.get("calibration"):
            lines.append(f"latency cost model: {est['calibration']}")
    lines.append("")
    lines.append("budgets:")
    for b in report["budgets"]:
        status = {True: "ok", False: "MISSED", None: "not checked"}[b["ok"]]
        value = "-" if b["value"] is None else f"{b['value']:.4g}"
        lines.append(f"  {b['name']:<26} limit {b['limit']:<10.4g} value {value:<10} {status}"
                     + (f"  ({b['note']})" if b.get("note") else ""))
    if "best_within_gate" in report:
        best = report["best_within_gate"]
        lines.append("best model within the accuracy gate: " + (
            f"after stage {best['stage']} ({best['accuracy']:.2%}, "
            f"{_human_bytes(best['size_bytes'])}, p50 {best['latency_ms']['p50']:.3f} ms)"
            if best else "none"))
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    lines.append(f"bundle: {report['bundle']}")
    return "\n".join(lines)
