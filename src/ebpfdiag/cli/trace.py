"""``ebpfdiag trace``: trace one question on several hosts at once and correlate the answers."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ebpfdiag.cli.app import DURATION, App, host_options, pass_app, process_started
from ebpfdiag.cli.confirm import confirm_fleet, yes_option
from ebpfdiag.errors import EXIT_HOSTS_FAILED

if TYPE_CHECKING:
    from ebpfdiag.fanout import Fanout, FanoutOptions
    from ebpfdiag.inventory import Host
    from ebpfdiag.tracing import TraceResult, TraceSession
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
@click.option("--pcap", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write every packet sighting to this pcapng file (headers rebuilt "
              "from the records, one interface per host:interface, aligned time).")  # fmt: skip
@yes_option
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
    pcap: Path | None,
    yes: bool,
) -> int:
    """Who sent a TCP reset, and why: one timeline across client, load balancer and server.

    Attaches a TC classifier and the tcp_send_reset/tcp_receive_reset tracepoints on every
    host, shows each reset as it happens, and at the end matches the same packets across
    hosts (through DNAT/SNAT), aligns the hosts' clocks, and gives a verdict per flow:
    which host originated the reset, whether its TCP stack or a firewall did, and why.
    """
    from ebpfdiag.catalog import script_path
    from ebpfdiag.tracing import RST, TraceSession
    from ebpfdiag.transport import Script

    args = _script_args(ports, addrs, interfaces, history, all_flows)
    if output is not None:
        app.check_writable(output)
    if pcap is not None:
        app.check_writable(pcap)
    hosts, opts = app.prepare_run()
    script = Script.from_path(script_path("tcp_rst"), args)
    t0: list[int] = []

    timeline = None  # ebpfdiag.render.timeline: imported at the first event, not before ready

    def show_event(rec: dict) -> None:
        nonlocal timeline
        if timeline is None:
            from ebpfdiag.render import timeline
        if rec["type"] == "reset" or rec.get("flags", 0) & RST:
            if not t0 and rec.get("ts"):
                t0.append(rec["ts"])
            app.term.out.print(timeline.live_line(rec, t0[0] if t0 else None))

    session, engine = run_trace(
        app, hosts, script, opts,
        partial(TraceSession, duration=duration, count=count,
                **event_callbacks(app, show_event)),
        what="", stops_by_itself=duration is not None or count is not None, show_filter=True,
        command="trace tcp-rst", yes=yes,
    )  # fmt: skip
    code = conclude(app, session, engine.interrupted, output)
    from ebpfdiag.render.pcapng import save_pcap

    if pcap is not None and not save_pcap(pcap, session.events, session.hellos(), app.term.error):
        code = max(code, EXIT_HOSTS_FAILED)
    return code


def event_callbacks(app: App, show: Callable[[dict], None]) -> dict[str, Callable]:
    """A trace session's live event callbacks: ``show`` on a terminal; under ``--json``,
    each event as an ``event`` record, those the session knows to be flat (every packet
    of a busy trace) written unchecked, a whole batch at once."""
    if not app.as_json:
        return {"on_event": show}
    writer = app.json
    # the renderer is imported at the first event, not on the way to ready

    def on_event(rec: dict) -> None:
        from ebpfdiag.render.timeline import event_record

        writer.write(event_record(rec))

    def on_flat_events(recs: list[dict]) -> None:
        from ebpfdiag.render.timeline import event_record

        writer.write_flat(map(event_record, recs))

    return {"on_event": on_event, "on_flat_events": on_flat_events}


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


def announce_tracing(
    app: App,
    what: str,
    session_ref: Callable[[], TraceSession],
    stops_by_itself: bool,
    *,
    show_filter: bool = False,
) -> Callable[[list[str], list[str]], None]:
    """``on_ready`` of any trace command: ``tracing <what>on N hosts`` once every host is
    ready or failed (with the port filter and the hosts that did not confirm it when
    ``show_filter``; ``- Ctrl-C to stop`` unless the run stops by itself), a ``status``
    record with state ``tracing`` under ``--json``."""

    def on_ready(ready: list[str], failed: list[str]) -> None:
        session = session_ref()
        msg = f"tracing {what}on {len(ready)} host{'s' if len(ready) != 1 else ''}"
        if failed:
            msg += f" ({len(failed)} failed: {', '.join(failed)})"
        if show_filter and session.ports:
            msg += f", ports {','.join(map(str, session.ports))}"
        if show_filter and session.unconfirmed:
            msg += f" (not confirmed by {', '.join(session.unconfirmed)}: NAT legs may be missed)"
        if app.as_json:
            app.json.write({"type": "status", "state": "tracing", "hosts": ready,
                            "failed": failed, "ports": session.ports,
                            "unconfirmed": session.unconfirmed})  # fmt: skip
            app.json.flush()
        app.term.status(msg + ("" if stops_by_itself else " - Ctrl-C to stop"))

    return on_ready


def show_diagnostic(app: App) -> Callable[[str, str], None]:
    """``on_diagnostic`` of any trace command: a host's non-empty stderr line, as a status."""

    def on_diagnostic(host: str, text: str) -> None:
        if text.strip():
            app.term.status(f"{host}: {text}")

    return on_diagnostic


def run_trace(
    app: App,
    hosts: list[Host],
    script: Script,
    opts: FanoutOptions,
    make_session: Callable[..., TraceSession],
    *,
    what: str,
    stops_by_itself: bool,
    show_filter: bool = False,
    before_stop: Callable[[TraceSession], None] | None = None,
    command: str,
    yes: bool,
) -> tuple[Any, Fanout]:
    """Run ``script`` on ``hosts`` under the live status view: ``make_session(names,
    **callbacks)`` builds the session with the callbacks every trace command shows its
    progress with (see ``announce_tracing``); ``before_stop(session)`` runs before the
    hosts are told to stop; above CONFIRM_ABOVE hosts it asks first unless ``yes``.
    Returns the session and the engine once the run is over."""
    from ebpfdiag.fanout import Fanout

    names = [h.name for h in hosts]
    confirm_fleet(command, command, names, yes)
    made: list[TraceSession] = []
    on_ready = announce_tracing(
        app, what, lambda: made[0], stops_by_itself, show_filter=show_filter
    )
    with app.status_view(names) as status:
        session = make_session(
            names,
            on_ready=lambda r, f: (status.close(), on_ready(r, f)),
            on_state=status.set,
            on_diagnostic=show_diagnostic(app),
            on_host_ready=announce_ready(app),
            launched=process_started(),
        )
        made.append(session)
        hook = None if before_stop is None else partial(before_stop, session)
        engine = Fanout(hosts, script, opts, session, before_stop=hook)
        session.fanout = engine
        app.run(engine)
    return session, engine


def imported_on_call(module: str, name: str) -> Callable[..., Any]:
    """``module.name``, imported at its first call: correlation and rendering are not
    loaded on the way to ready."""
    function: Callable[..., Any] | None = None

    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal function
        if function is None:
            import importlib

            function = getattr(importlib.import_module(module), name)
        return function(*args, **kwargs)

    return call


def conclude(app: App, session: TraceSession, interrupted: bool, output: Path | None) -> int:
    """After the run: correlate, render (or finish the NDJSON stream), write ``--output``;
    returns the exit code (1 also when ``--output`` could not be written)."""
    from ebpfdiag.render.timeline import event_record

    result = session.finish(interrupted)
    saved = source_records(result)
    events = session.events
    # The stream had the packets and resets live; lost counts come with the rest at the end.
    lost = [event_record(e) for e in events if e["type"] == "lost"]
    records = emit_result(app, result, lost + saved)
    code = app.exit_code(
        [h.result for h in result.hosts.values() if h.result is not None], interrupted
    )
    if output is not None:
        live = [event_record(e) for e in events if e["type"] != "lost"]
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


# ---------------------------------------------------------------- trace drop

DROP_EXAMPLES = """
\b
Examples:
  ebpfdiag trace drop --hosts client,lb,server --port 80 --duration 30s
  ebpfdiag trace drop --hosts client,lb,server --addr 198.18.1.10 --count 5
  ebpfdiag trace drop --hosts lbs,web --port 443 --json | jq -r 'select(.type=="drop") | .text'
  ebpfdiag trace drop --hosts lbs,web --port 80 --rate 50 --duration 1m --output drop.json
"""

#: Host records the drop tracer sends besides tcp-rst's: events to align and show live,
#: and per-host totals of which the last one counts.
DROP_EVENTS = ("drop", "retrans")
DROP_TOTALS = ("drop_counts", "netstat")


def _drop_args(ports: tuple[str, ...], addrs: tuple[str, ...], rate: str | None) -> tuple[str, ...]:
    """The drop tool's argv, checked against its parameter schema before any host is
    contacted (``--duration`` and ``--count`` are counted here, across hosts)."""
    from ebpfdiag.catalog import script_path
    from ebpfdiag.remote.schema import tool_argv

    values: dict[str, object] = {"port": list(ports), "addr": list(addrs)}
    if rate is not None:
        values["rate"] = rate
    return tool_argv(script_path("drop"), values)


#: Drops on any host closer than this (aligned) share one window of the ``ctl drops`` line.
DROP_WINDOW_GAP_NS = 2_000_000_000
#: At most this many windows in one ``ctl drops`` line (the closest ones merge beyond it).
DROP_WINDOWS_MAX = 32


def drop_windows(epochs: list[int]) -> list[tuple[int, int]]:
    """Aligned drop times -> merged [(first, last)] windows, at most ``DROP_WINDOWS_MAX``."""
    windows: list[tuple[int, int]] = []
    for ts in sorted(epochs):
        if windows and ts - windows[-1][1] <= DROP_WINDOW_GAP_NS:
            windows[-1] = (windows[-1][0], ts)
        else:
            windows.append((ts, ts))
    while len(windows) > DROP_WINDOWS_MAX:
        gaps = [windows[i + 1][0] - windows[i][1] for i in range(len(windows) - 1)]
        i = gaps.index(min(gaps))
        windows[i : i + 2] = [(windows[i][0], windows[i + 1][1])]
    return windows


def _drop_session(names: list[str], count: int | None, **kwargs) -> TraceSession:
    """A TraceSession that also collects the drop tracer's records, stops after ``count``
    drop events, answers with ``questions.drop`` and, when the run stops, tells every host
    when drops happened (``ctl drops``) so that it sends the history of the flows active
    then: the other hosts' sightings of the dropped packets."""
    import asyncio

    from ebpfdiag.tracing import COUNT_SETTLE_S, TraceSession

    class DropSession(TraceSession):
        drops = 0
        windows_sent = False

        def _record(self, host: str, rec: dict) -> None:
            super()._record(host, rec)
            if rec.get("type") == "drop":
                self.drops += 1
                if count and self.drops == count and self.fanout is not None:
                    asyncio.get_running_loop().call_later(COUNT_SETTLE_S, self.fanout.stop)

        def window_lines(self) -> dict[str, str]:
            """Per host with a clock, ``drops T0-T1,...``: every host's drops so far in that
            host's own monotonic time. Empty without drops."""
            epochs = []
            for rec in self.events:
                clock = self.hosts[rec["host"]].clock if "host" in rec else None
                if rec.get("type") == "drop" and isinstance(rec.get("ts_ns"), int) and clock:
                    epochs.append(clock.at(rec["ts_ns"]).align(rec["ts_ns"]))
            windows = drop_windows(epochs)
            lines = {}
            for name, ht in self.hosts.items():
                if windows and ht.clock:
                    offset = ht.clock.at(ht.clock.segments[-1].last_h).offset_ns
                    lines[name] = "drops " + ",".join(
                        f"{lo - offset}-{hi - offset}" for lo, hi in windows
                    )
            return lines

        def send_windows(self) -> None:
            """Once, before the stop: the hosts' scripts read it before their stdin's EOF."""
            if self.windows_sent or self.fanout is None:
                return
            self.windows_sent = True
            for name, line in self.window_lines().items():
                self.fanout.control(name, line)

    return DropSession(
        names,
        correlate=partial(imported_on_call("ebpfdiag.questions.drop", "correlate"), hosts=names),
        keep=DROP_TOTALS,
        # held like packets, so that they are aligned and shown in time order
        held=("packet", "reset", *DROP_EVENTS),
        **kwargs,
    )


@trace.command("drop", epilog=DROP_EXAMPLES)
@host_options()
@click.option("--port", "ports", multiple=True, metavar="PORT[,PORT]", help="Only these ports.")
@click.option("--addr", "addrs", multiple=True, metavar="ADDR[,ADDR]", help="Only these addresses.")
@click.option("--duration", type=DURATION, help="Stop after this long (default: until Ctrl-C).")
@click.option("--count", type=click.IntRange(1), help="Stop after N drop events.")
@click.option("--rate", metavar="R",
              help="Drop events per second each host sends at most (the tool's default when "
              "not given); the rest are counted, not sent.")  # fmt: skip
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the whole trace as one JSON document.")  # fmt: skip
@yes_option
@pass_app
def drop(
    app: App,
    ports: tuple[str, ...],
    addrs: tuple[str, ...],
    duration: float | None,
    count: int | None,
    rate: str | None,
    output: Path | None,
    yes: bool,
) -> int:
    """Where a flow's packets die, on which host, and why.

    Attaches the kernel's drop tracepoint (skb:kfree_skb) on every host and reports each
    dropped packet of the traced traffic with the kernel's reason and location, joined to
    the sightings of the same packet on the other hosts (through DNAT/SNAT). At the end:
    drops by host, reason and location (the hosts' own counts, so rate-limited events are
    still counted), the kernel counters that grew without a drop event (listen queue
    overflows, SYN retransmissions), and the timeline of every flow with a drop.
    """
    from ebpfdiag.catalog import script_path
    from ebpfdiag.transport import Script

    live_line = imported_on_call("ebpfdiag.render.drop", "live_line")
    args = _drop_args(ports, addrs, rate)
    if output is not None:
        app.check_writable(output)
    hosts, opts = app.prepare_run()
    script = Script.from_path(script_path("drop"), args)
    t0: list[int] = []

    def show_event(rec: dict) -> None:
        if rec["type"] in DROP_EVENTS:
            if not t0 and rec.get("ts"):
                t0.append(rec["ts"])
            app.term.out.print(live_line(rec, t0[0] if t0 else None))

    session, engine = run_trace(
        app, hosts, script, opts,
        partial(_drop_session, count=count, duration=duration,
                **event_callbacks(app, show_event)),
        what="drops ", stops_by_itself=duration is not None or count is not None,
        command="trace drop", yes=yes,
        # the hosts learn when drops happened just before they stop
        before_stop=lambda s: s.send_windows(),
    )  # fmt: skip
    return _conclude_drop(app, session, engine.interrupted, output)


def drop_kept(events: list[dict]) -> list[dict]:
    """The end-of-run ``event``s of a drop trace: ``lost`` records and each host's last
    ``drop_counts`` and ``netstat`` (the last totals say everything)."""
    from ebpfdiag.render.timeline import event_record

    last: dict[tuple[str, str], dict] = {}
    for e in events:
        if e["type"] in DROP_TOTALS:
            last[(e["host"], e["type"])] = e
    kept = [event_record(e) for e in events if e["type"] == "lost"]
    return kept + [event_record(e) for e in last.values()]


def emit_drop(app: App, result: TraceResult, saved: list[dict], kept: list[dict]) -> list[dict]:
    """The end of a drop trace, live or from a file: host failures on stderr, then NDJSON
    (``kept`` events, ``saved`` hellos and clocks, the answer) or the terminal view."""
    from ebpfdiag.render.drop import render
    from ebpfdiag.render.timeline import trace_records

    records = [_one_shape(rec, result) for rec in trace_records(result)]
    for rec in records:
        if rec["type"] == "host" and rec["error"]:
            app.term.error(f"{rec['host']}: {rec['error']}")
    if app.as_json:
        for rec in kept + saved + records:
            app.json.write(rec)
        app.json.flush()
    else:
        render(result.correlation, app.term.out, app.term.err)
    return records


def _conclude_drop(app: App, session: TraceSession, interrupted: bool, output: Path | None) -> int:
    """After the run: the drop answer as NDJSON or tables and timelines, ``--output``."""
    from ebpfdiag.render.ndjson import SCHEMA_VERSION
    from ebpfdiag.render.timeline import event_record

    result = session.finish(interrupted)
    saved = source_records(result)
    events = session.events
    kept = drop_kept(events)
    records = emit_drop(app, result, saved, kept)
    code = app.exit_code(
        [h.result for h in result.hosts.values() if h.result is not None], interrupted
    )
    if output is not None:
        live = [event_record(e) for e in events if e["type"] not in ("lost", *DROP_TOTALS)]

        def of(*kinds: str) -> list[dict]:
            return [{"v": SCHEMA_VERSION, **r} for r in saved + records if r["type"] in kinds]

        doc = {
            "type": "trace", "v": SCHEMA_VERSION, "command": "drop",
            "hellos": of("hello"), "clocks": of("clock"), "hosts": of("host"),
            "events": [{"v": SCHEMA_VERSION, **e} for e in live + kept],
            "drop_counts": of("drop_count"), "netstat": of("netstat"), "drops": of("drop"),
            "flows": of("flow"), "warnings": of("warning"), "summary": of("summary")[0],
        }  # fmt: skip
        if not app.write_file(output, json.dumps(doc, indent=1) + "\n"):
            code = max(code, EXIT_HOSTS_FAILED)
    return code


# ---------------------------------------------------------------- trace latency

LATENCY_EXAMPLES = """
\b
Examples:
  ebpfdiag trace latency --hosts client,lb,server --port 80 --duration 30s
  ebpfdiag trace latency --hosts client,lb,server --port 8080 --sample 1 --slowest 3
  ebpfdiag trace latency --hosts lbs,web --json | jq -r 'select(.type=="verdict") | .text'
  ebpfdiag trace latency --hosts lbs,web --duration 1m --output latency.json
"""

#: tcp_latency's records that the latency question reads besides packets
LATENCY_KEEP = ("counts", "tcp_probe", "recv", "retrans")


@trace.command("latency", epilog=LATENCY_EXAMPLES)
@host_options()
@click.option("--port", "ports", multiple=True, metavar="PORT[,PORT]", help="Only these ports.")
@click.option("--addr", "addrs", multiple=True, metavar="ADDR[,ADDR]", help="Only these addresses.")
@click.option("--interfaces", metavar="IF[,IF]", help="Interfaces to watch (default: all but lo).")
@click.option("--duration", type=DURATION, help="Stop after this long (default: until Ctrl-C).")
@click.option("--sample", type=click.IntRange(1, 65536), metavar="N",
              help="Keep 1 sequence block (64 KiB) in N on every host, the same bytes "
              "everywhere. Default 32: a small request/response connection is followed "
              "whole 1 time in 32, bulk costs about 1 packet in 16. 1 keeps every packet "
              "(every exchange; more CPU on busy hosts).")  # fmt: skip
@click.option("--slowest", type=click.IntRange(0), default=5, show_default=True, metavar="K",
              help="Show the K slowest exchanges as timelines.")  # fmt: skip
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the whole trace as one JSON document ('ebpfdiag show' "
              "renders it again later, without the hosts).")  # fmt: skip
@click.option("--pcap", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the sampled packets as pcapng.")  # fmt: skip
@yes_option
@pass_app
def latency(
    app: App,
    ports: tuple[str, ...],
    addrs: tuple[str, ...],
    interfaces: str | None,
    duration: float | None,
    sample: int | None,
    slowest: int,
    output: Path | None,
    pcap: Path | None,
    yes: bool,
) -> int:
    """Where one flow's time goes: client host, wire, load balancer, server host.

    Samples the same bytes of every TCP flow on every host (TC on each interface, plus
    tcp_probe and the application's receive calls where the kernel has them), matches each
    sampled request across hosts and NAT with its response, tightens the hosts' clock
    offsets from the packets both ways, and reports per segment count, p50, p90, p99 and max
    (cross-host figures with their clock bound), one verdict per direction, and the slowest
    exchanges as timelines.
    """
    from ebpfdiag.catalog import script_path
    from ebpfdiag.remote.schema import tool_argv
    from ebpfdiag.tracing import TraceSession
    from ebpfdiag.transport import Script

    values: dict = {"port": list(ports), "addr": list(addrs),
                    "interfaces": [interfaces] if interfaces else []}  # fmt: skip
    if sample is not None:
        values["sample"] = sample
    tool = script_path("tcp_latency")
    args = tool_argv(tool, values)
    for path in (output, pcap):
        if path is not None:
            app.check_writable(path)
    hosts, opts = app.prepare_run()

    def show_event(rec: dict) -> None:
        """On a terminal the exchanges are shown at the end, none live."""

    correlate = imported_on_call("ebpfdiag.questions.latency", "correlate")
    session, engine = run_trace(
        app, hosts, Script.from_path(tool, args), opts,
        partial(TraceSession, duration=duration, **event_callbacks(app, show_event),
                correlate=partial(correlate, slowest=slowest), keep=LATENCY_KEEP),
        what="latency ", stops_by_itself=duration is not None,
        command="trace latency", yes=yes,
    )  # fmt: skip
    return conclude_latency(app, session, engine.interrupted, output, pcap)


def conclude_latency(
    app: App,
    session: TraceSession,
    interrupted: bool,
    output: Path | None,
    pcap: Path | None = None,
) -> int:
    """After a latency run: correlate, render (or end the NDJSON stream), write
    ``--output`` and ``--pcap``; returns the exit code."""
    from ebpfdiag.render.timeline import event_record

    result = session.finish(interrupted)
    saved = source_records(result)
    code = app.exit_code(
        [h.result for h in result.hosts.values() if h.result is not None], interrupted
    )
    events = session.events
    rest = [event_record(e) for e in events if e["type"] not in ("packet", "reset")]
    records = emit_latency(app, result, rest + saved)
    if output is not None:
        live = [event_record(e) for e in events if e["type"] in ("packet", "reset")]
        doc = latency_document(saved, live + rest, records)
        if not app.write_file(output, json.dumps(doc, indent=1) + "\n"):
            code = max(code, EXIT_HOSTS_FAILED)
    if pcap is not None:
        from ebpfdiag.render.pcapng import save_pcap

        if not save_pcap(pcap, events, session.hellos(), app.term.error):
            code = max(code, EXIT_HOSTS_FAILED)
    return code


def latency_records(result: TraceResult) -> list[dict]:
    """hosts, then the latency records, the summary with the fields every command has."""
    from ebpfdiag.render.timeline import host_record

    clocks = result.correlation.clocks
    flagged = set(getattr(clocks, "flagged", []))
    out: list[dict] = []
    for name, ht in result.hosts.items():
        est = clocks.get(name)
        clock = None
        if est is not None:
            clock = {"offset_ns": est.offset_ns, "error_ns": est.error_ns,
                     "flagged": name in flagged, "model": result.clocks.get(name)}  # fmt: skip
        out.append(_one_shape(host_record(ht, clock), result))
    for rec in result.correlation.records():
        if rec["type"] == "summary":
            failed = [n for n, h in result.hosts.items() if not (h.result and h.result.ok)]
            rec = _one_shape({**rec, "hosts": len(result.hosts), "failed_hosts": failed,
                              "interrupted": result.interrupted,
                              "duration_s": round(result.duration_s, 3)}, result)  # fmt: skip
        out.append(rec)
    return out


def emit_latency(app: App, result: TraceResult, saved: list[dict]) -> list[dict]:
    """The end of a latency trace, live or from a file: host failures on stderr, then
    NDJSON or the terminal view."""
    from ebpfdiag.render.latency import render_latency

    records = latency_records(result)
    for rec in records:
        if rec["type"] == "host" and rec["error"]:
            app.term.error(f"{rec['host']}: {rec['error']}")
    if app.as_json:
        for rec in saved + records:
            app.json.write(rec)
        app.json.flush()
    else:
        render_latency(result.correlation, app.term.out, app.term.err)
    return records


def latency_document(saved: list[dict], events: list[dict], records: list[dict]) -> dict:
    """``--output`` of trace latency: the ``--json`` records as one JSON document."""
    from ebpfdiag.render.ndjson import SCHEMA_VERSION

    def v(recs: list[dict]) -> list[dict]:
        return [{"v": SCHEMA_VERSION, **r} for r in recs]

    hosts = [r for r in records if r["type"] == "host"]
    body = [r for r in records if r["type"] not in ("host", "summary")]
    return {
        "type": "trace",
        "question": "latency",
        "v": SCHEMA_VERSION,
        "hellos": v([r for r in saved if r["type"] == "hello"]),
        "clocks": v([r for r in saved if r["type"] == "clock"]),
        "hosts": v(hosts),
        "events": v(events),
        "latency": v(body),
        "summary": v([r for r in records if r["type"] == "summary"])[0],
    }
