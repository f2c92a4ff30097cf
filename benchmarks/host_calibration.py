"""Does the latency estimate follow the CPU it runs on? On a data folder of its own (a CPU seen
for the first time), the automatic calibration runs as it would on a user's first estimate;
then architectures that are in no fitting set (torchvision's own model code at small sizes,
`tests/families.py`) are measured as `toolchain profile` measures them (a fresh torch-free
process, the host-cpu profile's threads, 300 runs over at least 1 s), 5 times each,
interleaved across the models, keeping the lowest p50 (on a shared 2-core VM one p50 can be
1.5x another minutes later; the calibration keeps its lowest medians too), and estimated for
host-cpu with this CPU's calibrated fit and, for comparison, with the shipped reference fit
transferred as another CPU's. Prints the table, how many are within +-25%, and the
calibration's wall time.

    PYTHONPATH=. .venv/bin/python benchmarks/host_calibration.py [--archs resnet,vit,...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# The four named before measuring, the kinds the issue that asked for this listed: a residual
# CNN, an inverted-residual CNN, a residual CNN with squeeze-excitation, a vision transformer;
# then four more families, reported the same way.
DECLARED = ("resnet", "mobilenet_v2", "regnet", "vit")
ARCHS = (*DECLARED, "shufflenet_v2", "squeezenet", "efficientnet", "mnasnet")
SHAPE = (1, 3, 32, 32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--archs", default=",".join(ARCHS))
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    import torch

    import targets
    from targets.export_log import converter_output_to
    from tests.families import FAMILIES
    from toolchain.host import detect
    from toolchain.latency import costmodel, fitstore, floors, selfcal
    from toolchain.latency.measure import measure_fresh
    from toolchain.profiles import ProfileSearch

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    archs = args.archs.split(",")
    unknown = [a for a in archs if a not in FAMILIES]
    if unknown:
        sys.exit(f"unknown architectures {unknown}; known: {', '.join(FAMILIES)}")
    os.environ[selfcal.ENV] = "auto"  # whatever the caller set: this measures it
    cpu = detect()
    onnx = targets.get("onnxruntime")
    with tempfile.TemporaryDirectory(prefix="edgepack-bench-") as tmp:
        search = ProfileSearch(data_dir=Path(tmp) / "data")
        host = search.load(costmodel.HOST_PROFILE)
        started = time.monotonic()
        line = selfcal.ensure_host_fit("onnxruntime", "fp32", search, log)
        calibration_s = time.monotonic() - started
        own = fitstore.choose(search, cpu, onnx, "fp32")
        reference = fitstore.reference(search, onnx, "fp32")
        if own is None or not own.native or reference is None:
            sys.exit(f"no calibration of this CPU to check: {line}")
        prepared, notes = [], []
        for name in archs:
            folder = Path(tmp) / name
            folder.mkdir()
            torch.manual_seed(0)
            model = FAMILIES[name]().eval()
            with converter_output_to(folder / "export.log"):
                path = onnx.export(model, torch.zeros(SHAPE), folder)
            prepared.append((name, path, onnx.graph_ops(path), []))
        for r in range(args.rounds):
            for name, path, _, p50s in prepared:
                measured = measure_fresh("onnxruntime", path, host.threads, SHAPE, args.runs,
                                         min_seconds=args.min_seconds, warmup=50, samples=True)
                lat = measured["latency_ms"]
                if note := floors.host_stretch_note(lat.pop("samples")):
                    notes.append(f"{name} (round {r + 1}): {note}")
                p50s.append(lat["p50"])
                log(f"round {r + 1}: {name} p50 {lat['p50']:.4f} ms")
        rows = []
        for name, _, ops, p50s in prepared:
            est = costmodel.estimate(ops, host, onnx, "fp32", host, search=search)
            ref = max(costmodel.predict_ms(reference.fit, ops, host, host, native=False),
                      est["lower_bound_ms"])
            macs = sum(o.macs for o in ops if o.kind in ("conv", "depthwise", "matmul"))
            rows.append((name, len(ops), macs, min(p50s), est["p50"], ref, p50s))
    print(f"{'architecture':<14} {'ops':>4} {'M MACs':>7} {'measured p50':>13} "
          f"{'this CPU est.':>14} {'error':>7} {'reference est.':>15} {'error':>7}  "
          "p50 of each round (ms)")
    own_err, ref_err = [], []
    for name, n_ops, macs, p50, est, ref, p50s in rows:
        own_err.append((est - p50) / p50)
        ref_err.append((ref - p50) / p50)
        print(f"{name:<14} {n_ops:>4} {macs / 1e6:>7.2f} {p50:>10.4f} ms {est:>11.4f} ms "
              f"{own_err[-1]:>+7.0%} {ref:>12.4f} ms {ref_err[-1]:>+7.0%}  "
              + ", ".join(f"{t:.4f}" for t in p50s))
    declared = [abs(e) <= 0.25 for (name, *_), e in zip(rows, own_err, strict=True)
                if name in DECLARED]
    if declared:
        print(f"declared architectures ({', '.join(DECLARED)}): {sum(declared)} of "
              f"{len(declared)} within +-25% with this CPU's calibration")
    within = sum(abs(e) <= 0.25 for e in own_err)
    print(f"within +-25% of the measured p50: {within} of {len(rows)} with this CPU's "
          f"calibration (median |error| {statistics.median(map(abs, own_err)):.0%}), "
          f"{sum(abs(e) <= 0.25 for e in ref_err)} of {len(rows)} with the reference fit "
          f"(median |error| {statistics.median(map(abs, ref_err)):.0%})")
    print(f"calibration: {calibration_s:.0f} s wall ({line or 'none needed'})")
    print(f"  {own.describe()}")
    print(f"CPU {cpu.description}, signature {cpu.signature}; host-cpu, onnxruntime fp32, "
          f"{SHAPE}, {host.threads} threads")
    for note in notes:
        print(f"note: {note}")


if __name__ == "__main__":
    main()
