"""Errors that end a run with their own exit code (see ds_rlhf/cli.py)."""


class NonFiniteError(RuntimeError):
    """A non-finite loss or model output that the run must not go past (exit code 3)."""
