"""Fleet safety shared by every command that starts something on many hosts at once."""

from __future__ import annotations

import sys

import click

from ebpfdiag.errors import UsageError
from ebpfdiag.hostexpr import compress_names

#: Above this many hosts a command asks before it starts (``--yes`` skips the question;
#: without a terminal to ask on it refuses unless given ``--yes``). 50 is past any lab
#: or service group one means to hit by hand, and well under a production fleet.
CONFIRM_ABOVE = 50

yes_option = click.option(
    "-y",
    "--yes",
    is_flag=True,
    help=f"Do not ask before starting on more than {CONFIRM_ABOVE} hosts (required then "
    "when there is no terminal).",
)


def confirm_fleet(
    command: str, what: str, names: list[str], yes: bool, canary: int | None = None
) -> None:
    """Above CONFIRM_ABOVE hosts, ask on the terminal; with no terminal, insist on --yes.
    ``command`` names the command (``run-script``), ``what`` what would run (``probe.py``,
    ``trace tcp-rst``)."""
    if yes or len(names) <= CONFIRM_ABOVE:
        return
    if not (sys.stdin.isatty() and sys.stderr.isatty()):
        raise UsageError(
            f"{command} on {len(names)} hosts (more than {CONFIRM_ABOVE}) needs --yes "
            "when there is no terminal to confirm on"
        )
    nodeset = compress_names(names)
    if len(nodeset) > 60:
        nodeset = nodeset[:57] + "..."
    first = f", the first {canary} alone first" if canary and canary < len(names) else ""
    if not click.confirm(f"Run {what} on {len(names)} hosts ({nodeset}){first}?", err=True):
        raise UsageError("not confirmed: nothing ran")
