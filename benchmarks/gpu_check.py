"""GPU check for the cloud-gpu path, for a machine with a CUDA GPU and torch (not part of the
test run). Trains the demo briefly, then for each GPU path that exists here (AOTInductor,
ONNX Runtime with the CUDA/TensorRT providers, TensorRT): export, check parity with PyTorch
eager on the GPU, and time p50/p95 at batch 1 and 32 against eager. Prints one table.

    python benchmarks/gpu_check.py [--epochs 3] [--runs 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def timed(fn, x, warmup: int, runs: int, sync) -> tuple[float, float]:
    for _ in range(warmup):
        fn(x)
    sync()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn(x)
        sync()
        times.append((time.perf_counter() - t0) * 1000)
    return float(np.percentile(times, 50)), float(np.percentile(times, 95))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        sys.exit("no CUDA GPU: this check needs one")
    import targets
    from runtime.preprocess import apply, normalization
    from targets.export_log import converter_output_to
    from toolchain.build.data import load_data
    from toolchain.build.models import demo_cnn
    from toolchain.build.train import train

    gpu = torch.cuda.get_device_name(0)
    data = load_data("digits", seed=0)
    prep = normalization(data.mean, data.std)
    x_train, x_val, x_test = (apply(prep, x) for x in (data.x_train, data.x_val, data.x_test))
    torch.manual_seed(0)
    model = demo_cnn()
    train(model, x_train, data.y_train, x_val, data.y_val, epochs=args.epochs, seed=0,
          log=lambda m: print(m, file=sys.stderr))
    model = model.eval().cuda()
    x1 = np.ascontiguousarray(x_test[:1])
    x32 = np.ascontiguousarray(x_test[:32])
    sync = torch.cuda.synchronize

    def eager(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(torch.from_numpy(x).cuda()).float().cpu().numpy()

    want = eager(x_test)
    rows = []
    e1, e32 = timed(eager, x1, 20, args.runs, sync), timed(eager, x32, 20, args.runs, sync)
    rows.append(("pytorch eager", "fp32", "-", f"{np.mean(want.argmax(-1) == data.y_test):.2%}",
                 e1, e32))
    with tempfile.TemporaryDirectory() as tmp:
        for name in sorted(b.name for b in targets.BACKENDS.values()
                           if b.capabilities.accelerator == "nvidia-gpu"):
            module = targets.get(name)
            if reason := module.run_unavailable_reason():
                print(f"skipped {name}: {reason}", file=sys.stderr)
                continue
            folder = Path(tmp) / name
            folder.mkdir()
            start = time.perf_counter()
            with converter_output_to(folder / "export.log"):
                path = module.export(model, torch.from_numpy(x1).cuda(), folder)
            built = time.perf_counter() - start
            session = module.open_session(path, 8)
            got = session.run(x_test)
            rel = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
            t1 = timed(session.run, x1, 20, args.runs, sync)
            t32 = timed(session.run, x32, 20, args.runs, sync)
            rows.append((name, "fp32", f"{rel:.1e}",
                         f"{np.mean(got.argmax(-1) == data.y_test):.2%}", t1, t32))
            print(f"{name}: built in {built:.0f} s", file=sys.stderr)
    print(f"GPU: {gpu}, torch {torch.__version__}")
    print(f"{'path':<16} {'prec':<5} {'rel err':<8} {'test acc':<9} {'b1 p50':>8} {'b1 p95':>8} "
          f"{'b32 p50':>8} {'b32 p95':>8}  (ms)")
    for name, prec, rel, acc, (p50_1, p95_1), (p50_32, p95_32) in rows:
        print(f"{name:<16} {prec:<5} {rel:<8} {acc:<9} {p50_1:8.3f} {p95_1:8.3f} {p50_32:8.3f} "
              f"{p95_32:8.3f}")


if __name__ == "__main__":
    main()
