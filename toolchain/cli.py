"""`toolchain`: the build-side command line. It parses options and calls the library;
library errors map to exit codes (1 failure, 2 usage error, 3 budget not met)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from runtime.cli_common import broker_config, broker_options, stop_on_signals
from toolchain.errors import BudgetNotMet, ToolchainError, UsageError


def _exit_if_missed(budgets: list[dict]) -> None:
    """Exit 3 naming every missed budget and by how much."""
    missed = [b for b in budgets if b["ok"] is False]
    if missed:
        _fail(BudgetNotMet("; ".join(
            f"{b['name']} is {b['value']:.4g}, over its limit {b['limit']:.4g} by "
            f"{b['value'] - b['limit']:.4g}" for b in missed)))


def _fail(exc: ToolchainError) -> None:
    prefix = {2: "usage error", 3: "budget not met"}.get(exc.exit_code, "error")
    click.echo(f"{prefix}: {exc}", err=True)
    sys.exit(exc.exit_code)


@click.group()
@click.version_option(package_name="edgepack")
@click.option("--profiles-dir", multiple=True,
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="a folder of your own hardware profiles, searched before the built-in ones "
                   "(repeatable; also $EDGEPACK_PROFILES_DIR)")
def cli(profiles_dir: tuple[Path, ...]) -> None:
    """edgepack toolchain: build verified model bundles for hardware targets."""
    if profiles_dir:
        import os

        current = os.environ.get("EDGEPACK_PROFILES_DIR", "")
        dirs = [str(p) for p in profiles_dir] + ([current] if current else [])
        os.environ["EDGEPACK_PROFILES_DIR"] = os.pathsep.join(dirs)


@cli.command()
@click.option("--target", required=True, help="hardware profile name (see `toolchain profiles`)")
@click.option("--model", "model_ref", default=None,
              help="file.py:factory, package.module:factory, model.onnx or model.pt2 "
                   "(default: the built-in demo CNN)")
@click.option("--data", "data_ref", default="digits", show_default=True,
              help="'digits', an .npz with x (float32 NCHW) and y (int64), or a folder of "
                   "images per class")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("build"), show_default=True, help="folder for the bundle")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="write the report as JSON to this file")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="training epochs for the demo or a factory model [default: 15]")
@click.option("--pretrained", is_flag=True, help="the factory's model is already trained")
@click.option("--trust-pickle", is_flag=True,
              help="allow loading a .pt/.pth pickle (it can run code: only files you trust)")
@click.option("--model-version", default="1", show_default=True)
@click.option("--sign-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="sign the bundle (HMAC-SHA256) with the key in this file")
@click.option("--image-size", type=click.IntRange(min=4), default=32, show_default=True,
              help="side length images from a folder are resized to")
@click.option("--bench-runs", type=click.IntRange(min=10), default=200, show_default=True)
@click.option("--recipe", "recipe_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="a recipe TOML choosing each compression stage")
@click.option("--set", "overrides", multiple=True, metavar="SECTION.KEY=VALUE",
              help="override one recipe value, e.g. --set prune.ratio=0.6 (repeatable)")
@click.option("--teacher", default=None,
              help="distillation teacher, as --model takes it (default: the input model)")
@click.option("--quiet", is_flag=True, help="no progress lines")
def build(target: str, model_ref: str | None, data_ref: str, out_dir: Path,
          json_path: Path | None, seed: int, epochs: int | None, pretrained: bool,
          trust_pickle: bool, model_version: str, sign_key: Path | None, image_size: int,
          bench_runs: int, recipe_path: Path | None, overrides: tuple[str, ...],
          teacher: str | None, quiet: bool) -> None:
    """Train or take in a model, compress it (distill, prune, quantize) as the profile or
    recipe asks, export it to the target's backend, evaluate, measure and write one verified
    bundle."""
    from toolchain.pipeline import BuildOptions
    from toolchain.pipeline import build as run_build
    from toolchain.progress import Progress
    from toolchain.report import render

    opts = BuildOptions(
        target=target, model=model_ref, data=data_ref, out_dir=out_dir, json_path=json_path,
        seed=seed, epochs=epochs, pretrained=pretrained, trust_pickle=trust_pickle,
        model_version=model_version,
        sign_key=sign_key.read_bytes().strip() if sign_key else None,
        image_size=image_size, bench_runs=bench_runs, recipe=recipe_path,
        overrides=overrides, teacher=teacher,
    )
    try:
        report = run_build(opts, Progress(quiet=quiet))
    except ToolchainError as exc:
        _fail(exc)
        return
    click.echo(render(report))
    _exit_if_missed(report["budgets"])


@cli.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="print the profiles as JSON")
@click.pass_context
def profiles(ctx: click.Context, as_json: bool) -> None:
    """List the hardware profiles (built-in and from $EDGEPACK_PROFILES_DIR); `fit` and
    `calibrate` tune the latency estimates."""
    if ctx.invoked_subcommand is not None:
        return
    from toolchain.profiles import available_profiles, load_profile_file

    loaded = []
    try:
        for path in available_profiles().values():
            loaded.append(load_profile_file(path))
    except UsageError as exc:
        _fail(exc)
    if as_json:
        click.echo(json.dumps([p.to_dict() for p in loaded], indent=2))
        return
    width = max((len(p.name) for p in loaded), default=4)
    for p in loaded:
        click.echo(f"{p.name:<{width}}  {'/'.join(p.backends):<36} {p.precision:<5} "
                   f"{p.threads:>2} thr  {p.description}")


@profiles.command()
@click.argument("profile_name", metavar="PROFILE")
@click.argument("measurements", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--bundles", "bundles_dir", type=click.Path(exists=True, file_okay=False,
                                                          path_type=Path),
              help="where the measured bundles are, if not at the paths the files name")
def calibrate(profile_name: str, measurements: tuple[Path, ...],
              bundles_dir: Path | None) -> None:
    """Refit PROFILE's latency estimates from `edge-runtime bench --json` files measured on
    its real device."""
    from toolchain.calibrate import calibrate as run_calibrate

    try:
        record = run_calibrate(profile_name, list(measurements), bundles_dir)
    except ToolchainError as exc:
        _fail(exc)
        return
    click.echo(f"{record['profile']}: estimates now scaled by {record['scale']:.3f}, calibrated "
               f"on {record['measurements']} measurements (spread {record['spread']:.2f} "
               f"in log space); written to {record['path']}")


@profiles.command()
@click.option("--backend", default="onnxruntime", show_default=True)
@click.option("--precision", default="fp32", show_default=True,
              type=click.Choice(["fp32", "fp16", "int8"]))
def fit(backend: str, precision: str) -> None:
    """Measure the micro-models on this machine and refit the cost model's efficiency
    factors for BACKEND/PRECISION against the host-cpu profile (a few minutes)."""
    from toolchain.calibrate import fit_host
    from toolchain.micromodels import fit_set

    fitted = fit_host(fit_set(), backend, precision, log=lambda m: click.echo(m, err=True))
    click.echo(f"fitted {backend}/{precision} on {fitted.models} micro-models; median error "
               f"on them {fitted.train_mape:.1%}")


@cli.command("profile")
@click.argument("source", metavar="MODEL_OR_BUNDLE")
@click.option("--target", required=True, help="hardware profile name")
@click.option("--input-shape", default=None, help="e.g. 1,3,224,224, where the model does "
                                                  "not carry its shape")
@click.option("--runs", type=click.IntRange(min=10), default=300, show_default=True)
@click.option("--min-seconds", type=click.FloatRange(min=0), default=2.0, show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False, path_type=Path),
              help="PNG with the latency distribution and the per-layer breakdown")
@click.option("--trust-pickle", is_flag=True)
def profile_cmd(source: str, target: str, input_shape: str | None, runs: int,
                min_seconds: float, json_path: Path | None, plot_path: Path | None,
                trust_pickle: bool) -> None:
    """Measure a model or bundle on this machine and estimate it for TARGET, side by side."""
    from toolchain.profiling import profile as run_profile
    from toolchain.profiling_report import plot, render
    from toolchain.report import write_json

    shape = None
    if input_shape:
        try:
            shape = tuple(int(d) for d in input_shape.split(","))
        except ValueError:
            _fail(UsageError(f"--input-shape {input_shape!r}: expected integers like 1,3,224,224"))
    try:
        result = run_profile(source, target, input_shape=shape, runs=runs,
                             min_seconds=min_seconds, trust_pickle=trust_pickle)
    except ToolchainError as exc:
        _fail(exc)
        return
    samples = result.pop("samples_ms")
    click.echo(render(result))
    if json_path:
        write_json(json_path, result)
    if plot_path:
        plot(result, samples, plot_path)
        click.echo(f"plot: {plot_path}")
    _exit_if_missed(result["budgets"])


@cli.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="print the whole manifest as JSON")
def inspect(bundle: Path, as_json: bool) -> None:
    """Summarize a bundle's manifest (after verifying the archive and its hashes)."""
    import tempfile

    from runtime.bundle import BundleError, extract_bundle

    with tempfile.TemporaryDirectory() as tmp:
        try:
            m = extract_bundle(bundle, Path(tmp))
        except BundleError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(1)
    if as_json:
        click.echo(json.dumps(m, indent=2))
        return
    fin = m["metrics"]["final"]
    inp, out = m["input"], m["output"]
    lines = [
        f"bundle      {bundle}",
        f"model       {m['model']['name']} version {m['model']['version']}",
        f"target      {m['target']['profile']}: {m['target']['backend']}, "
        f"{m['target']['precision']}, {m['target']['threads']} thread(s)",
        f"input       {inp['name']} raw {tuple(inp['raw_shape'])} -> {tuple(inp['shape'])} "
        f"{inp['dtype']}" + (f" (scale {inp['scale']:.4g}, zero point {inp['zero_point']})"
                             if inp.get("scale") else ""),
        f"output      {out['name']} {tuple(out['shape'])} {out['dtype']}, "
        f"{len(out['labels'])} labels",
        f"accuracy    {fin['accuracy']:.2%} "
        f"(reference {m['metrics']['reference']['accuracy']:.2%})",
        f"size        {fin['size_bytes']} bytes, {fin['params']} params, {fin['macs']} MACs",
        f"latency     p50 {fin['latency_ms']['p50']:.3f} ms, p95 {fin['latency_ms']['p95']:.3f} "
        f"ms ({fin['latency_ms']['source']})",
        f"golden      {m['golden']['count']} inputs",
        f"provenance  toolchain {m['provenance']['toolchain_version']}, seed "
        f"{m['provenance']['seed']}, data {m['provenance']['data']} "
        f"({m['provenance']['data_sha256'][:12]}), built {m['provenance']['built_at']}",
        "files       " + ", ".join(f"{k} ({v['size']} B)" for k, v in m["files"].items()),
    ]
    click.echo("\n".join(lines))



@cli.command()
@broker_options(required=True)
@click.option("--store", "store_url", default="sqlite:///fleet.db", show_default=True,
              help="sqlite:///PATH or postgresql://user[:pass]@host[:port]/db")
@click.option("--rules", "rules_path", type=click.Path(exists=True, dir_okay=False,
                                                       path_type=Path), default=None,
              help="rules TOML (default: drift > 0.25, p95 over budget, errors > 5%)")
@click.option("--prefix", default="edgepack", show_default=True, help="topic prefix")
@click.option("--group", default=None,
              help="MQTT 5 shared-subscription group: listeners in one group split the fleet. "
                   "Without it, this listener takes every message (and, on Mosquitto, keeps "
                   "its subscription across a broker restart, which shared ones do not)")
@click.option("--listener-id", default=None, help="default: HOSTNAME-PID")
@click.option("--stats-every", type=click.FloatRange(min=0.5), default=10.0, show_default=True,
              help="seconds between progress lines")
@click.option("--quiet", is_flag=True, help="no progress lines")
def listen(store_url: str, rules_path: Path | None, prefix: str, group: str | None,
           listener_id: str | None, stats_every: float, quiet: bool, **broker: object) -> None:
    """Consume the fleet's telemetry into a store, apply the rules and fire triggers.
    Runs until SIGTERM or Ctrl-C."""
    import logging

    from runtime.protocol import PREFIX
    from toolchain.fleet.listener import Listener, ListenerOptions
    from toolchain.fleet.rules import load_rules
    from toolchain.fleet.store import StoreError, open_store, redact

    logging.basicConfig(level=logging.ERROR if quiet else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    if not PREFIX.match(prefix):
        _fail(UsageError(f"topic prefix {prefix!r} is not valid: letters, digits, '.', '_', "
                         "'-' in '/'-separated levels"))
    try:
        cfg = broker_config(broker)
        rules = load_rules(rules_path)
        store = open_store(store_url)
    except click.UsageError as exc:
        _fail(UsageError(exc.message))
    except StoreError as exc:
        _fail(ToolchainError(str(exc)))
    except ToolchainError as exc:
        _fail(exc)
    stop = stop_on_signals()
    listener = Listener(ListenerOptions(cfg, prefix=prefix, group=group,
                                        listener_id=listener_id or "",
                                        stats_every_s=stats_every), store, rules,
                        on_subscribed=lambda present: click.echo(
                            f"[listen] subscribed (session {'resumed' if present else 'new'})",
                            err=True))
    click.echo(f"listening on {cfg.url} ({', '.join(listener.topics())}) into "
               f"{redact(store_url)}; rules: {', '.join(r.name for r in rules)}", err=True)

    def progress(st: dict) -> None:
        if not quiet:
            click.echo(f"[listen] {st['received']} received, {st['stored']} stored, "
                       f"{st['duplicates']} duplicates, {st['rejected']} rejected, "
                       f"{st['triggers_fired']} triggers"
                       + ("" if st["connected"] else f"; NOT CONNECTED: {st['last_error']}"),
                       err=True)

    final = listener.run(stop, progress)
    store.close()
    click.echo(f"[listen] stopped: {final['received']} received, {final['stored']} stored, "
               f"{final['duplicates']} duplicates, {final['rejected']} rejected", err=True)


@cli.command()
@click.option("--store", "store_url", default="sqlite:///fleet.db", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="print the summary as JSON")
@click.option("--html", "html_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="also write an HTML report with plots")
def fleet(store_url: str, as_json: bool, html_path: Path | None) -> None:
    """Devices, model versions, windows received, sequence gaps, latency percentiles, drift
    scores and triggers, from a listener's store."""
    from urllib.parse import urlsplit

    from toolchain.fleet.report import render_html, render_text, summarize
    from toolchain.fleet.store import StoreError, open_store

    if urlsplit(store_url).scheme in ("sqlite", ""):
        path = Path(store_url[len("sqlite:///"):] if store_url.startswith("sqlite:///")
                    else store_url)
        if not path.is_file():
            _fail(UsageError(f"store {store_url!r}: {path} does not exist (start "
                             "`toolchain listen --store ...` first)"))
    try:
        store = open_store(store_url)
    except StoreError as exc:
        _fail(ToolchainError(str(exc)))
    except ToolchainError as exc:
        _fail(exc)
    summary = summarize(store)
    if html_path:
        html_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = html_path.with_suffix(html_path.suffix + ".tmp")
        tmp.write_text(render_html(summary, store))
        tmp.replace(html_path)
    store.close()
    click.echo(json.dumps(summary, indent=2, default=str) if as_json else render_text(summary))
    if html_path:
        click.echo(f"html: {html_path}", err=True)


def main() -> None:
    cli(prog_name="toolchain")
