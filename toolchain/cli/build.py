"""`toolchain build` and `toolchain inspect`: make a bundle, and read one back."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from toolchain.cli.common import exit_if_missed, fail, search_of
from toolchain.errors import ToolchainError, UsageError


@click.command()
@click.option("--target", required=True, help="hardware profile name (see `toolchain profiles`)")
@click.option("--model", "model_ref", default=None,
              help="file.py:factory, package.module:factory, model.onnx or model.pt2 "
                   "(default: the built-in demo CNN)")
@click.option("--data", "data_refs", multiple=True, default=("digits",), show_default=True,
              help="'digits', 'keywords' (spoken command words; 'keywords:N' for N clips per "
                   "word), an .npz with x (float32 NCHW) and y (int64), or a folder of "
                   "images per class; repeat it to join sources of the same sample shape "
                   "and classes (e.g. the original data and a `toolchain dataset export`)")
@click.option("--mix", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=None, metavar="R",
              help="with several --data: R of the training split is drawn from the sources "
                   "after the first, resampled with --seed (default: all of each, joined)")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path("build"), show_default=True, help="folder for the bundle")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="write the report as JSON to this file")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--epochs", type=click.IntRange(min=1), default=None,
              help="training epochs for the demo or a factory model [default: 15]")
@click.option("--pretrained", is_flag=True, help="the factory's model is already trained")
@click.option("--num-classes", type=click.IntRange(min=2), default=None, metavar="N",
              help="the number of classes the model is built for (a factory gets it); the "
                   "data must have as many [default: the data's]")
@click.option("--replace-head", is_flag=True,
              help="with --pretrained: replace the model's classifier layer (the last Linear "
                   "or convolution) with a new one for the data's classes and fine-tune")
@click.option("--freeze-epochs", type=click.IntRange(min=0), default=0, show_default=True,
              metavar="K", help="with --replace-head: train only the new head for the first K "
                                "epochs (backbone frozen), then the whole model")
@click.option("--trust-pickle", is_flag=True,
              help="allow loading a .pt/.pth pickle (it can run code: only files you trust)")
@click.option("--model-version", default="1", show_default=True)
@click.option("--sign-key", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="sign the bundle with this Ed25519 private key (PEM; make one "
                                 "with `toolchain keys generate`)")
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
@click.pass_context
def build(ctx: click.Context, target: str, model_ref: str | None, data_refs: tuple[str, ...],
          mix: float | None, out_dir: Path,
          json_path: Path | None, seed: int, epochs: int | None, pretrained: bool,
          num_classes: int | None, replace_head: bool, freeze_epochs: int,
          trust_pickle: bool, model_version: str, sign_key: Path | None, image_size: int,
          bench_runs: int, recipe_path: Path | None, overrides: tuple[str, ...],
          teacher: str | None, quiet: bool) -> None:
    """Train or take in a model, compress it (distill, prune, quantize) as the profile or
    recipe asks, export it to the target's backend, evaluate, measure and write one verified
    bundle."""
    from toolchain.build.pipeline import BuildOptions
    from toolchain.build.pipeline import build as run_build
    from toolchain.build.report import render
    from toolchain.progress import Progress

    private_key = None
    if sign_key is not None:
        from runtime.signing import SigningError, load_private_key

        try:  # before the build, so a bad key costs seconds, not a whole build
            private_key = load_private_key(sign_key)
        except SigningError as exc:
            fail(UsageError(f"--sign-key {exc}"))
            return
    opts = BuildOptions(
        target=target, model=model_ref, data=data_refs, mix=mix, out_dir=out_dir,
        json_path=json_path,
        seed=seed, epochs=epochs, pretrained=pretrained, num_classes=num_classes,
        replace_head=replace_head, freeze_epochs=freeze_epochs, trust_pickle=trust_pickle,
        model_version=model_version,
        sign_key=private_key,
        image_size=image_size, bench_runs=bench_runs, recipe=recipe_path,
        overrides=overrides, teacher=teacher, search=search_of(ctx),
    )
    try:
        report = run_build(opts, Progress(quiet=quiet))
    except ToolchainError as exc:
        fail(exc)
        return
    click.echo(render(report))
    exit_if_missed(report["budgets"])




@click.command()
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
        click.echo(json.dumps(m.to_dict(), indent=2))
        return
    fin, inp, out, prov = m.metrics.final, m.input.tensor, m.output.tensor, m.provenance
    lines = [
        f"bundle      {bundle}",
        f"model       {m.model.name} version {m.model.version}",
        f"target      {m.target.profile}: {m.target.backend}, "
        f"{m.target.precision}, {m.target.threads} thread(s)",
        f"input       {inp.name} raw {m.input.raw_shape} -> {inp.shape} "
        f"{inp.dtype}" + (f" (scale {inp.scale:.4g}, zero point {inp.zero_point})"
                          if inp.scale else ""),
        f"output      {out.name} {out.shape} {out.dtype}, "
        f"{len(m.output.labels)} labels",
        f"accuracy    {fin.accuracy:.2%} (reference {m.metrics.reference.accuracy:.2%})",
        f"size        {fin.size_bytes} bytes, {fin.params} params, {fin.macs} MACs",
        f"latency     p50 {fin.latency_ms.p50:.3f} ms, p95 {fin.latency_ms.p95:.3f} "
        f"ms ({fin.latency_ms.source})",
        f"golden      {m.golden.count} inputs",
        f"provenance  toolchain {prov.toolchain_version}, seed {prov.seed}, data {prov.data} "
        f"({prov.data_sha256[:12]}), built {prov.built_at}",
        "files       " + ", ".join(f"{k} ({v.size} B)" for k, v in m.files.items()),
    ]
    click.echo("\n".join(lines))
