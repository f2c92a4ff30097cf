"""Fuzz the spool reader far beyond the test suite's examples: arbitrary segment bytes (a
mix of well-formed records with any sequence number and topic, and raw bytes), an arbitrary
ack log and an arbitrary state.json go into a fresh spool folder, which is then opened,
appended to, read back and opened again. Nothing but SpoolError may escape and no open may
take longer than a few seconds; the script prints how many folders ran, how many opened and
how many had pieces quarantined, and exits 1 with hypothesis's smallest failing example
otherwise.

    .venv/bin/python benchmarks/fuzz_spool.py [--examples 5000] [--seed 0]
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# the strategies and the check have one source: the suite's adversarial tests
from hypothesis import Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from runtime.spool import QUARANTINE  # noqa: E402
from tests.adversarial.test_spool_faults import (  # noqa: E402
    SEGMENT_NAMES,
    STATES,
    _open_any,
    _records,
)

HANG_S = 5


def _hang(signum: int, frame: object) -> None:
    raise TimeoutError(f"opening a spool folder took longer than {HANG_S} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=5_000, help="spool folders to try")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.examples < 1:
        ap.error("--examples must be at least 1")
    counts = {"ran": 0, "quarantined": 0}
    logging.disable(logging.WARNING)  # a quarantine warning per folder: counted instead
    signal.signal(signal.SIGALRM, _hang)

    with tempfile.TemporaryDirectory(prefix="fuzz-spool-") as tmp:
        @seed(args.seed)
        @settings(max_examples=args.examples, deadline=None, database=None,
                  phases=[Phase.generate, Phase.shrink])
        @given(_records(), st.binary(max_size=40), STATES, SEGMENT_NAMES)
        def fuzz(seg: bytes, ack: bytes, state: bytes, name: str) -> None:
            folder = Path(tempfile.mkdtemp(dir=tmp))
            counts["ran"] += 1
            signal.alarm(HANG_S)
            try:
                _open_any(folder, seg, ack, state, name)
            finally:
                signal.alarm(0)
            counts["quarantined"] += (folder / QUARANTINE).exists()

        start = time.monotonic()
        try:
            fuzz()
        except Exception as exc:  # noqa: BLE001 - the finding: print it, fail
            print(f"FAILED after {counts['ran']} folders: {type(exc).__name__}: {exc}")
            return 1
    print(f"{counts['ran']} spool folders in {time.monotonic() - start:.1f} s: all opened "
          f"or refused with SpoolError; {counts['quarantined']} had pieces quarantined")
    return 0


if __name__ == "__main__":
    sys.exit(main())
