"""Shared pieces of the command line: library errors mapped to exit codes (1 failure, 2 usage
error, 3 budget not met) and the options every command group reads from the context."""

from __future__ import annotations

import sys

import click

from toolchain.budgets import missed
from toolchain.errors import BudgetNotMet, ToolchainError
from toolchain.profiles import ProfileSearch


def exit_if_missed(budgets: list[dict]) -> None:
    """Exit 3 naming every missed budget and by how much."""
    if line := missed(budgets):
        fail(BudgetNotMet(line))


def fail(exc: ToolchainError) -> None:
    prefix = {2: "usage error", 3: "budget not met"}.get(exc.exit_code, "error")
    click.echo(f"{prefix}: {exc}", err=True)
    sys.exit(exc.exit_code)


def search_of(ctx: click.Context) -> ProfileSearch:
    """The profile search the top-level group built from --profiles-dir."""
    obj = ctx.find_object(ProfileSearch)
    return obj if obj is not None else ProfileSearch()
