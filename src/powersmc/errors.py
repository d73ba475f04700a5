"""Errors raised for bad user input.

Every message names the offending argument and what is allowed, so the CLI can print it
as one line and exit with code 2.
"""

from __future__ import annotations


class InputError(ValueError):
    """A user-supplied argument is invalid; the message names it and what is allowed."""

    def __init__(self, argument: str, allowed: str, got: object = None) -> None:
        self.argument, self.allowed, self.got = argument, allowed, got
        self._parts = (argument, allowed, got)
        msg = f"{argument}: {allowed}"
        if got is not None:
            msg += f" (got {got!r})"
        super().__init__(msg)

    def __reduce__(self) -> tuple:  # picklable, so a Ray worker's error reaches the driver
        return (type(self), self._parts)


class DegenerateWeightsError(RuntimeError):
    """Every particle has weight zero (log-weight -inf): there is nothing to resample from."""


class WorkerError(RuntimeError):
    """Ray workers could not do the work: a model that fails to load on them, or none left."""
