"""What the runtime adds to a backend's own inference, measured in one run on this machine:
`edge-runtime bench --threads 1` (Model.predict on a raw input: checks, normalization,
quantization, the backend's call, dequantization) against each backend's reference on the
very same model file, at 1 thread and batch 1, in interleaved rounds, medians of the rounds.

Two tables:
- fresh processes, interleaved: `edge-runtime bench` against the backend's own tool on the
  bundle's model file: LiteRT's `litert-benchmark --num_threads 1` (its median, printed to
  0.01 ms), OpenVINO's `benchmark_app` (sync, 1 stream, 1 thread, shape fixed at batch 1);
- one process, interleaved: Model.predict on a raw input against a bare loop on the same
  file: for LiteRT the calls litert-benchmark times (CompiledModel.run_by_name on
  preallocated buffers), timed to the microsecond; ONNX Runtime InferenceSession.run and
  OpenVINO InferRequest.infer (the model as shipped) on a preprocessed input.

Default bundles, built first (a few minutes): the demo for smart-speaker (LiteRT int8), a
wider CNN for smart-speaker of about 1 ms (LiteRT int8, this file's `wide_cnn`, unpruned),
host-cpu (ONNX Runtime fp32) and edge-x86 (OpenVINO int8).

    .venv/bin/python benchmarks/runtime_overhead.py [--bundle B.edgepack ...] [--rounds 5]

Run it with the torch-free runtime environment beside the toolchain's (EDGEPACK_RUNTIME_VENV,
default .venv-runtime) so both sides run where a device would.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BIN = Path(sys.executable).parent
WIDE_RECIPE = """[prune]
enabled = false
[distill]
enabled = false
[quantize]
precision = "int8"
[gate]
max_accuracy_drop_points = 100.0
"""


def wide_cnn(in_channels: int = 1, num_classes: int = 10) -> object:
    """The demo CNN four times wider: about 190 M MACs, a millisecond or more at 1 thread."""
    from toolchain.build.models import demo_cnn

    return demo_cnn(in_channels, num_classes, width=128)


# -- the bare loops, run beside Model.predict in one process (`--compare BUNDLE`) ------------

def _timed(call: Callable[[], object], warmup: int, runs: int) -> float:
    for _ in range(warmup):
        call()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1000.0


def loop_litert(model: Path) -> Callable[[], object]:
    """What litert-benchmark times, with the same calls (ai_edge_litert.tools.
    benchmark_litert_model)."""
    from ai_edge_litert.compiled_model import CompiledModel
    from ai_edge_litert.environment import Environment, EnvironmentOptions
    from ai_edge_litert.hardware_accelerator import HardwareAccelerator
    from ai_edge_litert.options import CpuOptions, Options

    env = Environment.create(options=EnvironmentOptions())
    compiled = CompiledModel.from_file(
        str(model), environment=env,
        options=Options(hardware_accelerators=HardwareAccelerator(HardwareAccelerator.CPU),
                        cpu_options=CpuOptions(num_threads=1)))
    sig = next(iter(compiled.get_signature_list()))
    inputs = {n: compiled.create_input_buffer_by_name(sig, n)
              for n in compiled.get_input_tensor_details(sig)}
    outputs = {n: compiled.create_output_buffer_by_name(sig, n)
               for n in compiled.get_output_tensor_details(sig)}
    return lambda: compiled.run_by_name(sig, inputs, outputs)


def loop_onnxruntime(model: Path) -> Callable[[], object]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    arg = session.get_inputs()[0]
    x = np.random.default_rng(0).standard_normal(
        [1, *arg.shape[1:]]).astype(np.float32)
    feed, names = {arg.name: x}, [session.get_outputs()[0].name]
    return lambda: session.run(names, feed)


def loop_openvino(model: Path) -> Callable[[], object]:
    import openvino as ov

    compiled = ov.Core().compile_model(str(model), "CPU", {
        "INFERENCE_NUM_THREADS": 1, "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_PRECISION_HINT": "f32"})
    shape = [d.get_length() if d.is_static else 1 for d in compiled.input(0).get_partial_shape()]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    request = compiled.create_infer_request()
    return lambda: request.infer({0: x})


LOOPS = {"litert": loop_litert, "onnxruntime": loop_onnxruntime, "openvino": loop_openvino}


def compare_in_process(bundle: Path, rounds: int, warmup: int, runs: int) -> dict:
    """Model.predict on a raw input against the bare loop on the same model file, both in
    this process, interleaved: the medians of the rounds' medians, in ms."""
    from runtime.model import load

    model = load(bundle, threads=1, self_test=False)
    try:
        x = np.zeros((1, *model.raw_shape), dtype=np.float32)
        calls = {"Model.predict": lambda: model.predict(x),
                 "bare loop": LOOPS[model.backend](model.folder / model.manifest.model_file)}
        got: dict[str, list[float]] = {name: [] for name in calls}
        for r in range(rounds):
            for name in (list(calls) if r % 2 == 0 else list(calls)[::-1]):
                got[name].append(_timed(calls[name], warmup, runs))
        return {name: statistics.median(v) for name, v in got.items()}
    finally:
        model.close()


# -- the measurements, each one command ------------------------------------------------------

def runtime_python() -> str:
    venv = Path(os.environ.get("EDGEPACK_RUNTIME_VENV", REPO / ".venv-runtime"))
    python = venv / "bin" / "python"
    return str(python) if python.exists() else sys.executable


def _run(cmd: list[str | Path], timeout: float = 600) -> str:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([str(c) for c in cmd], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(map(str, cmd))} failed:\n{proc.stderr[-2000:]}")
    return proc.stdout


def edge_bench(bundle: Path, warmup: int, runs: int) -> float:
    out = _run([runtime_python(), "-m", "runtime", "bench", bundle, "--threads", "1",
                "--warmup", warmup, "--runs", runs, "--json"])
    return json.loads(out)["latency_ms"]["p50"]


def in_process(bundle: Path, rounds: int, warmup: int, runs: int) -> dict:
    out = _run([runtime_python(), Path(__file__), "--compare", bundle, "--rounds", rounds,
                "--warmup", warmup, "--runs", runs])
    return json.loads(out)


def litert_benchmark(model: Path, warmup: int, runs: int, folder: Path) -> float:
    result = folder / "litert-benchmark.json"
    _run([Path(runtime_python()).parent / "litert-benchmark", "--model", model,
          "--num_threads", "1", "--warmup_runs", warmup, "--num_runs", runs,
          "--result_json", result])
    return json.loads(result.read_text())["latency"]["median_ms"]


def benchmark_app(model: Path, shape: list[int], runs: int) -> float:
    out = _run([Path(runtime_python()).parent / "benchmark_app", "-m", model, "-d", "CPU",
                "-hint", "none", "-nstreams", "1", "-nthreads", "1", "-api", "sync",
                "-niter", runs, "-infer_precision", "f32",
                "-shape", "[" + ",".join(map(str, shape)) + "]"])
    found = re.search(r"Median:\s+([0-9.]+)\s+(us|ms)", out)
    if not found:
        sys.exit(f"benchmark_app printed no median:\n{out[-2000:]}")
    value = float(found.group(1))
    return value / 1000.0 if found.group(2) == "us" else value


# -- bundles -----------------------------------------------------------------------------------

def build(target: str, folder: Path, *extra: str) -> Path:
    out = folder / (target + ("-wide" if extra else ""))
    proc = subprocess.run([BIN / "toolchain", "build", "--target", target, "--out", out,
                           "--quiet", *extra], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    if proc.returncode not in (0, 3):  # 3: a budget missed (size, on a wide model): fine
        sys.exit(f"build for {target} failed:\n{proc.stderr[-2000:]}")
    return next(out.glob("*.edgepack"))


def default_bundles(folder: Path) -> list[Path]:
    recipe = folder / "wide.toml"
    recipe.write_text(WIDE_RECIPE)
    return [build("smart-speaker", folder),
            build("smart-speaker", folder, "--model", f"{Path(__file__)}:wide_cnn",
                  "--recipe", str(recipe), "--epochs", "1"),
            build("host-cpu", folder), build("edge-x86", folder)]


def model_of(bundle: Path, folder: Path) -> tuple[str, Path, list[int]]:
    """The bundle's backend, its model file (extracted, verified) and its input shape."""
    from runtime.bundle import extract_bundle

    manifest = extract_bundle(bundle, folder)
    shape = [1, *manifest.input.raw_shape]
    return manifest.target.backend, folder / manifest.model_file, shape


# -- one run -----------------------------------------------------------------------------------

def measure(bundle: Path, rounds: int, warmup: int, runs: int, folder: Path) -> dict:
    backend, model, shape = model_of(bundle, folder / bundle.stem)
    tools = {"edge-runtime bench": lambda: edge_bench(bundle, warmup, runs)}
    if backend == "litert":
        tools["litert-benchmark"] = lambda: litert_benchmark(model, warmup, runs, folder)
    if backend == "openvino":
        tools["benchmark_app"] = lambda: benchmark_app(model, shape, runs)
    got: dict[str, list[float]] = {name: [] for name in tools}
    names = list(tools)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # rotate the order
            got[name].append(tools[name]())
    medians = {name: statistics.median(v) for name, v in got.items()}
    medians.update(in_process(bundle, rounds, warmup, runs))
    return {"bundle": bundle.name, "backend": backend, "rounds": rounds, "runs": runs,
            "ms": medians, "fresh_process_ms": got}


def print_table(rows: list[dict]) -> None:
    print("fresh processes: `edge-runtime bench --threads 1` against the backend's own tool")
    print(f"{'bundle':34} {'backend':12} {'edge p50 us':>11} {'tool median us':>14} "
          f"{'ratio':>6}  tool")
    for row in rows:
        ms = row["ms"]
        tool = next((k for k in ("litert-benchmark", "benchmark_app") if k in ms), None)
        edge = ms["edge-runtime bench"]
        print(f"{row['bundle'][:34]:34} {row['backend']:12} {edge * 1000:>11.1f} "
              + (f"{ms[tool] * 1000:>14.1f} {edge / ms[tool]:>6.3f}  {tool}" if tool
                 else f"{'-':>14} {'-':>6}  (none)"))
    print()
    print("one process: Model.predict (raw input) against the bare loop on the same file")
    print(f"{'bundle':34} {'backend':12} {'predict us':>11} {'bare loop us':>14} {'ratio':>6}")
    for row in rows:
        ms = row["ms"]
        predict, bare = ms["Model.predict"], ms["bare loop"]
        print(f"{row['bundle'][:34]:34} {row['backend']:12} {predict * 1000:>11.1f} "
              f"{bare * 1000:>14.1f} {predict / bare:>6.3f}")
    print(f"\n(1 thread, batch 1; medians of {rows[0]['rounds']} interleaved rounds of "
          f"{rows[0]['runs']} timed runs. litert-benchmark prints its median to 0.01 ms; "
          "benchmark_app reports the request's own latency, measured in C++: the Python "
          "call around it is not in its figure. Bare loops: LiteRT the CompiledModel calls "
          "litert-benchmark times, ONNX Runtime InferenceSession.run, OpenVINO "
          "InferRequest.infer on the model as shipped.)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bundle", type=Path, action="append", default=None,
                        help="a bundle to measure (repeatable); default: build the four")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--runs", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    parser.add_argument("--compare", type=Path, default=None,
                        help=argparse.SUPPRESS)  # internal: the in-process rounds, JSON out
    args = parser.parse_args()
    if args.compare:
        print(json.dumps(compare_in_process(args.compare, args.rounds, args.warmup,
                                            args.runs)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        bundles = args.bundle or default_bundles(folder / "build")
        rows = [measure(b, args.rounds, args.warmup, args.runs, folder) for b in bundles]
    print_table(rows)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
