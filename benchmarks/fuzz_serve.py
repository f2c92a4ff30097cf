"""Fuzz the device endpoint's body decoder and its command parser far beyond the test suite's
examples. Bodies (arbitrary bytes; a real .npy magic followed by arbitrary bytes; arbitrary
JSON under "inputs") go through `runtime.serve.parse_inputs` with both content types; command
payloads (arbitrary bytes, arbitrary JSON, commands with arbitrary ids and args) go through
`runtime.telemetry.handle_command` with the device's own argument checks. Only one-line
ValueErrors may leave the decoder; nothing may leave the command parser, and each result must
stay small. Prints the counts and the commonest refusals; exits 1 with hypothesis's smallest
failing example otherwise.

    .venv/bin/python benchmarks/fuzz_serve.py [--examples 20000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

# the strategies and checks have one source: the suite's adversarial tests
import numpy as np  # noqa: E402
from hypothesis import Phase, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from runtime.serve import parse_inputs  # noqa: E402
from runtime.telemetry import handle_command  # noqa: E402
from tests.adversarial.test_serve_attacks import (  # noqa: E402
    COMMAND_PAYLOADS,
    JSON,
    bounded,
    npy,
    parse_only,
)

VALUE = re.compile(r"'[^']*'|\(.*?\)|(?<![\w.-])-?\d[\d.e+-]*")
NPY_MAGIC = npy(np.zeros((1, 2), np.float32))[:8]
BODIES = st.one_of(
    st.binary(max_size=4096),
    st.binary(max_size=2048).map(lambda b: NPY_MAGIC + b),
    JSON.map(lambda v: json.dumps({"inputs": v}).encode()),
)



def positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--examples", type=positive, default=20_000, help="payloads of each kind")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    fuzzed = settings(max_examples=args.examples, deadline=None, database=None,
                      phases=[Phase.generate, Phase.shrink])

    @seed(args.seed)
    @fuzzed
    @given(BODIES, st.sampled_from(["application/json", "application/x-npy"]))
    def bodies(raw: bytes, content_type: str) -> None:
        counts["bodies"] += 1
        try:
            parse_inputs(raw, content_type)
        except ValueError as exc:
            text = str(exc)
            assert "\n" not in text and len(text) < 600, text
            counts["bodies refused"] += 1
            reasons[f"body: {VALUE.sub('_', text)[-80:]}"] += 1

    @seed(args.seed)
    @fuzzed
    @given(COMMAND_PAYLOADS)
    def commands(raw: bytes) -> None:
        counts["commands"] += 1
        result = bounded(handle_command(raw, parse_only))
        if not result["ok"]:
            counts["commands refused"] += 1
            reasons[f"command: {VALUE.sub('_', result['error'])[:80]}"] += 1

    start = time.monotonic()
    failure = next(filter(None, (first_failure(f) for f in (bodies, commands))), None)
    if failure:
        print(failure)
        return 1
    summary = (f"ran {counts['bodies']} bodies ({counts['bodies refused']} refused) and "
               f"{counts['commands']} commands ({counts['commands refused']} refused) in "
               f"{time.monotonic() - start:.1f} s, 0 other exceptions, every command result "
               "under 2000 bytes")
    print("\n".join([summary, *(f"  {n:>7}  {r}" for r, n in reasons.most_common(14))]))
    return 0


def first_failure(fuzz) -> str | None:
    """Run one hypothesis fuzzer; its finding as a line, or None."""
    try:
        fuzz()
    except Exception as exc:  # noqa: BLE001 - the finding: report it
        return f"FAILED in {fuzz.__name__}: {type(exc).__name__}: {exc}"
    return None

if __name__ == "__main__":
    sys.exit(main())
