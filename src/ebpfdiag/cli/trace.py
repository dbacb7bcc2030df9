"""``ebpfdiag trace``: trace one question on several hosts at once and correlate the answers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ebpfdiag.cli.app import DURATION, App, host_options, pass_app, process_started
from ebpfdiag.errors import EXIT_HOSTS_FAILED

if TYPE_CHECKING:
    from ebpfdiag.tracing import TraceResult, TraceSession


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
    """The tool's argv, checked against its parameter schema: refused here exactly as the
    tool would refuse it, before any host is contacted."""
    from ebpfdiag.catalog import script_path
    from ebpfdiag.remote.schema import tool_argv

    values = {
        "port": list(ports),
        "addr": list(addrs),
        "interfaces": [interfaces] if interfaces else [],
        "history": history,
        "all-flows": all_flows,
    }
    return tool_argv(script_path("tcp_rst"), values)


@trace.command("tcp-rst", epilog=EXAMPLES)
@host_options()
@click.option("--port", "ports", multiple=True, metavar="PORT[,PORT]", help="Only these ports.")
@click.option("--addr", "addrs", multiple=True, metavar="ADDR[,ADDR]", help="Only these addresses.")
@click.option("--interfaces", metavar="IF[,IF]", help="Interfaces to watch (default: all but lo).")
@click.option("--history", type=int, default=4, show_default=True, metavar="0-8",
              help="Packets per flow kept in the kernel and shown before its RST.")  # fmt: skip
@click.option("--all-flows", is_flag=True,
              help="Also stream handshake and close packets of flows that do not reset "
              "(by default they wait in the kernel and come only with a reset).")  # fmt: skip
@click.option("--duration", type=DURATION, help="Stop after this long (default: until Ctrl-C).")
@click.option("--count", type=click.IntRange(1), help="Stop after N reset flows.")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the whole trace as one JSON document ('ebpfdiag show' "
              "renders it again later, without the hosts).")  # fmt: skip
@pass_app
def tcp_rst(
    app: App,
    ports: tuple[str, ...],
    addrs: tuple[str, ...],
    interfaces: str | None,
    history: int,
    all_flows: bool,
    duration: float | None,
    count: int | None,
    output: Path | None,
) -> int:
    """Who sent a TCP reset, and why: one timeline across client, load balancer and server.

    Attaches a TC classifier and the tcp_send_reset/tcp_receive_reset tracepoints on every
    host, shows each reset as it happens, and at the end matches the same packets across
    hosts (through DNAT/SNAT), aligns the hosts' clocks, and gives a verdict per flow:
    which host originated the reset, whether its TCP stack or a firewall did, and why.
    """
    from ebpfdiag.catalog import script_path
    from ebpfdiag.fanout import Fanout
    from ebpfdiag.tracing import RST, TraceSession
    from ebpfdiag.transport import Script

    args = _script_args(ports, addrs, interfaces, history, all_flows)
    if output is not None:
        app.check_writable(output)
    hosts, opts = app.prepare_run()
    script = Script.from_path(script_path("tcp_rst"), args)
    names = [h.name for h in hosts]
    t0: list[int] = []

    timeline = None  # ebpfdiag.render.timeline: imported at the first event, not before ready

    def on_event(rec: dict) -> None:
        nonlocal timeline
        if timeline is None:
            from ebpfdiag.render import timeline
        if app.as_json:
            app.json.write(timeline.event_record(rec))
            return
        if rec["type"] == "reset" or rec.get("flags", 0) & RST:
            if not t0 and rec.get("ts"):
                t0.append(rec["ts"])
            app.term.out.print(timeline.live_line(rec, t0[0] if t0 else None))

    def on_ready(ready: list[str], failed: list[str]) -> None:
        msg = f"tracing on {len(ready)} host{'s' if len(ready) != 1 else ''}"
        if failed:
            msg += f" ({len(failed)} failed: {', '.join(failed)})"
        if session.ports:
            msg += f", ports {','.join(map(str, session.ports))}"
        if session.unconfirmed:
            msg += f" (not confirmed by {', '.join(session.unconfirmed)}: NAT legs may be missed)"
        if app.as_json:
            app.json.write(
                {
                    "type": "status",
                    "state": "tracing",
                    "hosts": ready,
                    "failed": failed,
                    "ports": session.ports,
                    "unconfirmed": session.unconfirmed,
                }
            )
            app.json.flush()
        app.term.status(msg + (" - Ctrl-C to stop" if duration is None and count is None else ""))

    def on_diagnostic(host: str, text: str) -> None:
        if text.strip():
            app.term.status(f"{host}: {text}")

    with app.status_view(names) as status:
        session = TraceSession(
            names,
            duration=duration,
            count=count,
            on_event=on_event,
            on_ready=lambda r, f: (status.close(), on_ready(r, f)),
            on_state=status.set,
            on_diagnostic=on_diagnostic,
            on_host_ready=announce_ready(app),
            launched=process_started(),
        )
        engine = Fanout(hosts, script, opts, session)
        session.fanout = engine
        app.run(engine)
    return conclude(app, session, engine.interrupted, output)


def announce_ready(app: App) -> Callable[[str, float, dict], None]:
    """``on_host_ready`` of any trace command: a line per host as it starts listening
    (a ``status`` record with state ``ready`` under ``--json``), so that with one slow
    host the user knows the others listen already."""

    def on_host_ready(host: str, after_s: float, hello: dict) -> None:
        if app.as_json:
            app.json.write(
                {"type": "status", "host": host, "state": "ready", "after_s": round(after_s, 3)}
            )
            app.json.flush()
            return
        from ebpfdiag.render.terminal import ready_line

        app.term.status(ready_line(host, after_s, hello))

    return on_host_ready


def conclude(app: App, session: TraceSession, interrupted: bool, output: Path | None) -> int:
    """After the run: correlate, render (or finish the NDJSON stream), write ``--output``;
    returns the exit code (1 also when ``--output`` could not be written)."""
    from ebpfdiag.render.timeline import event_record

    result = session.finish(interrupted)
    saved = source_records(result)
    # The stream had the packets and resets live; lost counts come with the rest at the end.
    live = [event_record(e) for e in session.events if e["type"] != "lost"]
    lost = [event_record(e) for e in session.events if e["type"] == "lost"]
    records = emit_result(app, result, lost + saved)
    code = app.exit_code(
        [h.result for h in result.hosts.values() if h.result is not None], interrupted
    )
    if output is not None:
        doc = document(saved, live + lost, records)  # in the order the stream has them
        if not app.write_file(output, json.dumps(doc, indent=1) + "\n"):
            code = max(code, EXIT_HOSTS_FAILED)
    return code


def source_records(result: TraceResult) -> list[dict]:
    """What re-analysis needs besides the events: each host's ``hello`` and the clock
    summary correlation was given (before it tightens it), as ``hello`` and ``clock``
    records."""
    out: list[dict] = []
    for name, ht in result.hosts.items():
        if ht.hello is not None:
            out.append({**ht.hello, "type": "hello", "host": name})
    for name in result.hosts:
        if (model := result.clocks.get(name)) is not None:
            summary = model["summary"]
            out.append(
                {
                    "type": "clock",
                    "host": name,
                    "offset_ns": summary["offset_ns"],
                    "error_ns": summary["error_ns"],
                    "model": model,
                }
            )
    return out


def emit_result(app: App, result: TraceResult, saved: list[dict]) -> list[dict]:
    """The end of a trace, live or from a file: host failures on stderr, then NDJSON
    (``saved`` records, hosts, warnings, flows, summary) or the timelines."""
    from ebpfdiag.render.timeline import render_result, trace_records

    records = [_one_shape(rec, result) for rec in trace_records(result)]
    for rec in records:
        if rec["type"] == "host" and rec["error"]:
            app.term.error(f"{rec['host']}: {rec['error']}")
    if app.as_json:
        for rec in saved + records:
            app.json.write(rec)
        app.json.flush()
    else:
        render_result(result, app.term.out, app.term.err)
    return records


_NO_OUTCOME = {"exit_code": None, "exit_signal": None, "duration_s": None}


def _one_shape(rec: dict, result: TraceResult) -> dict:
    """``host`` and ``summary`` records with the fields they have in every command
    (docs/json.md): a host's exit code and time, the ok/failed counts."""
    if rec["type"] == "host":
        outcome = result.hosts[rec["host"]].result
        return {**(outcome.to_json() if outcome else _NO_OUTCOME), **rec}
    if rec["type"] == "summary":
        out = {}
        for key, value in rec.items():
            out[key] = value
            if key == "hosts":
                out["ok"] = value - len(rec["failed_hosts"])
                out["failed"] = len(rec["failed_hosts"])
        return out
    return rec


def document(saved: list[dict], events: list[dict], records: list[dict]) -> dict:
    """``--output``: the same records as ``--json`` (schema version included), as one JSON
    document."""
    from ebpfdiag.render.ndjson import SCHEMA_VERSION

    def of(kind: str, recs: list[dict]) -> list[dict]:
        return [{"v": SCHEMA_VERSION, **r} for r in recs if r["type"] == kind]

    return {
        "type": "trace",
        "v": SCHEMA_VERSION,
        "hellos": of("hello", saved),
        "clocks": of("clock", saved),
        "hosts": of("host", records),
        "events": [{"v": SCHEMA_VERSION, **e} for e in events],
        "flows": of("flow", records),
        "warnings": of("warning", records),
        "summary": of("summary", records)[0],
    }
