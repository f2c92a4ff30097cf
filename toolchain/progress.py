"""Visible progress on long work: one line when a stage starts, one when it ends (with its
time), and the stage's own lines indented between. Written to stderr, so stdout stays clean
for tables and JSON."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, quiet: bool = False) -> None:
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.timings: list[dict[str, float | str]] = []

    def log(self, message: str) -> None:
        if not self.quiet:
            print(f"    {message}", file=self.stream, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str, detail: str = "") -> Iterator[None]:
        if not self.quiet:
            print(f"[{name}] {detail}".rstrip(), file=self.stream, flush=True)
        start = time.perf_counter()
        try:
            yield
        finally:
            seconds = time.perf_counter() - start
            self.timings.append({"name": name, "seconds": round(seconds, 3)})
        if not self.quiet:
            print(f"[{name}] done in {seconds:.1f} s", file=self.stream, flush=True)
