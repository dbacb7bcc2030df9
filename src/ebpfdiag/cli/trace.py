"""``ebpfdiag trace``: trace one question on several hosts at once and correlate the answers."""

from __future__ import annotations

import ipaddress
import json
import sys
from pathlib import Path

import click
from rich.console import Console

from ebpfdiag.catalog import script_path
from ebpfdiag.cli.common import (
    DURATION,
    exit_code_for,
    hosts_option,
    inventory_option,
    json_option,
    prepare_run,
    run_until_done,
    ssh_options,
)
from ebpfdiag.errors import UsageError
from ebpfdiag.fanout import Fanout
from ebpfdiag.render.ndjson import NDJSONWriter
from ebpfdiag.render.terminal import StatusView
from ebpfdiag.render.timeline import event_record, live_line, render_result, trace_records
from ebpfdiag.tracing import RST, TraceSession
from ebpfdiag.transport import Script


@click.group()
def trace() -> None:
    """Trace a network question across hosts (client, load balancer, server) at once."""


EXAMPLES = """
\b
Examples:
  ebpfdiag trace tcp-rst --hosts client,lb,server --port 80
  ebpfdiag trace tcp-rst --hosts client,lb,server --port 8081 --count 1 --duration 30s
  ebpfdiag trace tcp-rst --hosts lbs,web --json | jq -c 'select(.type=="flow") | .verdict.text'
  ebpfdiag trace tcp-rst --hosts lbs,web --duration 1m --output rst.json
"""


def _script_args(
    ports: tuple[str, ...],
    addrs: tuple[str, ...],
    interfaces: str | None,
    history: int,
    all_flows: bool,
) -> tuple[str, ...]:
    args: list[str] = []
    for p in ports:
        for part in p.split(","):
            if not part.strip().isdigit() or not 0 < int(part) < 65536:
                raise UsageError(f"--port: '{part}' is not a port number (1-65535)")
            args += ["--port", part.strip()]
    for a in addrs:
        for part in a.split(","):
            try:
                ipaddress.ip_address(part.strip())
            except ValueError:
                raise UsageError(f"--addr: '{part}' is not an IPv4 or IPv6 address") from None
            args += ["--addr", part.strip()]
    if interfaces:
        args += ["--interfaces", interfaces]
    args += ["--history", str(history)]
    if all_flows:
        args.append("--all-flows")
    return tuple(args)


@trace.command("tcp-rst", epilog=EXAMPLES)
@hosts_option
@inventory_option
@ssh_options
@click.option("--port", "ports", multiple=True, metavar="PORT[,PORT]", help="Only these ports.")
@click.option("--addr", "addrs", multiple=True, metavar="ADDR[,ADDR]", help="Only these addresses.")
@click.option("--interfaces", metavar="IF[,IF]", help="Interfaces to watch (default: all but lo).")
@click.option("--history", type=click.IntRange(0, 8), default=4, show_default=True,
              help="Packets per flow kept in the kernel and shown before its RST.")  # fmt: skip
@click.option("--all-flows", is_flag=True,
              help="Also stream handshake and close packets of flows that do not reset "
              "(by default they wait in the kernel and come only with a reset).")  # fmt: skip
@click.option("--duration", type=DURATION, help="Stop after this long (default: until Ctrl-C).")
@click.option("--count", type=click.IntRange(1), help="Stop after N reset flows.")
@click.option("--output", type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="Also write the whole result as one JSON document.")  # fmt: skip
@json_option
def tcp_rst(
    hosts_expr: str,
    inventory: str | None,
    fanout: int,
    accept_new_host_keys: bool,
    ask_sudo_pass: bool,
    ports: tuple[str, ...],
    addrs: tuple[str, ...],
    interfaces: str | None,
    history: int,
    all_flows: bool,
    duration: float | None,
    count: int | None,
    output: Path | None,
    as_json: bool,
) -> int:
    """Who sent a TCP reset, and why: one timeline across client, load balancer and server.

    Attaches a TC classifier and the tcp_send_reset/tcp_receive_reset tracepoints on every
    host, shows each reset as it happens, and at the end matches the same packets across
    hosts (through DNAT/SNAT), aligns the hosts' clocks, and gives a verdict per flow:
    which host originated the reset, whether its TCP stack or a firewall did, and why.
    """
    args = _script_args(ports, addrs, interfaces, history, all_flows)
    hosts, opts = prepare_run(
        inventory,
        hosts_expr,
        fanout=fanout,
        accept_new_host_keys=accept_new_host_keys,
        ask_sudo_pass=ask_sudo_pass,
    )
    script = Script.from_path(script_path("tcp_rst"), args)
    names = [h.name for h in hosts]
    err = Console(stderr=True, highlight=False)
    # Timelines are wide; when piped, do not squeeze them into 80 columns.
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    writer = NDJSONWriter() if as_json else None
    t0: list[int] = []

    def on_event(rec: dict) -> None:
        if writer is not None:
            writer.write(event_record(rec))
            return
        if rec["type"] == "reset" or rec.get("flags", 0) & RST:
            if not t0 and rec.get("ts"):
                t0.append(rec["ts"])
            out.print(live_line(rec, t0[0] if t0 else None))

    def on_ready(ready: list[str], failed: list[str]) -> None:
        msg = f"tracing on {len(ready)} host{'s' if len(ready) != 1 else ''}"
        if failed:
            msg += f" ({len(failed)} failed: {', '.join(failed)})"
        if writer is not None:
            writer.write({"type": "status", "state": "tracing", "hosts": ready, "failed": failed})
            writer.flush()
        err.print(msg + (" - Ctrl-C to stop" if duration is None and count is None else ""))

    def on_diagnostic(host: str, text: str) -> None:
        if text.strip():
            err.print(f"{host}: {text}", markup=False)

    with StatusView(names, err) as status:
        session = TraceSession(
            names,
            duration=duration,
            count=count,
            on_event=on_event,
            on_ready=lambda r, f: (status.close(), on_ready(r, f)),
            on_state=status.set,
            on_diagnostic=on_diagnostic,
        )
        engine = Fanout(hosts, script, opts, session)
        session.fanout = engine
        run_until_done(engine.run(), engine.stop)
    result = session.finish(engine.interrupted)
    records = list(trace_records(result))
    for rec in records:
        if rec["type"] == "host" and rec["error"]:
            err.print(f"ebpfdiag: {rec['host']}: {rec['error']}", markup=False)
    if writer is not None:
        for rec in records:
            writer.write(rec)
        writer.flush()
    else:
        render_result(result, out, err)
    if output is not None:
        _write_document(output, session.events, records)
    results = [h.result for h in result.hosts.values() if h.result is not None]
    return exit_code_for(results, engine.interrupted)


def _write_document(path: Path, events: list[dict], records: list[dict]) -> None:
    doc = {
        "type": "trace",
        "hosts": [r for r in records if r["type"] == "host"],
        "events": [event_record(e) for e in events],
        "flows": [r for r in records if r["type"] == "flow"],
        "warnings": [r for r in records if r["type"] == "warning"],
        "summary": next(r for r in records if r["type"] == "summary"),
    }
    try:
        path.write_text(json.dumps(doc, indent=1) + "\n")
    except OSError as exc:
        print(f"ebpfdiag: cannot write {path}: {exc.strerror}", file=sys.stderr)
