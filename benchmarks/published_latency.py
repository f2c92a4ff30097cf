"""Our latency estimate beside published measurements on real devices.

The published figures are TensorFlow Lite's own table "Performance benchmarks for well known
models", Android section (tensorflow/lite/g3doc/performance/measurement.md, published at
https://www.tensorflow.org/lite/performance/measurement): the native `benchmark_model` binary,
`--num_threads=4`, CPU affinity on the big cores, Android 10, batch 1, 224x224 (SqueezeNet
227x227), column "CPU, 4 threads". The devices are profiles written from their specs in
benchmarks/profiles/ (pixel-3.toml, pixel-4.toml: not build targets).

The architectures are rebuilt here, untrained (latency does not depend on the weights):
MobileNetV1 1.0 from its paper's Table 1 (Howard et al. 2017, arXiv:1704.04861; torchvision has
no MobileNetV1), SqueezeNet 1.0 and 1.1 from torchvision (the table does not say which version
its SqueezeNet is). Each is exported to LiteRT (float) with litert-torch and read by LiteRT's
graph reader, as a build for the smartphone would be; the int8 row prices the same operators
as full-integer int8 (every op int8, a quarter of the bytes), which is what the published
quantized model is, without running our quantizer. Inception-V4, Inception-ResNet-V2 and
NASNet mobile from the same table are not in torchvision and are not rebuilt here.

    PYTHONPATH=. .venv/bin/python benchmarks/published_latency.py [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SOURCE = ("TensorFlow Lite, Performance measurement, 'Performance benchmarks for well known "
          "models' (Android 10, benchmark_model, CPU 4 threads on big cores, batch 1): "
          "https://www.tensorflow.org/lite/performance/measurement")

# (model, precision, device) -> published ms, from the table named in SOURCE
PUBLISHED = {
    ("mobilenet_v1_1.0_224", "fp32", "pixel-3"): 23.9,
    ("mobilenet_v1_1.0_224", "fp32", "pixel-4"): 14.0,
    ("mobilenet_v1_1.0_224", "int8", "pixel-3"): 13.4,
    ("mobilenet_v1_1.0_224", "int8", "pixel-4"): 5.0,
    ("squeezenet", "fp32", "pixel-3"): 35.8,
    ("squeezenet", "fp32", "pixel-4"): 23.9,
}


def mobilenet_v1(num_classes: int = 1000) -> Any:
    """MobileNetV1 1.0 as in Table 1 of its paper: a strided 3x3 convolution, 13 depthwise
    separable blocks (3x3 depthwise + 1x1 pointwise, each with BatchNorm and ReLU6), global
    average pooling and a fully connected layer."""
    from torch import nn

    def block(cin: int, cout: int, stride: int, groups: int = 1, k: int = 3) -> list:
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False),
                nn.BatchNorm2d(cout), nn.ReLU6(inplace=True)]

    layers = block(3, 32, 2)
    plan = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), *[(512, 1)] * 5,
            (1024, 2), (1024, 1)]
    cin = 32
    for cout, stride in plan:
        layers += block(cin, cin, stride, groups=cin) + block(cin, cout, 1, k=1)
        cin = cout
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(1024, num_classes))


def _models() -> dict[str, tuple[Any, int]]:
    from toolchain.build.torchvision_compat import import_torchvision

    tv = import_torchvision()
    return {"mobilenet_v1_1.0_224": (mobilenet_v1(), 224),
            "squeezenet1_0": (tv.models.squeezenet1_0(), 227),
            "squeezenet1_1": (tv.models.squeezenet1_1(), 227)}


def _as_int8(ops: list) -> list:
    """The same operators priced as a full-integer model: int8 arithmetic, a quarter of the
    bytes of float32 tensors."""
    return [dataclasses.replace(op, dtype="int8", bytes=op.bytes // 4) for op in ops]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args()
    import torch

    import targets
    from targets.export_log import converter_output_to
    from toolchain.latency import costmodel, selfcal
    from toolchain.profiles import load_profile, load_profile_file

    litert = targets.get("litert")
    host = load_profile(costmodel.HOST_PROFILE)
    for precision in ("fp32", "int8"):  # the phones' estimates start from this CPU's own fit
        selfcal.ensure_host_fit("litert", precision, log=lambda m: print(m, file=sys.stderr))
    devices = {n: load_profile_file(HERE / "profiles" / f"{n}.toml")
               for n in ("pixel-3", "pixel-4")}
    started = time.perf_counter()
    rows, errors = [], []
    used_fits: set[str] = set()
    for name, (model, size) in _models().items():
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            with converter_output_to(Path(tmp) / "export.log"):
                path = litert.export(model.eval(), torch.zeros(1, 3, size, size), Path(tmp))
            ops = litert.graph_ops(path)
            print(f"{name}: exported and read in {time.perf_counter() - t0:.0f} s, "
                  f"{len(ops)} ops", file=sys.stderr, flush=True)
        macs = sum(o.macs for o in ops if o.kind in ("conv", "depthwise", "matmul"))
        published_name = "squeezenet" if name.startswith("squeezenet") else name
        for precision in ("fp32", "int8"):
            priced = ops if precision == "fp32" else _as_int8(ops)
            for device, profile in devices.items():
                published = PUBLISHED.get((published_name, precision, device))
                if published is None:
                    continue
                est = costmodel.estimate(priced, profile, litert, precision, host,
                                         use_calibration=False)
                used = est["fit"]
                used_fits.add(f"{used['key']} ({used['method']}, {used['fit_date']}, measured "
                              f"on {used['cpu']})")
                error = (est["p50"] - published) / published
                if name != "squeezenet1_1":  # 1.0 is the paper's; 1.1 shown for comparison
                    errors.append(error)
                rows.append((name, precision, device, macs, est["p50"], est["lower_bound_ms"],
                             published, error))
    lines = [f"{'model':<22} {'prec':<5} {'device':<8} {'M MACs':>7} {'estimate ms':>12} "
             f"{'floor ms':>9} {'published ms':>13} {'error':>8}"]
    for name, precision, device, macs, est, floor, published, error in rows:
        lines.append(f"{name:<22} {precision:<5} {device:<8} {macs / 1e6:>7.0f} {est:>12.2f} "
                     f"{floor:>9.3f} {published:>13.1f} {error:>+8.0%}")
    lines.append(f"median absolute error (squeezenet1_0 for SqueezeNet): "
                 f"{statistics.median(abs(e) for e in errors):.0%} over {len(errors)} rows")
    lines.append(f"published: {SOURCE}")
    fits = "; ".join(sorted(used_fits))
    lines.append(f"estimates: cost-model fits {fits}, transferred from host-cpu (read here as "
                 f"{host.device}); profiles benchmarks/profiles/pixel-3.toml, pixel-4.toml")
    lines.append(f"ran in {time.perf_counter() - started:.0f} s")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
