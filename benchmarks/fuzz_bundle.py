"""Fuzz the bundle reader far past what the test suite runs: random bytes, byte-level
mutations of a real bundle, and structural mutations of its manifest JSON (values replaced
with random JSON, keys deleted or renamed). Every case must end in a BundleError (or load
cleanly) with its extraction folder left empty; anything else is a finding, printed with the
seed that reproduces it, and the exit status is 1.

    .venv/bin/python benchmarks/fuzz_bundle.py --bundle demo.edgepack [--count 3000] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import runtime  # noqa: E402
from runtime.bundle import _GZIP_HEADER, MANIFEST, BundleError, extract_bundle  # noqa: E402
from targets.base import BackendUnavailable  # noqa: E402
from tests.adversarial.test_bundle_attacks import _archive, _entries, _info  # noqa: E402


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(8 if depth < 3 else 6)
    if kind == 6:
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    if kind == 7:
        return {random_text(rng): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}
    return [None, rng.random() < 0.5, rng.randint(-2**40, 2**40), rng.uniform(-1e9, 1e9),
            random_text(rng), float(rng.choice(["nan", "inf", "-inf"]))][kind]


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice("ab/.\\\0é-_ ") for _ in range(rng.randrange(10)))


def mutate_manifest(manifest: dict, rng: random.Random) -> dict:
    for _ in range(rng.randint(1, 4)):
        node, key = manifest, None
        while isinstance(node, dict) and node and rng.random() < 0.7:
            key = rng.choice(list(node))
            if not isinstance(node[key], dict) or rng.random() < 0.3:
                break
            node = node[key]
        if key is None or key not in node:
            continue
        action = rng.choice(["replace", "delete", "rename"])
        if action == "replace":
            node[key] = random_json(rng)
        elif action == "delete":
            del node[key]
        else:
            node[rng.choice(["../x", "/etc/passwd", key.upper(), key + "\0", "", "a\\b"])] = \
                node.pop(key)
    return manifest


def one_case(kind: str, rng: random.Random, good: bytes, plain: tuple[dict, dict],
             work: Path) -> bool:
    """Run one case; True when it was refused. Raises on a finding."""
    path = work / "case.edgepack"
    if kind == "random bytes":
        prefix = _GZIP_HEADER if rng.random() < 0.5 else b""
        path.write_bytes(prefix + rng.randbytes(rng.randrange(4096)))
    elif kind == "byte mutation":
        blob = bytearray(good)
        for _ in range(rng.randint(1, 8)):
            blob[rng.randrange(len(blob))] = rng.randrange(256)
        path.write_bytes(bytes(blob[: rng.randrange(len(blob) + 1)] if rng.random() < 0.2
                               else blob))
    else:
        manifest = mutate_manifest(json.loads(json.dumps(plain[0])), rng)
        data = json.dumps(manifest).encode()
        _archive(path, [(_info(MANIFEST, len(data)), data), *_entries(*plain)[1:]])
    dest = work / "out"
    dest.mkdir(exist_ok=True)
    try:
        if kind == "manifest mutation":
            runtime.load(path, workdir=dest).close()
        else:
            extract_bundle(path, dest)
        refused = False
    except (BundleError, BackendUnavailable):
        refused = True
    if refused and any(dest.iterdir()):
        raise AssertionError(f"{kind}: refused, but files were left in the extraction folder")
    for child in dest.iterdir():  # a clean load leaves its files: clear for the next case
        shutil.rmtree(child) if child.is_dir() else child.unlink()
    return refused


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True, help="a good bundle to mutate")
    parser.add_argument("--count", type=int, default=3000, help="cases of each kind")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    good = args.bundle.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        manifest = extract_bundle(args.bundle, work / "plain")
        plain = (json.loads((work / "plain" / MANIFEST).read_bytes()),
                 {n: (work / "plain" / n).read_bytes() for n in manifest.files})
        ran, refused, findings = Counter(), Counter(), 0
        start = time.perf_counter()
        for k, kind in enumerate(("random bytes", "byte mutation", "manifest mutation")):
            for i in range(args.count):
                seed = (args.seed * 3 + k) * 10**9 + i
                try:
                    refused[kind] += one_case(kind, random.Random(seed), good, plain, work)
                except Exception:  # a finding: anything but a clean refusal
                    findings += 1
                    print(f"FINDING ({kind}, seed {seed}):", file=sys.stderr)
                    traceback.print_exc()
                ran[kind] += 1
    seconds = time.perf_counter() - start
    for kind in ran:
        print(f"{kind:18s} ran {ran[kind]:6d}  refused {refused[kind]:6d}")
    print(f"total ran {sum(ran.values())}, refused {sum(refused.values())}, "
          f"findings {findings}, {seconds:.1f} s")
    sys.exit(1 if findings else 0)


if __name__ == "__main__":
    main()
