"""``ebpfdiag metrics serve|textfile``: kernel network counters from many hosts, nothing installed.

Each host runs the ``netmetrics`` tool over a long-lived SSH session (its counters live in
the host's kernel, its deltas come every interval); the controller keeps per-host totals
(:mod:`ebpfdiag.metrics.accumulator`), reconnects lost hosts with backoff
(:mod:`ebpfdiag.metrics.sessions`) and exposes everything through prometheus_client.
"""

from __future__ import annotations

import ipaddress
import time
from pathlib import Path

import click

from ebpfdiag.cli.app import DURATION, App, host_options, pass_app
from ebpfdiag.cli.confirm import confirm_fleet, yes_option
from ebpfdiag.errors import EXIT_HOSTS_FAILED, EXIT_INTERRUPTED, EXIT_OK, UsageError

TOOL = "netmetrics"
TEXTFILE = "ebpfdiag.prom"

EXAMPLES_SERVE = """
\b
Examples:
  ebpfdiag metrics serve --hosts 'web[01-20]' --listen 127.0.0.1:9469
  ebpfdiag metrics serve --hosts lab --listen '[::1]:9469' --interval 5s --host-label role
  curl -s 127.0.0.1:9469/metrics | grep ebpfdiag_tcp_resets_sent_total
"""

EXAMPLES_TEXTFILE = """
\b
Examples:
  ebpfdiag metrics textfile --hosts lbs --dir /var/lib/prometheus/node-exporter
  ebpfdiag metrics textfile --hosts lab --dir /tmp/prom --interval 5s --once
"""


@click.group("metrics")
def metrics() -> None:
    """Continuous TCP metrics from many hosts for Prometheus, counted in their kernels.

    Resets sent (by kernel reason, socket state, listening port) and received,
    retransmissions, listen queue overflows and drops, connection set-up time, and packets
    dropped by the kernel's drop reason, per host. Hosts that drop off are reconnected with
    backoff; their counters continue. See docs/metrics.md for names and alert rules.
    """


def common_options(f):
    opts = [
        click.option(
            "--interval",
            type=DURATION,
            default="15s",
            show_default=True,
            help="How often each host sends what changed (and textfile mode writes).",
        ),
        click.option(
            "--port-labels",
            type=click.IntRange(0, 64),
            default=16,
            show_default=True,
            help="Listening ports per host that may label resets (0: no port label).",
        ),
        click.option(
            "--host-label",
            "host_labels",
            multiple=True,
            metavar="KEY",
            help="Inventory label KEY becomes a label on every series of the host "
            "(repeatable; 'groups' gives the host's groups).",
        ),
        yes_option,
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def parse_listen(text: str) -> tuple[str, int]:
    """'ADDR:PORT' or '[V6]:PORT' -> (addr, port); anything else is a usage error."""
    host, sep, port = text.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number = 0
    if not sep or not 0 < number < 65536:
        raise UsageError(f"--listen {text}: expected ADDR:PORT such as 127.0.0.1:9469")
    return host, number


def _label_name(key: str) -> str:
    from ebpfdiag.metrics.accumulator import NAME_RE, RESERVED_LABELS

    name = key.replace("-", "_").replace(".", "_").lower()
    if not NAME_RE.match(name) or name in RESERVED_LABELS:
        raise UsageError(f"--host-label {key}: not usable as a Prometheus label name")
    return name


class Runner:
    """What serve and textfile share: hosts, script, fleet, sessions, status lines."""

    def __init__(
        self,
        app: App,
        command: str,
        interval: float,
        port_labels: int,
        host_labels: tuple[str, ...],
        yes: bool,
    ):
        from ebpfdiag.catalog import script_path
        from ebpfdiag.remote.schema import tool_argv

        path = script_path(TOOL)
        args = tool_argv(path, {"interval": interval, "port-labels": port_labels})
        names = {key: _label_name(key) for key in host_labels}
        self.app = app
        self.interval = interval
        self.hosts, self.opts = app.prepare_run()
        confirm_fleet(command, command, [h.name for h in self.hosts], yes)
        extra = {}
        for h in self.hosts:
            values = {k: ",".join(h.groups) for k in host_labels if k == "groups"}
            values.update({k: h.labels.get(k, "") for k in host_labels if k != "groups"})
            extra[h.name] = {names[k]: v for k, v in values.items()}
        from ebpfdiag.metrics.exposition import Fleet
        from ebpfdiag.transport import Script

        self.fleet = Fleet([h.name for h in self.hosts], extra)
        self.script = Script.from_path(path, args)
        self.sessions = None

    def on_state(self, host: str, up: bool, error: str | None) -> None:
        with self.fleet.lock:
            missing = list(self.fleet.hosts[host].missing) if up else []
        if self.app.as_json:
            rec = {"type": "metrics-host", "host": host, "up": up, "error": error}
            self.app.json.write({**rec, "missing": missing})
            self.app.json.flush()
        elif up:
            note = f" (not counted: {'; '.join(missing)})" if missing else ""
            self.app.term.status(f"metrics: {host} up{note}")
        else:
            self.app.term.error(f"{host}: {error}")

    def run(self, tick=None) -> bool:
        """Run every host's session until stopped (signals, or ``tick`` returning False
        when called each interval). Returns whether the stop was an interrupt (Ctrl-C)."""
        import asyncio
        import contextlib
        import signal

        from ebpfdiag.fanout import raise_fd_limit
        from ebpfdiag.metrics.sessions import Sessions

        raise_fd_limit(len(self.hosts))
        sessions = Sessions(
            self.hosts,
            self.script,
            self.opts.ssh,
            self.fleet,
            self.interval,
            self.on_state,
            self.opts.fanout,
        )
        self.sessions = sessions

        async def ticker() -> None:
            while tick is not None:
                await asyncio.sleep(min(self.interval, 1.0) if tick.wants_fast else self.interval)
                if not tick():
                    sessions.stop()
                    return

        async def runner() -> None:
            loop = asyncio.get_running_loop()
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGINT, sessions.stop, True)
                loop.add_signal_handler(signal.SIGTERM, sessions.stop, False)
                loop.add_signal_handler(signal.SIGHUP, sessions.stop, False)
            ticking = asyncio.ensure_future(ticker())
            try:
                await sessions.run()
            finally:
                ticking.cancel()

        asyncio.run(runner())
        return sessions.interrupted


@metrics.command("serve", epilog=EXAMPLES_SERVE)
@host_options()
@click.option("--listen", required=True, metavar="ADDR:PORT", help="Where to serve /metrics.")
@common_options
@pass_app
def serve(
    app: App,
    listen: str,
    interval: float,
    port_labels: int,
    host_labels: tuple[str, ...],
    yes: bool,
) -> int:
    """Serve every host's counters on http://ADDR:PORT/metrics until stopped."""
    addr, port = parse_listen(listen)
    runner = Runner(app, "metrics serve", interval, port_labels, host_labels, yes)
    from prometheus_client import start_http_server

    from ebpfdiag.metrics.exposition import registry_for

    try:
        server, thread = start_http_server(port, addr, registry=registry_for(runner.fleet))
    except OSError as exc:
        raise UsageError(f"cannot listen on {listen}: {exc.strerror or exc}") from None
    shown = f"[{addr}]" if ":" in addr else addr
    app.term.status(
        f"metrics: serving http://{shown}:{port}/metrics for {len(runner.hosts)} hosts "
        f"every {interval:g}s - Ctrl-C to stop"
    )
    try:
        interrupted = runner.run()
    finally:
        server.shutdown()
        thread.join(timeout=5)
    return EXIT_INTERRUPTED if interrupted else EXIT_OK


def check_textfile_dir(path: Path) -> None:
    """Refuse a directory the file could not be renamed into, before any host is contacted.

    Probed with a temporary file whose name the collector ignores: creating the .prom file
    itself would show the collector an empty file until the first write."""
    import tempfile

    if path.is_dir():
        raise UsageError(f"cannot write {path}: is a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.check."):
            pass
    except OSError as exc:
        raise UsageError(f"cannot write {path}: {exc.strerror or exc}") from None


class TextfileTick:
    """Writes the file every interval; with ``once``, when every host has reported or
    failed once, then stops the run."""

    def __init__(self, app: App, runner: Runner, path: Path, once: bool):
        self.app = app
        self.runner = runner
        self.path = path
        self.once = once
        self.wants_fast = once
        self.failed = False
        #: hosts that were down when the file was last written
        self.down: list[str] = []

    def settled(self) -> bool:
        """Every host has sent a delta, or has failed at least once."""
        fleet = self.runner.fleet
        with fleet.lock:
            return all(h.deltas or h.error is not None for h in fleet.hosts.values())

    def write(self) -> bool:
        from prometheus_client import write_to_textfile

        from ebpfdiag.metrics.exposition import registry_for

        fleet = self.runner.fleet
        with fleet.lock:
            self.down = [h.name for h in fleet.hosts.values() if not h.up]
        try:
            write_to_textfile(str(self.path), registry_for(fleet))
        except OSError as exc:
            self.app.term.error(f"cannot write {self.path}: {exc.strerror or exc}")
            self.failed = True
            return False
        return True

    def __call__(self) -> bool:
        if self.once:
            if not self.settled():
                return True
            self.write()
            return False
        self.write()
        return True


@metrics.command("textfile", epilog=EXAMPLES_TEXTFILE)
@host_options()
@click.option(
    "--dir",
    "directory",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="node_exporter's textfile collector directory; writes ebpfdiag.prom there.",
)
@click.option("--once", is_flag=True, help="Write once every host has reported (or failed).")
@common_options
@pass_app
def textfile(
    app: App,
    directory: Path,
    once: bool,
    interval: float,
    port_labels: int,
    host_labels: tuple[str, ...],
    yes: bool,
) -> int:
    """Write every host's counters to DIR/ebpfdiag.prom every interval (atomically: a
    temporary file renamed over it), for node_exporter's textfile collector."""
    if not directory.is_dir():
        raise UsageError(f"--dir {directory}: not a directory")
    path = directory / TEXTFILE
    check_textfile_dir(path)
    runner = Runner(app, "metrics textfile", interval, port_labels, host_labels, yes)
    tick = TextfileTick(app, runner, path, once)
    started = time.monotonic()
    interrupted = runner.run(tick)
    if interrupted:
        return EXIT_INTERRUPTED
    if once:
        took = time.monotonic() - started
        down = f"; down: {','.join(tick.down)}" if tick.down else ""
        app.term.status(f"metrics: wrote {path} after {took:.1f}s{down}")
        return EXIT_HOSTS_FAILED if tick.down or tick.failed else EXIT_OK
    tick.write()  # the last totals, after every host stopped
    return EXIT_HOSTS_FAILED if tick.failed else EXIT_OK
