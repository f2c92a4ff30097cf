"""The build side of edgepack: ingest a model and data, train, export to a target's backend,
evaluate, measure, and package one verified bundle. The CLI lives in `toolchain.cli`; the
library modules never import click."""

__version__ = "0.1.0"
