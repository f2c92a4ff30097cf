"""`toolchain keys`: the Ed25519 key pairs bundles are signed with."""

from __future__ import annotations

from pathlib import Path

import click

from toolchain.cli.common import fail
from toolchain.errors import UsageError


@click.group()
def keys() -> None:
    """Signing keys: the build signs with a private key, devices trust public keys."""


@keys.command()
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="folder for NAME.private.pem and NAME.public.pem")
@click.option("--name", default="edgepack", show_default=True,
              help="file name stem and the key's name in the trust-file entry")
def generate(out_dir: Path, name: str) -> None:
    """Make an Ed25519 key pair: the private key (PKCS8 PEM, mode 0600) for `toolchain build
    --sign-key`, the public key for devices. Never overwrites a file. Prints the key id and
    a [[key]] entry for a device's trust file."""
    from runtime.signing import SigningError, generate_keypair, public_key_b64

    try:
        private_path, public_path, kid = generate_keypair(out_dir, name)
    except (SigningError, OSError) as exc:
        fail(UsageError(str(exc)))
        return
    from cryptography.hazmat.primitives import serialization

    public = serialization.load_pem_public_key(public_path.read_bytes())
    click.echo(f"key id {kid}")
    click.echo(f"private key (keep secret; toolchain build --sign-key): {private_path}")
    click.echo(f"public key: {public_path}")
    click.echo("trust-file entry for devices (edge-runtime --trust FILE):")
    click.echo(f'[[key]]\nid = "{kid}"\npublic_key = "{public_key_b64(public)}"\n'
               f'name = "{name}"')
