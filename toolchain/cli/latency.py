"""`toolchain profiles` (list, fit, calibrate) and `toolchain profile`: the hardware targets and
the latency measured here and estimated for them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from toolchain.cli.common import exit_if_missed, fail, search_of
from toolchain.errors import ToolchainError, UsageError

if TYPE_CHECKING:
    from toolchain.latency.costmodel import Fit


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="print the profiles as JSON")
@click.pass_context
def profiles(ctx: click.Context, as_json: bool) -> None:
    """List the hardware profiles (yours from --profiles-dir and your data folder, then the
    built-in ones); `fit` and `calibrate` tune the latency estimates."""
    if ctx.invoked_subcommand is not None:
        return
    from toolchain.profiles import load_profile_file

    loaded = []
    try:
        for path in search_of(ctx).available().values():
            loaded.append(load_profile_file(path))
    except UsageError as exc:
        fail(exc)
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
@click.pass_context
def calibrate(ctx: click.Context, profile_name: str, measurements: tuple[Path, ...],
              bundles_dir: Path | None) -> None:
    """Refit PROFILE's latency estimates from `edge-runtime bench --json` files measured on
    its real device."""
    from toolchain.latency.calibrate import calibrate as run_calibrate

    try:
        record = run_calibrate(profile_name, list(measurements), bundles_dir,
                               search=search_of(ctx))
    except ToolchainError as exc:
        fail(exc)
        return
    click.echo(f"{record['profile']}: estimates now scaled by {record['scale']:.3f}, calibrated "
               f"on {record['measurements']} measurements (spread {record['spread']:.2f} "
               f"in log space); written to {record['path']}")


@profiles.command()
@click.option("--backend", default=None,
              help="a registered backend [default: the host-cpu profile's first]")
@click.option("--precision", default="fp32", show_default=True,
              type=click.Choice(["fp32", "fp16", "int8"]))
@click.option("--quick", is_flag=True,
              help="the short calibration (a dozen micro-models, under a minute) that runs by "
                   "itself on a CPU's first estimate, instead of the full refit")
@click.pass_context
def fit(ctx: click.Context, backend: str | None, precision: str, quick: bool) -> None:
    """Measure the micro-models on this machine and refit the cost model's efficiency
    factors for BACKEND/PRECISION against the host-cpu profile (a few minutes). The fit is
    stored in your data folder under this CPU's signature, where it is used for this CPU
    only."""
    import targets
    from toolchain.host import detect
    from toolchain.latency import costmodel, fitstore, selfcal
    from toolchain.latency.calibrate import fit_host
    from toolchain.latency.micromodels import fit_set

    search = search_of(ctx)
    try:
        backend = backend or search.load(costmodel.HOST_PROFILE).backends[0]
    except ToolchainError as exc:
        fail(exc)
    if backend not in targets.BACKENDS:
        fail(UsageError(f"--backend {backend!r} is not registered; registered: "
                        f"{', '.join(sorted(targets.BACKENDS))}"))
    plugin = targets.get(backend)
    if reason := plugin.run_unavailable_reason() or plugin.build_unavailable_reason():
        fail(UsageError(f"--backend {backend}: cannot be measured here ({reason})"))
    cpu = detect()

    def log(message: str) -> None:
        click.echo(message, err=True)

    log(f"this CPU: {cpu.description}; signature {cpu.signature}")
    try:
        with selfcal.cpu_lock(search, cpu, selfcal.LOCK_WAIT_S, log) as held:
            if not held:
                fail(ToolchainError("another process is calibrating this CPU; try again when "
                                    "it is done"))
            if quick:
                fitted = selfcal.calibrate(backend, precision, search, log, cpu)
            else:
                fitted = fit_host(fit_set(), backend, precision, log=log, search=search)
    except ToolchainError as exc:
        fail(exc)
        return
    except OSError as exc:
        fail(ToolchainError(f"cannot use the data folder {search.data_dir}: "
                            f"{exc.strerror or exc}"))
        return
    kind = "calibrated" if quick else "fitted"
    click.echo(f"{kind} {backend}/{precision} on {fitted.models} micro-models in "
               f"{fitted.wall_s:.0f} s; median error on them {fitted.train_mape:.1%}; "
               f"written to {fitstore.cpu_file(search, cpu)}")
    if fitted.busy_note:
        click.echo(f"note: {fitted.busy_note}")


@profiles.command("host")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
def host_cmd(ctx: click.Context, as_json: bool) -> None:
    """This machine's CPU as the latency cost model sees it: its signature, its own fits and
    calibrations, and the reference fit used where it has none."""
    from toolchain.host import detect
    from toolchain.latency import fitstore, selfcal

    search = search_of(ctx)
    cpu = detect()
    try:
        own = fitstore.host_fits(search, cpu)
        problem = ""
    except fitstore.FitFileError as exc:
        own, problem = {}, str(exc)
    try:
        reference = fitstore.reference_fits(search)
    except fitstore.FitFileError as exc:
        fail(exc)
        return
    record = {"cpu": cpu.record(), "fit_file": str(fitstore.cpu_file(search, cpu)),
              "own_fits": {k: _fit_summary(f) for k, f in sorted(own.items())},
              "reference_fits": {k: _fit_summary(f) for k, f in sorted(reference.items())},
              "automatic_calibration": "on" if selfcal.enabled() else
              f"off ({selfcal.ENV})", **({"problem": problem} if problem else {})}
    if as_json:
        click.echo(json.dumps(record, indent=2))
        return
    click.echo(f"CPU        {cpu.description}")
    click.echo(f"signature  {cpu.signature}")
    click.echo(f"fit file   {record['fit_file']}" + ("" if own else " (none yet)"))
    if problem:
        click.echo(f"problem    {problem}; the next calibration replaces it")
    for key, f in record["own_fits"].items():
        click.echo(f"  {key:<18} {f['method']:<12} {f['date']}  {f['models']:>3} models  "
                   f"median error {f['train_mape']:.1%}" +
                   (f"  ({f['busy_note']})" if f["busy_note"] else ""))
    click.echo("reference" + ("" if reference else "  none"))
    for key, f in record["reference_fits"].items():
        click.echo(f"  {key:<18} {f['method']:<12} {f['date']}  {f['models']:>3} models  "
                   f"measured on {f['cpu'] or 'an unrecorded CPU'}")
    click.echo(f"automatic calibration: {record['automatic_calibration']}")


def _fit_summary(f: Fit) -> dict[str, Any]:
    return {"method": f.method, "date": f.fit_date, "models": f.models,
            "train_mape": f.train_mape, "busy_note": f.busy_note, "cpu": f.cpu.get("description")}


@click.command("profile")
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
@click.pass_context
def profile_cmd(ctx: click.Context, source: str, target: str, input_shape: str | None, runs: int,
                min_seconds: float, json_path: Path | None, plot_path: Path | None,
                trust_pickle: bool) -> None:
    """Measure a model or bundle on this machine and estimate it for TARGET, side by side."""
    from toolchain.budgets import write_json
    from toolchain.latency.profile import profile as run_profile
    from toolchain.latency.profile_report import plot, render

    shape = None
    if input_shape:
        try:
            shape = tuple(int(d) for d in input_shape.split(","))
        except ValueError:
            fail(UsageError(f"--input-shape {input_shape!r}: expected integers like 1,3,224,224"))
    try:
        result = run_profile(source, target, input_shape=shape, runs=runs,
                             min_seconds=min_seconds, trust_pickle=trust_pickle,
                             search=search_of(ctx), log=lambda m: click.echo(m, err=True))
    except ToolchainError as exc:
        fail(exc)
        return
    samples = result.pop("samples_ms")
    click.echo(render(result))
    if json_path:
        write_json(json_path, result)
    if plot_path:
        plot(result, samples, plot_path)
        click.echo(f"plot: {plot_path}")
    exit_if_missed(result["budgets"])
