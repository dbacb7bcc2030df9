"""``ebpfdiag doctor``: per host, what a BCC script needs, and the fix for what is missing."""

from __future__ import annotations

import json
import time

import click
from rich.console import Console
from rich.table import Table
from rich.text import Text

from ebpfdiag.catalog import script_path
from ebpfdiag.cli.common import (
    exit_code_for,
    hosts_option,
    inventory_option,
    json_option,
    prepare_run,
    run_until_done,
    ssh_options,
)
from ebpfdiag.clock import ClockSample
from ebpfdiag.errors import EXIT_HOSTS_FAILED
from ebpfdiag.fanout import Fanout, HostResult
from ebpfdiag.render.ndjson import NDJSONWriter
from ebpfdiag.transport import Script

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


class DoctorSink:
    """Collects the check records each host prints; no live output (it is quick)."""

    def __init__(self) -> None:
        self.checks: dict[str, list[dict]] = {}

    def state(self, host: str, state: str) -> None:
        pass

    def lines(self, host: str, stream: str, lines: list[bytes]) -> None:
        if stream != "stdout":
            return
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("type") == "check":
                self.checks.setdefault(host, []).append({**rec, "host": host})

    def clock(self, host: str, sample: ClockSample) -> None:
        pass

    def result(self, result: HostResult) -> None:
        pass


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


def render_table(all_checks: dict[str, list[dict]], console: Console) -> None:
    """One row per host (readable for 3 hosts or 300), then every failed check with its fix."""
    table = Table(show_edge=False, pad_edge=False)
    for col in ("host", "ready", "kernel", "usable probes", "problems"):
        table.add_column(col, overflow="fold")
    for host, checks in all_checks.items():
        by_name = {c["name"]: c for c in checks}
        broken = [c["name"] for c in checks if not c["ok"] and c["name"] in REQUIRED]
        kernel = by_name.get("kernel", {}).get("detail", "")
        probes = [k for k in PROBE_KINDS if by_name.get(k, {}).get("ok")]
        missing = [c["name"] for c in checks if not c["ok"] and c["name"] not in REQUIRED]
        problems = ", ".join(broken + [f"no {m}" for m in missing])
        table.add_row(
            host,
            Text("no", style="bold red") if broken else Text("yes", style="green"),
            kernel.split(" ")[0],
            ", ".join(probes),
            problems,
        )
    console.print(table)
    for host, checks in all_checks.items():
        for c in checks:
            if not c["ok"]:
                fix = f" -> fix: {c['fix']}" if c["fix"] else ""
                console.print(
                    f"{host}: {c['name']}: {c['detail']}{fix}",
                    markup=False,
                    highlight=False,
                    soft_wrap=True,
                )


EXAMPLES = """
\b
Examples:
  ebpfdiag doctor --hosts client,lb,server
  ebpfdiag doctor --hosts all --json | jq -c 'select(.type=="check" and .ok==false)'
"""


@click.command(epilog=EXAMPLES)
@hosts_option
@inventory_option
@ssh_options
@click.option("--no-compile", is_flag=True, help="Skip the test compile of a BPF program.")
@json_option
def doctor(
    hosts_expr: str,
    inventory: str | None,
    fanout: int,
    accept_new_host_keys: bool,
    ask_sudo_pass: bool,
    no_compile: bool,
    as_json: bool,
) -> int:
    """Check, per host, that BCC scripts can run: SSH, sudo, python, kernel, BTF, bcc,
    headers, tracefs, and which of kprobes, tracepoints, raw tracepoints and TC BPF work.

    Exit code 1 when a host is unreachable or misses something every script needs.
    """
    hosts, opts = prepare_run(
        inventory,
        hosts_expr,
        fanout=fanout,
        accept_new_host_keys=accept_new_host_keys,
        ask_sudo_pass=ask_sudo_pass,
        timeout=60,
    )
    args = ("--no-compile",) if no_compile else ()
    script = Script.from_path(script_path("doctor"), args)
    sink = DoctorSink()
    started = time.monotonic()
    engine = Fanout(hosts, script, opts, sink)
    results = run_until_done(engine.run(), engine.stop)
    all_checks = {r.host: host_checks(r, sink.checks.get(r.host, [])) for r in results}
    broken = sorted(
        h for h, cs in all_checks.items() if any(not c["ok"] and c["name"] in REQUIRED for c in cs)
    )
    if as_json:
        writer = NDJSONWriter()
        for checks in all_checks.values():
            for c in checks:
                writer.write(c)
        for r in results:
            writer.write(r.to_json())
        writer.write(
            {
                "type": "summary",
                "hosts": len(results),
                "ready": len(results) - len(broken),
                "not_ready": broken,
                "duration_s": round(time.monotonic() - started, 3),
            }
        )
        writer.flush()
    else:
        render_table(all_checks, Console())
    code = exit_code_for(results, engine.interrupted)
    return code if code or not broken else EXIT_HOSTS_FAILED
