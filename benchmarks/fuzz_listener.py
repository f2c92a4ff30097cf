"""Fuzz the listener's message path far beyond the test suite's examples: arbitrary bytes,
arbitrary JSON, and valid window messages with one field replaced by arbitrary JSON go
through `runtime.protocol.validate`, and whatever passes is stored in a real (in-memory)
SQLite store with the default rules. Nothing but MessageRejected may escape; the script
prints how many payloads ran, how many were rejected (with the commonest reasons) and how
many were stored, and exits 1 with hypothesis's smallest failing example otherwise.

    .venv/bin/python benchmarks/fuzz_listener.py [--examples 20000] [--seed 0]
"""

from __future__ import annotations

import argparse
import collections
import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# the message builders and strategies have one source: the suite's adversarial tests
from hypothesis import Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from runtime import protocol  # noqa: E402
from runtime.protocol import MessageRejected  # noqa: E402
from tests.adversarial.test_listener_attacks import (  # noqa: E402
    FIELDS,
    JSON,
    PREFIX,
    TOPIC,
    mutated,
)
from toolchain.fleet.rules import DEFAULT_RULES  # noqa: E402
from toolchain.fleet.store import open_store  # noqa: E402

# a value inside a reason: quoted text, a list or object, a number not part of a word
VALUE = re.compile(r"'[^']*'|\[.*?\]|\{.*?\}|(?<![\w.-])-?\d[\d.e+-]*")
PAYLOADS = st.one_of(
    st.binary(max_size=400),
    JSON.map(lambda v: json.dumps(v).encode()),
    st.builds(mutated, st.sampled_from(FIELDS), JSON, st.integers(1, 2**62)),
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=int, default=20_000, help="payloads to try")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if args.examples < 1:
        ap.error("--examples must be at least 1")
    store = open_store(":memory:")
    counts: collections.Counter[str] = collections.Counter()
    reasons: collections.Counter[str] = collections.Counter()

    @seed(args.seed)
    @settings(max_examples=args.examples, deadline=None, database=None,
              phases=[Phase.generate, Phase.shrink])
    @given(PAYLOADS)
    def fuzz(payload: bytes) -> None:
        counts["ran"] += 1
        try:
            _, msg = protocol.validate(TOPIC, payload, PREFIX)
            store.ingest(msg, time.time(), DEFAULT_RULES)
        except MessageRejected as exc:
            counts["rejected"] += 1
            # the reason without its values: "seq <value> is not ..." is one bucket
            reason = str(exc).removeprefix(f"{TOPIC}: ")
            reasons[VALUE.sub("_", reason)[:90]] += 1
            return
        counts["stored"] += 1

    start = time.monotonic()
    try:
        fuzz()
    except Exception as exc:  # noqa: BLE001 - the finding: print it, fail
        print(f"FAILED after {counts['ran']} payloads: {type(exc).__name__}: {exc}")
        return 1
    took = time.monotonic() - start
    print(f"ran {counts['ran']} payloads in {took:.1f} s: {counts['rejected']} rejected, "
          f"{counts['stored']} stored, 0 other exceptions "
          f"({store.counts()['messages']} messages in the store)")
    for reason, n in reasons.most_common(12):
        print(f"  {n:>7}  {reason}")
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
