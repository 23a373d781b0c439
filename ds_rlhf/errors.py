"""Errors that end a run with their own exit code (see ds_rlhf/cli.py), and how an error
that some ranks have is told to all of them.

An error that every rank raises together (marked `every_rank`) is printed once, by rank 0,
and the ranks leave together. Any other error is this rank's alone: it prints it with its
rank and host and exits at once (cli.py), so that no rank waits in a collective for it.
"""

from __future__ import annotations


class StopRunError(RuntimeError):
    """The run must not go on (exit code 3): what it trains on went bad. The ranks count
    what went bad together, so every rank raises it at the same point."""

    every_rank = True


class NonFiniteError(StopRunError):
    """A non-finite loss or model output that the run must not go past."""


class FailedRowsError(StopRunError):
    """Too many of a step's rows failed (an episode whose environment raised, a reward call
    that failed after its retries): rollout.max_failed_fraction."""


class RanksFailedError(RuntimeError):
    """Some ranks failed: every rank raises this together, with what each failing rank said
    (`failure_report`). Exit code 2 when every failure was bad input, else 1."""

    every_rank = True

    def __init__(self, report: str, code: int):
        super().__init__(report)
        self.code = code

    def __reduce__(self):  # sent between ranks (Coordinator.on_main) with its code
        return type(self), (str(self), self.code)


def failure_report(failures: list[tuple[int, str, str]], world_size: int) -> str:
    """One line per distinct message of `failures` [(rank, host, message)], naming the ranks
    and hosts that had it; just the message when every rank had the same one."""
    where: dict[str, list[tuple[int, str]]] = {}
    for rank, host, message in sorted(failures):
        where.setdefault(message, []).append((rank, host))
    if len(where) == 1 and len(failures) == world_size:
        return next(iter(where))
    lines = []
    for message, places in where.items():
        ranks = ", ".join(str(rank) for rank, _ in places)
        hosts = ", ".join(dict.fromkeys(host for _, host in places))
        plural = "s" if len(places) > 1 else ""
        lines.append(f"rank{plural} {ranks} (host {hosts}): {message}")
    return "\n".join(lines)
