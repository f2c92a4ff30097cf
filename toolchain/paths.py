"""Where edgepack's files live. Shipped data (hardware profiles, the committed cost-model fit)
comes with the package; what a user makes (their own profiles, fits and calibrations made on
their machines) goes to their data folder (XDG), which is read before the shipped one."""

from __future__ import annotations

import os
from pathlib import Path

import toolchain

_PACKAGE = Path(toolchain.__file__).resolve().parent


def shipped_profiles_dir() -> Path:
    """`hardware-profiles/` at the top of a source checkout (and an editable install); in a
    wheel the same files are installed inside the package as `toolchain/hardware_profiles`."""
    checkout = _PACKAGE.parent / "hardware-profiles"
    if checkout.is_dir():
        return checkout
    return _PACKAGE / "hardware_profiles"


def user_data_dir() -> Path:
    """$XDG_DATA_HOME/edgepack, by default ~/.local/share/edgepack."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "edgepack"
