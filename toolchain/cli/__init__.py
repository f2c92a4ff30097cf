"""`toolchain`: the build-side command line, one module per command group. It parses options
and calls the library; library errors map to exit codes (1 failure, 2 usage error, 3 budget
not met). The library never imports click."""

from __future__ import annotations

from pathlib import Path

import click

from toolchain.cli.build import build, inspect
from toolchain.cli.dataset import dataset
from toolchain.cli.fleet import fleet, listen
from toolchain.cli.keys import keys
from toolchain.cli.latency import profile_cmd, profiles
from toolchain.cli.rollout import rollout


@click.group()
@click.version_option(package_name="edgepack")
@click.option("--profiles-dir", multiple=True, envvar="EDGEPACK_PROFILES_DIR",
              type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="a folder of your own hardware profiles, searched before the built-in ones "
                   "(repeatable; also $EDGEPACK_PROFILES_DIR, os.pathsep-separated)")
@click.pass_context
def cli(ctx: click.Context, profiles_dir: tuple[Path, ...]) -> None:
    """edgepack toolchain: build verified model bundles for hardware targets."""
    from toolchain.profiles import ProfileSearch

    # handed to every command: where profiles, cost-model fits and calibrations are found
    ctx.obj = ProfileSearch(extra_dirs=tuple(profiles_dir))


for _command in (build, profiles, profile_cmd, inspect, listen, fleet, dataset, keys,
                 rollout):
    cli.add_command(_command)


def main() -> None:
    cli(prog_name="toolchain")
