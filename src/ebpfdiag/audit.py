"""The controller's audit log: one JSON line per host run, for the whole fleet run.

Hosts with the runner keep their own record (docs/runner.md); this one is the
controller's side of the same facts, in one file for every host a command reached: who
ran what, where, how (full sudo, the runner, root), with which digest and arguments, and
how it ended. It is written when ``--audit-log FILE`` is given, else to
``$EBPFDIAG_AUDIT_LOG`` when that is set (a site can set it for everyone), else not at all.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ebpfdiag.transport import RemoteRun, RunOutcome

ENV = "EBPFDIAG_AUDIT_LOG"

_UNSET = object()
#: the command's ``--audit-log`` (None: given as nothing); ``_UNSET``: read ``ENV``
_configured: Path | None | object = _UNSET
_warned: set[Path] = set()


def configure(path: Path | None) -> None:
    """What the command's option said (its callback runs on every invocation)."""
    global _configured
    _configured = path


def destination() -> Path | None:
    """Where host runs are recorded: the option's file, else ``$EBPFDIAG_AUDIT_LOG``."""
    if _configured is not _UNSET:
        return _configured  # type: ignore[return-value]
    env = os.environ.get(ENV)
    return Path(env) if env else None


def controller_user() -> str:
    """The account running the controller, from its uid (not from $USER, which anyone sets)."""
    uid = os.getuid()
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _iso(ns: int) -> str:
    return (
        time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns / 1e9)) + f".{ns % 10**9 // 10**6:03d}Z"
    )


def host_run(
    run: RemoteRun, started_ns: int, outcome: RunOutcome | None, failure: BaseException | None
) -> dict:
    """The record of one host's run: ``outcome`` when it ended, else ``failure``."""
    ended = time.time_ns()
    rec: dict = {
        "type": "run",
        "time": _iso(ended),
        "start": _iso(started_ns),
        "duration_s": round((ended - started_ns) / 1e9, 3),
        "controller_user": controller_user(),
        "host": run.host.name,
        "address": run.host.address,
        "ssh_user": run.ssh_user or None,
        "via": run.via,
        "tool": run.script.catalog_tool,
        "script": run.script.name,
        "sha256": run.script.digest,
        "args": list(run.script.args),
        "exit_code": None,
        "exit_signal": None,
        "stopped": False,
        "error_kind": None,
        "error": None,
    }
    if outcome is not None:
        rec.update(
            exit_code=outcome.exit_status,
            exit_signal=outcome.exit_signal,
            stopped=outcome.stopped_by_us,
        )
    elif failure is not None and _cancelled(failure):
        rec.update(error_kind="cancelled", error="the run was cancelled before it ended")
    elif failure is not None:
        kind = getattr(failure, "kind", None) or "ssh"
        rec.update(error_kind=kind, error=str(failure) or type(failure).__name__)
    return rec


def write(record: dict) -> None:
    """Append one line (one ``write`` on an O_APPEND file, so concurrent controllers'
    lines do not interleave); a file that cannot be written is said once on stderr."""
    path = destination()
    if path is None:
        return
    line = json.dumps(record, separators=(",", ":"), sort_keys=False) + "\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)
    except OSError as exc:
        if path not in _warned:
            _warned.add(path)
            with contextlib.suppress(OSError):
                sys.stderr.write(f"ebpfdiag: cannot write audit log {path}: {exc.strerror}\n")


def _cancelled(failure: BaseException) -> bool:
    """asyncio is imported here, not with this module: every command that connects
    imports the module for its option, before it needs an event loop."""
    import asyncio

    return isinstance(failure, asyncio.CancelledError)
