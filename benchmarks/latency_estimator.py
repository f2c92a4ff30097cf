"""How good is the latency estimator on this CPU? Held-out model-zoo architectures, at widths
and input sizes no fit saw, are measured on the host-cpu profile (ONNX Runtime, 2 threads by
default) and estimated with this CPU's own fit (made by the automatic calibration on first use
when there is none, or by the full refit with --refit) and, beside it, with the shipped
reference fit transferred as another CPU's. Prints the error per model, the median absolute
error and the share within +-20% of each.

    .venv/bin/python benchmarks/latency_estimator.py [--refit] [--backend onnxruntime]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import targets
from toolchain.host import detect
from toolchain.latency import costmodel, fitstore, selfcal
from toolchain.latency.calibrate import fit_host, measure_items
from toolchain.latency.micromodels import fit_set, held_out_set
from toolchain.profiles import ProfileSearch


def _summary(errors: list[float]) -> str:
    absolute = [abs(e) for e in errors]
    within = sum(a <= 0.20 for a in absolute) / len(absolute)
    return (f"median absolute error {statistics.median(absolute):.1%}; within +-20%: "
            f"{within:.0%}; worst {max(absolute):.1%}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--refit", action="store_true",
                        help="the full refit on every micro-model (minutes) instead of the "
                             "automatic calibration")
    parser.add_argument("--backend", default=None,
                        help="default: the host profile's first backend")
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    search = ProfileSearch()
    cpu = detect()
    host = search.load(costmodel.HOST_PROFILE)
    args.backend = args.backend or host.backends[0]
    plugin = targets.get(args.backend)
    key = f"{args.backend}/{args.precision}"
    started = time.monotonic()
    if args.refit:
        log(f"fitting {key} on {len(fit_set())} micro-models ...")
        fit_host(fit_set(), args.backend, args.precision, log, search=search)
    else:
        selfcal.ensure_host_fit(args.backend, args.precision, search, log)
    made_s = time.monotonic() - started
    own = fitstore.choose(search, cpu, plugin, args.precision)
    reference = fitstore.reference(search, plugin, args.precision)
    if own is None or not own.native or reference is None:
        sys.exit(f"no fit of this CPU or no reference for {key}: is {selfcal.ENV} off?")
    log(own.describe())
    rows = measure_items(held_out_set(), args.backend, args.precision, host, log)
    own_errors, ref_errors = [], []
    print(f"{'model':<26} {'ops':>4} {'measured ms':>12} {'this CPU ms':>12} {'error':>8} "
          f"{'reference ms':>13} {'error':>8}")
    for m in rows:
        estimated = costmodel.predict_ms(own.fit, m.ops, host, host, native=True)
        from_ref = costmodel.predict_ms(reference.fit, m.ops, host, host, native=False)
        own_errors.append((estimated - m.ms) / m.ms)
        ref_errors.append((from_ref - m.ms) / m.ms)
        print(f"{m.name:<26} {len(m.ops):>4} {m.ms:>12.4f} {estimated:>12.4f} "
              f"{own_errors[-1]:>+8.1%} {from_ref:>13.4f} {ref_errors[-1]:>+8.1%}")
    print(f"held-out models: {len(rows)}")
    print(f"this CPU's fit ({own.fit.method}, {own.fit.models} micro-models, "
          f"{own.fit.wall_s:.0f} s): {_summary(own_errors)}")
    print(f"reference fit ({reference.cpu_description}), transferred: {_summary(ref_errors)}")
    print(f"CPU {cpu.description}, signature {cpu.signature}; profile {host.name}, backend "
          f"{args.backend} {args.precision}, {host.threads} threads; fit made in this run: "
          f"{'yes' if made_s > 1 else 'no'} ({made_s:.0f} s); spread of repeated medians "
          f"(median over models) {statistics.median(m.spread for m in rows):.0%}")


if __name__ == "__main__":
    main()
