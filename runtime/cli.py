"""`edge-runtime` (also `python -m runtime`): verify, run and benchmark a bundle on a device."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click
import numpy as np

from runtime.bundle import BundleError
from targets.base import BackendUnavailable

KEY_ENV = "EDGEPACK_SIGNING_KEY"


def _read_key(key_path: Path | None) -> bytes | None:
    if key_path is None and os.environ.get(KEY_ENV):
        key_path = Path(os.environ[KEY_ENV])
    return key_path.read_bytes().strip() if key_path else None


def _load(bundle: Path, key: Path | None, threads: int | None, self_test: bool = True):
    from runtime.model import load

    try:
        return load(bundle, key=_read_key(key), threads=threads, self_test=self_test)
    except (BundleError, BackendUnavailable) as exc:
        raise click.ClickException(f"{bundle}: {exc}") from exc


bundle_arg = click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
key_opt = click.option("--key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                       help=f"signing key file (default: ${KEY_ENV})")


@click.group()
@click.version_option(package_name="edgepack")
def cli() -> None:
    """edgepack device runtime: verify, run and benchmark model bundles."""


@cli.command()
@bundle_arg
@key_opt
def verify(bundle: Path, key: Path | None) -> None:
    """Check archive safety, every file's sha256, the signature when present, then run the
    golden self-test. Exits non-zero on any mismatch."""
    model = _load(bundle, key, None, self_test=False)
    with model:
        result = model.self_test()
        m = model.manifest
        click.echo(f"{bundle}: archive, {len(m['files'])} file hashes and manifest ok"
                   + ("; signature ok" if (model.folder / "signature.json").exists() else ""))
        click.echo(f"model {m['model']['name']} {m['model']['version']} for "
                   f"{m['target']['profile']} ({model.backend}, {m['target']['precision']})")
        click.echo(result.message)
        if not result.ok:
            sys.exit(1)


def _read_inputs(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False), None
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as data:
                if "x" not in data:
                    raise click.UsageError(f"{path} has no array 'x' (arrays: {list(data)})")
                return data["x"], (data["y"] if "y" in data else None)
    except (OSError, ValueError) as exc:
        raise click.UsageError(f"{path}: cannot be read as numpy data ({exc})") from exc
    raise click.UsageError(f"{path}: inputs must be a .npy or .npz file")


@cli.command()
@bundle_arg
@click.option("--input", "input_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=".npy batch, or .npz with 'x' (and optional 'y' labels for accuracy)")
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@key_opt
def run(bundle: Path, input_path: Path, threads: int | None, as_json: bool,
        key: Path | None) -> None:
    """Run the model on a batch of raw inputs and print predictions (and accuracy when the
    inputs carry labels)."""
    x, y = _read_inputs(input_path)
    with _load(bundle, key, threads) as model:
        try:
            ids, confidence = model.classify(x)
        except ValueError as exc:
            raise click.UsageError(str(exc)) from exc
        labels = model.labels
    result: dict = {
        "count": int(len(ids)),
        "predictions": ids.tolist(),
        "labels": [labels[i] if i < len(labels) else str(i) for i in ids.tolist()],
        "confidence": [round(float(c), 6) for c in confidence],
    }
    if y is not None:
        result["accuracy"] = float(np.mean(ids == np.asarray(y).reshape(-1)))
    if as_json:
        click.echo(json.dumps(result))
        return
    for i, (label, conf) in enumerate(zip(result["labels"][:20], confidence[:20], strict=False)):
        click.echo(f"{i:5d}  {label:>12}  {conf:.3f}")
    if len(ids) > 20:
        click.echo(f"... {len(ids) - 20} more")
    if "accuracy" in result:
        click.echo(f"accuracy: {result['accuracy']:.2%} on {len(ids)} labelled inputs")


@cli.command()
@bundle_arg
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="default: the bundle's target thread count")
@click.option("--warmup", type=click.IntRange(min=0), default=20, show_default=True)
@click.option("--runs", type=click.IntRange(min=1), default=200, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@key_opt
def bench(bundle: Path, threads: int | None, warmup: int, runs: int, as_json: bool,
          key: Path | None) -> None:
    """Measure latency at batch 1 on this machine."""
    from runtime.bench import bench_bundle

    try:
        result = bench_bundle(bundle, threads, warmup, runs, key=_read_key(key))
    except (BundleError, BackendUnavailable) as exc:
        raise click.ClickException(f"{bundle}: {exc}") from exc
    if as_json:
        click.echo(json.dumps(result))
        return
    lat = result["latency_ms"]
    click.echo(f"{result['backend']}, {result['threads']} thread(s), batch 1, {lat['runs']} runs")
    click.echo(f"p50 {lat['p50']:.3f} ms  p90 {lat['p90']:.3f}  p95 {lat['p95']:.3f}  "
               f"p99 {lat['p99']:.3f}  (min {lat['min']:.3f}, max {lat['max']:.3f})")
    click.echo(f"cold start {result['cold_start_ms']:.1f} ms, peak RSS "
               f"{result['peak_rss_mb']:.1f} MB")


def main() -> None:
    cli(prog_name="edge-runtime")
