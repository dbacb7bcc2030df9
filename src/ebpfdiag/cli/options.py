"""Options shared by the commands that run tools on hosts, declared once.

``audit_log_option`` belongs on every command that launches scripts: ``trace``
(tcp-rst, latency, drop), ``run-script``, ``doctor`` and ``metrics``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from ebpfdiag import audit

AUDIT_HELP = (
    "Append one JSON line per host run to FILE: time, controller user, host, via "
    "(sudo, runner, root), tool, digest, arguments, outcome (default: $"
    + audit.ENV
    + ", else none). Taken by trace, run-script, doctor and metrics."
)


def _audit_log(_ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
    """Refuse a file that cannot be written before any host is contacted."""
    from ebpfdiag.cli.app import App

    path = Path(value) if value else None
    if path is not None:
        App.check_writable(path)
    audit.configure(path)
    return value


def audit_log_option(f):
    return click.option(
        "--audit-log",
        metavar="FILE",
        envvar=audit.ENV,
        expose_value=False,
        callback=_audit_log,
        help=AUDIT_HELP,
    )(f)
