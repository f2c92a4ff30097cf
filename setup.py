"""Packaging beyond what pyproject.toml can say: the top-level `hardware-profiles/` folder (the
layout keeps it there) ships inside the wheel as the data package `toolchain.hardware_profiles`,
so a non-editable install has the profiles and the committed cost-model fit."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["toolchain*", "targets*", "runtime*"]),
              "toolchain.hardware_profiles", "toolchain.hardware_profiles.fits"],
    package_dir={"toolchain.hardware_profiles": "hardware-profiles"},
    package_data={"toolchain.hardware_profiles": ["*.toml"],
                  "toolchain.hardware_profiles.fits": ["*.json"]},
)
