"""`edge-runtime` (also `python -m runtime`): verify, run and benchmark a bundle on a device."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

import click
import numpy as np

from runtime import protocol
from runtime.bundle import BundleError
from runtime.cli_common import apply_options, broker_config, broker_options, stop_on_signals
from targets.base import BackendUnavailable

KEY_ENV = "EDGEPACK_SIGNING_KEY"  # the retired HMAC key: refused, never read
TRUST_ENV = "EDGEPACK_TRUST"


class ConfigError(click.ClickException):
    """A usage error in one line (exit 2), without click's usage banner."""

    exit_code = 2


def _trust(trust_path: Path | None, key_path: Path | None):
    """The trust store the options name. The retired HMAC key (--key or $EDGEPACK_SIGNING_KEY)
    is refused rather than ignored, so a device that verified with it never silently starts
    accepting unsigned bundles."""
    from runtime.signing import RETIRED, TrustFileError, load_trust

    if key_path is not None or (trust_path is None and os.environ.get(KEY_ENV)):
        where = "--key" if key_path is not None else f"${KEY_ENV}"
        raise ConfigError(f"{where}: {RETIRED} (--trust FILE or ${TRUST_ENV})")
    if trust_path is None:
        return None
    try:
        return load_trust(trust_path)
    except TrustFileError as exc:
        raise ConfigError(str(exc)) from exc


def _load(bundle: Path, trust, threads: int | None, self_test: bool = True):
    from runtime.model import load

    try:
        return load(bundle, trust=trust, threads=threads, self_test=self_test)
    except (BundleError, BackendUnavailable) as exc:
        raise refused(bundle, exc) from exc


def refused(bundle: Path, exc: Exception) -> click.ClickException:
    """A refused bundle as one line (exit 1), naming the bundle once."""
    message = " ".join(str(exc).split())
    return click.ClickException(message if message.startswith(f"{bundle}:")
                                else f"{bundle}: {message}")


class BadInput(click.ClickException):
    """Inputs that cannot be run: a usage error (exit 2), as one line without the usage."""

    exit_code = 2


bundle_arg = click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))


def trust_opts(func):
    """--trust, and the retired --key kept only to refuse it with the way forward."""
    return apply_options(func, [
        click.option("--trust", "trust_path", envvar=TRUST_ENV,
                     type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="trust file (TOML) of Ed25519 public keys: the bundle must be signed "
                          f"by one that is not revoked (default: ${TRUST_ENV})"),
        click.option("--key", "key_path", type=click.Path(dir_okay=False, path_type=Path),
                     hidden=True, help="retired (HMAC shared key): use --trust"),
    ])


@click.group()
@click.version_option(package_name="edgepack")
def cli() -> None:
    """edgepack device runtime: verify, run and benchmark model bundles."""


@cli.command()
@bundle_arg
@trust_opts
def verify(bundle: Path, trust_path: Path | None, key_path: Path | None) -> None:
    """Check archive safety, every file's sha256, the signature (against --trust), then run
    the golden self-test. Exits non-zero on any mismatch."""
    from runtime.signing import read_signature

    trust = _trust(trust_path, key_path)
    model = _load(bundle, trust, None, self_test=False)
    with model:
        result = model.self_test()
        m = model.manifest
        sig_path = model.folder / "signature.json"
        record = read_signature(sig_path.read_bytes()) if sig_path.exists() else None
        if trust is not None:
            assert record is not None  # load() refused unsigned bundles
            name = trust.keys[record.key_id].name
            signature = f"signature ok (key {record.key_id}, {name})"
        elif record is not None:
            signature = (f"signed by key {record.key_id}, signature NOT checked "
                         "(no --trust file)")
        else:
            signature = "unsigned, signature NOT checked (no --trust file)"
        click.echo(f"{bundle}: archive, {len(m.files)} file hashes and manifest ok; "
                   + signature)
        click.echo(f"model {m.model.name} {m.model.version} for "
                   f"{m.target.profile} ({model.backend}, {m.target.precision})")
        click.echo(result.message)
        if not result.ok:
            sys.exit(1)


def _read_inputs(path: Path) -> tuple[np.ndarray, np.ndarray | None]:
    """The raw inputs (and labels) of a .npy or .npz file: numeric arrays whose headers are
    checked before loading (no pickles, no objects, bounded size), finite inputs."""
    from runtime.contents import ContentError, check_finite, load_npy, load_npz

    try:
        if path.suffix == ".npy":
            x, y = load_npy(path), None
        elif path.suffix == ".npz":
            arrays = load_npz(path, ("x", "y"))
            if "x" not in arrays:
                raise BadInput(f"{path} has no array 'x' (a .npz of inputs holds 'x' "
                                       "and optionally 'y' labels)")
            x, y = arrays["x"], arrays.get("y")
        else:
            raise BadInput(f"{path}: inputs must be a .npy or .npz file")
        check_finite(x, str(path))
    except ContentError as exc:
        raise BadInput(str(exc)) from exc
    if y is not None and y.dtype.kind not in "biu":
        raise BadInput(f"{path}: labels 'y' must be integers (got dtype {y.dtype})")
    return x, y


def _read_audio(paths: list[Path]) -> list[tuple[np.ndarray, int | None]]:
    """WAV files or raw 16-bit little-endian PCM (.pcm, .raw) -> (samples, sample rate; None
    for PCM: the bundle's), read before the bundle loads (runtime.audio: size-capped, one
    line of error)."""
    from runtime import audio

    out = []
    for path in paths:
        try:
            if path.stat().st_size > audio.MAX_AUDIO_BYTES:
                raise ValueError(f"{path}: {path.stat().st_size} bytes, at most "
                                 f"{audio.MAX_AUDIO_BYTES}")
            data = path.read_bytes()
            out.append(audio.read_wav(data, str(path)) if path.suffix.lower() in
                       (".wav", ".wave") else (audio.read_pcm(data, str(path)), None))
        except (OSError, ValueError) as exc:
            raise BadInput(" ".join(str(exc).split())) from exc
    return out


def _clips(recordings: list[tuple[np.ndarray, int | None]], spec: dict) -> np.ndarray:
    """The recordings as a batch of clips for the bundle's log-mel record."""
    from runtime import audio

    if spec.get("kind") != "log-mel":
        raise BadInput(f"this bundle takes {spec.get('kind')!r} inputs, not audio (give a .npy "
                       "or .npz with --input)")
    try:
        return np.stack([audio.to_clip(x, rate or int(spec["sample_rate"]), spec)
                         for x, rate in recordings])
    except ValueError as exc:  # a rate pair it cannot resample between, say
        raise BadInput(" ".join(str(exc).split())) from exc


@cli.command()
@bundle_arg
@click.argument("inputs", nargs=-1,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--input", "input_path", default=None,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=".npy batch, or .npz with 'x' (and optional 'y' labels for accuracy)")
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--json", "as_json", is_flag=True, help="print the result as JSON")
@trust_opts
def run(bundle: Path, inputs: tuple[Path, ...], input_path: Path | None, threads: int | None,
        as_json: bool, trust_path: Path | None, key_path: Path | None) -> None:
    """Run the model on a batch of raw inputs and print predictions (and accuracy when the
    inputs carry labels). INPUTS: a .npy/.npz file (as --input), or for an audio bundle WAV
    files or raw 16-bit little-endian mono PCM (.pcm, .raw) at the bundle's sample rate,
    one clip each."""
    from runtime.audio import AUDIO_SUFFIXES

    trust = _trust(trust_path, key_path)
    paths = [*([input_path] if input_path else []), *inputs]
    sound = [p.suffix.lower() in AUDIO_SUFFIXES for p in paths]
    if not paths:
        raise ConfigError("give the inputs: --input FILE (.npy or .npz), or WAV/PCM files "
                          "for an audio bundle")
    if any(sound) and not all(sound) or not any(sound) and len(paths) > 1:
        raise ConfigError("give one .npy/.npz file, or audio files only (.wav, .pcm, .raw)")
    recordings = _read_audio(paths) if any(sound) else None
    x, y = (None, None) if any(sound) else _read_inputs(paths[0])
    with _load(bundle, trust, threads) as model:
        if recordings is not None:
            x = _clips(recordings, model.manifest.input.preprocessing)
        try:
            ids, confidence = model.classify(x)
        except ValueError as exc:
            raise BadInput(str(exc)) from exc
        labels = model.labels
    result: dict = {
        "count": int(len(ids)),
        "predictions": ids.tolist(),
        "labels": [labels[i] if i < len(labels) else str(i) for i in ids.tolist()],
        "confidence": [round(float(c), 6) for c in confidence],
    }
    if y is not None:
        if y.size != len(ids):
            raise BadInput(f"{input_path}: {y.size} labels 'y' for {len(ids)} inputs: "
                                   "give one label per input")
        result["accuracy"] = float(np.mean(ids == np.asarray(y).reshape(-1)))
    if any(sound):
        result["files"] = [str(p) for p in paths]
    if as_json:
        click.echo(json.dumps(result))
        return
    for i, (label, conf) in enumerate(zip(result["labels"][:20], confidence[:20], strict=False)):
        click.echo(f"{i:5d}  {label:>12}  {conf:.3f}" + (f"  {paths[i]}" if any(sound) else ""))
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
@trust_opts
def bench(bundle: Path, threads: int | None, warmup: int, runs: int, as_json: bool,
          trust_path: Path | None, key_path: Path | None) -> None:
    """Measure latency at batch 1 on this machine."""
    from runtime.bench import bench_bundle

    trust = _trust(trust_path, key_path)
    try:
        result = bench_bundle(bundle, threads, warmup, runs, trust=trust)
    except (BundleError, BackendUnavailable) as exc:
        raise refused(bundle, exc) from exc
    if as_json:
        click.echo(json.dumps(result))
        return
    lat = result["latency_ms"]
    click.echo(f"{result['backend']}, {result['threads']} thread(s), batch 1, {lat['runs']} runs")
    click.echo(f"p50 {lat['p50']:.3f} ms  p90 {lat['p90']:.3f}  p95 {lat['p95']:.3f}  "
               f"p99 {lat['p99']:.3f}  (min {lat['min']:.3f}, max {lat['max']:.3f})")
    click.echo(f"cold start {result['cold_start_ms']:.1f} ms, peak RSS "
               f"{result['peak_rss_mb']:.1f} MB")



# -- telemetry: serve and replay ---------------------------------------------------------------
def default_spool(device_id: str) -> Path:
    state = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state")
    return state / "edgepack" / "spool" / device_id


def telemetry_options(func):
    """The device, spool and window options `serve` and `replay` share, and the broker's."""
    return apply_options(func, [
        click.option("--device-id", required=True, help="this device's id in the fleet"),
        click.option("--spool", "spool_dir", type=click.Path(file_okay=False, path_type=Path),
                     default=None, help="on-disk outbox (default: "
                                        "$XDG_STATE_HOME/edgepack/spool/DEVICE_ID)"),
        click.option("--spool-max-mb", type=click.FloatRange(min=0.0625), default=64.0,
                     show_default=True, help="size cap; when full the oldest records are "
                                             "dropped, counted and reported"),
        click.option("--fsync", type=click.Choice(["always", "interval", "never"]),
                     default="interval", show_default=True,
                     help="when spool writes reach the disk: every record, once a second, "
                          "or when the OS decides"),
        click.option("--prefix", default=protocol.DEFAULT_PREFIX, show_default=True,
                     help="topic prefix"),
        click.option("--window-seconds", type=click.FloatRange(min=0.01), default=60.0,
                     show_default=True, help="send a telemetry window at least this often"),
        click.option("--window-inferences", type=click.IntRange(min=1), default=1000,
                     show_default=True, help="... or after this many inferences"),
        click.option("--ack", type=click.Choice(["listener", "broker"]), default="listener",
                     show_default=True,
                     help="a record leaves the spool when a listener has stored it (end to "
                          "end), or as soon as the broker has it (a fleet without our "
                          "listener)"),
        click.option("--ack-timeout", type=click.FloatRange(min=0, min_open=True),
                     default=30.0, show_default=True,
                     help="--ack listener: send a record again when no listener acknowledged "
                          "it this many seconds after the broker did"),
        click.option("--capture-rate", type=click.FloatRange(0, 1), default=0.0,
                     show_default=True,
                     help="share of inferences whose inputs (with prediction, confidence and "
                          "feedback label) are sent for training data; 0: nothing leaves "
                          "the device"),
        click.option("--capture-max-mb", type=click.FloatRange(min=0, min_open=True),
                     default=16.0, show_default=True,
                     help="capture at most this many MiB of inputs, then stop"),
        broker_options(required=False),
        click.option("--threads", type=click.IntRange(min=1), default=None),
        trust_opts,
    ])


def open_device(bundle: Path, o: dict):
    import logging

    from runtime.capture import check_options
    from runtime.device import Device
    from runtime.spool import SpoolError

    try:
        protocol.check_names(o["device_id"], o["prefix"])
        check_options(o["capture_rate"], o["capture_max_mb"])
    except ValueError as exc:
        raise click.UsageError(str(exc)) from exc
    trust = _trust(o["trust_path"], o["key_path"])
    broker = broker_config(o)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    try:
        return Device.open(
            bundle, device_id=o["device_id"], spool_dir=o["spool_dir"] or default_spool(
                o["device_id"]), broker=broker, trust=trust, threads=o["threads"],
            prefix=o["prefix"], window_seconds=o["window_seconds"],
            window_inferences=o["window_inferences"], fsync=o["fsync"],
            spool_max_bytes=int(o["spool_max_mb"] * 2**20), ack=o["ack"],
            ack_timeout_s=o["ack_timeout"], capture_rate=o["capture_rate"],
            capture_max_mb=o["capture_max_mb"])
    except (BundleError, BackendUnavailable, SpoolError) as exc:
        raise click.ClickException(f"{bundle}: {exc}") from exc


@cli.command()
@bundle_arg
@click.option("--http", "http_addr", default="127.0.0.1:8080", show_default=True,
              metavar="HOST:PORT", help="local HTTP endpoint (port 0 picks a free one)")
@click.option("--socket", "socket_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="serve on this Unix socket instead of HTTP on TCP")
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=10.0,
              show_default=True, help="on shutdown, wait this long for the spool to drain")
@telemetry_options
def serve(bundle: Path, http_addr: str, socket_path: Path | None, drain_timeout: float,
          **o) -> None:
    """Serve BUNDLE on a local endpoint and report telemetry. POST /v1/predict with JSON
    {"inputs": [...]} or a .npy body; POST /v1/feedback {"inference_id": ID, "label": L}
    with the true label of an inference; GET /v1/health. Stops on SIGTERM or Ctrl-C."""
    from runtime.serve import check_socket_path, http_address, make_server

    where = str(socket_path or http_addr)
    where = where if len(where) <= 80 else where[:80] + "..."
    try:  # before the model loads: a wrong address is a usage error at once
        if socket_path:
            check_socket_path(socket_path)
        else:
            http_address(http_addr)
    except (OSError, ValueError) as exc:
        raise click.UsageError(f"cannot listen on {where}: {exc}") from exc
    stop = stop_on_signals()
    device = open_device(bundle, o)
    try:
        server = make_server(device, http=http_addr, socket_path=socket_path)
    except (OSError, ValueError) as exc:
        device.close(0)
        raise click.UsageError(f"cannot listen on {where}: {exc}") from exc
    where = (f"unix:{socket_path}" if socket_path
             else "http://{}:{}".format(*server.server_address[:2]))
    click.echo(f"serving {device.info['model']} {device.info['version']} "
               f"({device.info['backend']}) on {where}", err=True)
    if device.bundle_path != bundle:
        click.echo(f"(the bundle a reload command installed over {bundle}: "
                   f"{device.bundle_path})", err=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    while not stop.wait(0.5):  # a timed wait: the signal handler runs between waits
        pass
    server.shutdown()
    server.server_close()
    stats = device.close(drain_timeout)
    click.echo(f"stopped; spool: {stats['pending']} pending, {stats['dropped']} dropped"
               if stats else "stopped", err=True)


@cli.command()
@bundle_arg
@click.option("--inputs", "input_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help=".npy batch, or .npz with 'x' (and 'y' labels for --feedback-share)")
@click.option("--feedback-share", type=click.FloatRange(0, 1), default=0.0,
              show_default=True,
              help="report the true label ('y') of this share of the inferences as feedback")
@click.option("--rate", type=click.FloatRange(min=0, min_open=True), default=None,
              help="inferences per second (default: as fast as it goes)")
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--repeat", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--drain-timeout", type=click.FloatRange(min=0), default=30.0,
              show_default=True, help="wait this long at the end for the spool to drain")
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@telemetry_options
def replay(bundle: Path, input_path: Path, feedback_share: float, rate: float | None,
           batch: int, repeat: int, drain_timeout: float, as_json: bool, **o) -> None:
    """Push recorded inputs through BUNDLE on the serving path, with telemetry: for demos,
    tests and shadow runs. Exits 1 if the spool did not drain in time (nothing is lost:
    the next run sends it)."""
    from runtime.serve import replay as run_replay

    x, y = _read_inputs(input_path)
    if feedback_share:
        if y is None:
            raise BadInput(f"{input_path}: --feedback-share needs labels: a .npz with 'y'")
        if y.size != len(x):
            raise BadInput(f"{input_path}: {y.size} labels 'y' for {len(x)} inputs: give "
                           "one label per input")
        y = y.reshape(-1)
    stop = stop_on_signals()
    device = open_device(bundle, o)
    if x.shape[1:] != device.model.raw_shape:
        device.close(0)
        raise click.UsageError(f"{input_path}: samples of shape {x.shape[1:]} do not fit the "
                               f"model, which takes {device.model.raw_shape}")
    classes = len(device.model.labels)
    if feedback_share and not (0 <= int(y.min()) and int(y.max()) < classes):
        device.close(0)
        raise click.UsageError(f"{input_path}: labels 'y' must be class indices 0.."
                               f"{classes - 1} of the model")
    tel = device.telemetry
    t0 = time.perf_counter()
    done = run_replay(device, x, rate=rate, batch=batch, repeat=repeat,
                      should_stop=stop.is_set, y=y, feedback_share=feedback_share)
    seconds = time.perf_counter() - t0
    device.flush()
    windows = list(tel.window_seqs)
    stats = device.close(drain_timeout)
    summary = {"device_id": o["device_id"], "inferences": done, "seconds": round(seconds, 3),
               "windows": len(windows), "window_seqs": windows, "spool": stats,
               "bundle": device.info, "feedback": device.feedback_stats}
    if device.capture is not None:
        summary["capture"] = dict(device.capture.total)
    if as_json:
        click.echo(json.dumps(summary))
    else:
        click.echo(f"{done} inferences in {seconds:.1f} s, {len(windows)} windows "
                   f"(seq {windows[0] if windows else '-'}..{windows[-1] if windows else '-'})"
                   f"; spool: {stats['pending']} pending, {stats['dropped']} dropped")
        if feedback_share:
            fb = summary["feedback"]
            click.echo(f"feedback: {fb['accepted']} labels, {fb['correct']} matched the "
                       "served prediction")
        if "capture" in summary:
            cap = summary["capture"]
            click.echo(f"capture: {cap['samples']} samples ({cap['bytes']} B) in "
                       f"{cap['messages']} messages, {cap['dropped']} dropped")
    if o["broker"] and not stats["drained"]:
        sys.exit(1)

def main() -> None:
    cli(prog_name="edge-runtime")
