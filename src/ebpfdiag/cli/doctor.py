"""``ebpfdiag doctor``: per host, what a BCC script needs, and the fix for what is missing."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import click

from ebpfdiag.cli.app import App, RecordSink, host_options, pass_app, summary_record
from ebpfdiag.errors import EXIT_HOSTS_FAILED

if TYPE_CHECKING:
    from ebpfdiag.fanout import HostResult

#: Checks without which no BCC script can run; the others say which probe kinds exist.
REQUIRED = ("ssh", "sudo", "python", "bcc", "headers", "compile", "tracefs")
_TRANSPORT_FIXES = {
    "unreachable": ("ssh", "check the address/port and that sshd runs"),
    "auth": ("ssh", "check user and identity_file in the inventory, or the SSH agent"),
    "host-key-unknown": ("ssh", "add the host key to known_hosts or use --accept-new-host-keys"),
    "host-key-changed": ("ssh", "verify the new key, then ssh-keygen -R HOST"),
    "ssh": ("ssh", "see the error"),
    "sudo": ("sudo", "allow NOPASSWD sudo for this user, or use --ask-sudo-pass"),
    "python": ("python", "install python3 (3.6+) or set python: in the inventory"),
}


def host_checks(result: HostResult, remote: list[dict]) -> list[dict]:
    """Transport outcome as ssh/sudo checks, followed by what the host reported."""
    host = result.host
    if result.error_kind in _TRANSPORT_FIXES:
        name, fix = _TRANSPORT_FIXES[result.error_kind]
        ok_before = ["ssh"] if name != "ssh" else []
        checks = [_check(host, n, True, "ok") for n in ok_before]
        return [*checks, _check(host, name, False, result.error or "", fix)]
    checks = [_check(host, "ssh", True, "connected"), _check(host, "sudo", True, "root via sudo")]
    if not result.ok and not remote:
        checks.append(_check(host, "python", False, result.error or "", "see the error"))
    return checks + remote


def _check(host: str, name: str, ok: bool, detail: str, fix: str = "") -> dict:
    return {"type": "check", "host": host, "name": name, "ok": ok, "detail": detail, "fix": fix}


PROBE_KINDS = ("tracepoint", "raw_tracepoint", "kprobes", "tc_bpf", "ringbuf")


def host_row(host: str, checks: list[dict]) -> dict:
    """What the table shows for one host: ready or not, kernel, usable probe kinds, problems."""
    by_name = {c["name"]: c for c in checks}
    broken = [c["name"] for c in checks if not c["ok"] and c["name"] in REQUIRED]
    missing = [c["name"] for c in checks if not c["ok"] and c["name"] not in REQUIRED]
    return {
        "host": host,
        "ready": not broken,
        "kernel": by_name.get("kernel", {}).get("detail", "").split(" ")[0],
        "probes": [k for k in PROBE_KINDS if by_name.get(k, {}).get("ok")],
        "problems": broken + [f"no {m}" for m in missing],
    }


EXAMPLES = """
\b
Examples:
  ebpfdiag doctor --hosts client,lb,server
  ebpfdiag doctor --hosts all --json | jq -c 'select(.type=="check" and .ok==false)'
"""


@click.command(epilog=EXAMPLES)
@host_options()
@click.option("--no-compile", is_flag=True, help="Skip the test compile of a BPF program.")
@pass_app
def doctor(app: App, no_compile: bool) -> int:
    """Check, per host, that BCC scripts can run: SSH, sudo, python, kernel, BTF, bcc,
    headers, tracefs, and which of kprobes, tracepoints, raw tracepoints and TC BPF work.

    Exit code 1 when a host is unreachable or misses something every script needs.
    """
    from ebpfdiag.catalog import script_path
    from ebpfdiag.fanout import Fanout
    from ebpfdiag.transport import Script

    hosts, opts = app.prepare_run(timeout=60)
    args = ("--no-compile",) if no_compile else ()
    script = Script.from_path(script_path("doctor"), args)
    sink = RecordSink("check")
    started = time.monotonic()
    engine = Fanout(hosts, script, opts, sink)
    results = app.run(engine)
    all_checks = {r.host: host_checks(r, sink.records.get(r.host, [])) for r in results}
    rows = [host_row(h, cs) for h, cs in all_checks.items()]
    broken = sorted(row["host"] for row in rows if not row["ready"])
    if app.as_json:
        for checks in all_checks.values():
            for c in checks:
                app.json.write(c)
        for r in results:
            app.json.write(r.to_json())
        app.json.write(
            summary_record(
                results,
                engine.interrupted,
                time.monotonic() - started,
                ready=len(results) - len(broken),
                not_ready=broken,
            )
        )
        app.json.flush()
    else:
        from ebpfdiag.render.tables import doctor_table

        failed = [c for checks in all_checks.values() for c in checks if not c["ok"]]
        doctor_table(rows, failed, app.term.out)
    code = app.exit_code(results, engine.interrupted)
    return code if code or not broken else EXIT_HOSTS_FAILED
