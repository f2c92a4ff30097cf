"""Budget rows and the JSON reports they go into: shared by the build and latency profiling,
both of which check a profile's budgets and exit 3 when one is missed."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


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


def missed(rows: list[dict[str, Any]]) -> str | None:
    """One line naming every missed budget and by how much, or None when all were met."""
    over = [b for b in rows if b["ok"] is False]
    if not over:
        return None
    return "; ".join(_miss(b) for b in over)


def _miss(row: dict[str, Any]) -> str:
    if reason := row.get("reason"):  # missed for a reason of its own, whatever its value
        return f"{row['name']} not met: {reason}"
    return (f"{row['name']} is {row['value']:.4g}, over its limit {row['limit']:.4g} by "
            f"{row['value'] - row['limit']:.4g}")
