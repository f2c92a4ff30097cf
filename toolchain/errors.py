"""Errors the toolchain raises, each mapped to one exit code by the CLI."""


class ToolchainError(Exception):
    """A failure of the build itself (exit code 1)."""

    exit_code = 1


class UsageError(ToolchainError):
    """The user asked for something that cannot work: unknown target, missing file,
    a model reference that does not resolve, data that does not fit the model (exit code 2)."""

    exit_code = 2


class BudgetNotMet(ToolchainError):
    """The artifacts were written but at least one budget was missed (exit code 3)."""

    exit_code = 3
