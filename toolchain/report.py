"""The build report: one dict (the `--json` file) and the terminal table made from it."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
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


def budget(name: str, limit: float, value: float | None, note: str = "") -> dict[str, Any]:
    """A budget row; value None means it could not be checked honestly (the note says why)."""
    ok = None if value is None else value <= limit
    row: dict[str, Any] = {"name": name, "limit": limit, "value": value, "ok": ok}
    if note:
        row["note"] = note
    return row


def write_json(path: Path, report: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def _human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _count(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def render(report: dict[str, Any]) -> str:
    ref, fin = report["reference"], report["final"]
    rows = [
        ("", "reference (fp32)", f"final ({report['precision']})"),
        ("accuracy", f"{ref['accuracy']:.2%}", f"{fin['accuracy']:.2%}"),
        ("size", _human_bytes(ref["size_bytes"]), _human_bytes(fin["size_bytes"])),
        ("params", _count(ref["params"]), _count(fin["params"])),
        ("MACs", _count(ref["macs"]), _count(fin["macs"])),
        ("latency p50", f"{ref['latency_ms']['p50']:.3f} ms", f"{fin['latency_ms']['p50']:.3f} ms"),
        ("latency p95", f"{ref['latency_ms']['p95']:.3f} ms", f"{fin['latency_ms']['p95']:.3f} ms"),
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"target {report['target']} -> backend {report['backend']} "
             f"({report['threads']} thread(s)), latency {fin['latency_ms']['source']}"]
    for r in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    lines.append("")
    lines.append("budgets:")
    for b in report["budgets"]:
        status = {True: "ok", False: "MISSED", None: "not checked"}[b["ok"]]
        value = "-" if b["value"] is None else f"{b['value']:.4g}"
        lines.append(f"  {b['name']:<24} limit {b['limit']:<10.4g} value {value:<10} {status}"
                     + (f"  ({b['note']})" if b.get("note") else ""))
    for note in report.get("notes", []):
        lines.append(f"note: {note}")
    lines.append(f"bundle: {report['bundle']}")
    return "\n".join(lines)
