"""How good is the latency estimator? Fit the cost model on the micro-models (unless a fit is
stored and --refit is not given), then estimate and measure a held-out set of model-zoo
architectures at widths and input sizes the fit never saw, for the host-cpu profile
(ONNX Runtime, 2 threads). Prints the error per model, the median absolute percentage error
and the share within +-20%; with --repeat, the spread of repeated measurements too.

    .venv/bin/python benchmarks/latency_estimator.py [--refit] [--backend onnxruntime]
"""

from __future__ import annotations

import argparse
import statistics
import sys

from toolchain.latency import costmodel
from toolchain.latency.calibrate import fit_host, measure_items
from toolchain.latency.micromodels import fit_set, held_out_set
from toolchain.profiles import load_profile


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--refit", action="store_true", help="measure the micro-models again")
    parser.add_argument("--backend", default=None,
                        help="default: the host profile's first backend")
    parser.add_argument("--precision", default="fp32")
    args = parser.parse_args()

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    host = load_profile(costmodel.HOST_PROFILE)
    args.backend = args.backend or host.backends[0]
    key = f"{args.backend}/{args.precision}"
    fits = costmodel.load_fits()
    if args.refit or key not in fits:
        log(f"fitting {key} on {len(fit_set())} micro-models ...")
        fit_host(fit_set(), args.backend, args.precision, log)
        fits = costmodel.load_fits()
    fitted = fits[key]
    log(f"fit {key} from {fitted.fit_date}: {fitted.models} models, training median error "
        f"{fitted.train_mape:.1%}")
    rows = measure_items(held_out_set(), args.backend, args.precision, host, log)
    errors = []
    print(f"{'model':<26} {'ops':>4} {'measured ms':>12} {'estimated ms':>13} {'error':>8}")
    for name, ops, measured in rows:
        estimated = costmodel.predict_ms(fitted, ops, host, host)
        error = (estimated - measured) / measured
        errors.append(error)
        print(f"{name:<26} {len(ops):>4} {measured:>12.4f} {estimated:>13.4f} {error:>+8.1%}")
    absolute = [abs(e) for e in errors]
    within = sum(a <= 0.20 for a in absolute) / len(absolute)
    print(f"held-out models: {len(rows)}; median absolute error "
          f"{statistics.median(absolute):.1%}; within +-20%: {within:.0%}; "
          f"worst {max(absolute):.1%}")
    print(f"profile {host.name}, backend {args.backend} {args.precision}, "
          f"{host.threads} threads; fit of {fitted.fit_date} on {fitted.models} micro-models")


if __name__ == "__main__":
    main()
