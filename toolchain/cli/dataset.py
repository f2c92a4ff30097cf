"""`toolchain dataset`: training data from what the fleet captured."""

from __future__ import annotations

from pathlib import Path

import click

from toolchain.cli.common import fail
from toolchain.errors import ToolchainError, UsageError


@click.group()
def dataset() -> None:
    """Training data from the fleet: the inputs devices captured (--capture-rate) and the
    labels their applications reported (feedback)."""


@dataset.command("export")
@click.option("--store", "store_url", default="sqlite:///fleet.db", show_default=True,
              help="the listener's store: sqlite:///PATH or postgresql://...")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="the listener's --data-dir (default: beside a SQLite store, fleet.db -> "
                   "fleet.data/; required with PostgreSQL)")
@click.option("--since", "since", default=None, metavar="DURATION",
              help="only what a listener received within this long (90m, 36h, 7d)")
@click.option("--model", default=None, help="only samples a bundle of this model served")
@click.option("--version", "version", default=None, help="only this model version")
@click.option("--labelled-only", is_flag=True,
              help="only samples with a feedback label (else an unlabelled sample takes the "
                   "served prediction as its label, label_source 1)")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="the .npz to write (x, y, labels, label_source, device_id, inference_id)")
def export_cmd(store_url: str, data_dir: Path | None, since: str | None, model: str | None,
               version: str | None, labelled_only: bool, out: Path) -> None:
    """Write the captured samples, joined with their feedback labels, as an .npz that
    `toolchain build --data` takes."""
    from toolchain.cli.fleet import _open_existing, parse_duration
    from toolchain.fleet.capture_store import default_data_dir
    from toolchain.fleet.dataset import ExportOptions, export
    from toolchain.fleet.store import StoreError

    try:
        since_s = None if since is None else parse_duration(since, "--since")
        data_dir = data_dir or default_data_dir(store_url)
        if data_dir is None:
            raise UsageError(f"--data-dir is needed with the store {store_url.split(':')[0]}:// "
                             "(give the listener's --data-dir)")
    except UsageError as exc:
        fail(exc)
        return
    store = _open_existing(store_url)
    try:
        result = export(store, ExportOptions(data_dir, since_s, model, version, labelled_only),
                        out, progress=lambda line: click.echo(line, err=True))
    except StoreError as exc:
        fail(ToolchainError(str(exc)))
        return
    except ToolchainError as exc:
        fail(exc)
        return
    finally:
        store.close()
    click.echo(f"wrote {out}: {result.describe()}")
