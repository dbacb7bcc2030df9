"""``ebpfdiag run-script``: push a self-contained script to hosts, run it with sudo, stream it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ebpfdiag.cli.app import DURATION, App, Sink, host_options, pass_app
from ebpfdiag.errors import UsageError
from ebpfdiag.records import json_lines
from ebpfdiag.remote.bundle import bundle
from ebpfdiag.render.ndjson import NDJSONWriter

if TYPE_CHECKING:
    from ebpfdiag.fanout import HostResult
    from ebpfdiag.render.terminal import HostPrefixer, StatusView


class JSONSink(Sink):
    """Every line becomes a record: JSON objects the script printed are kept structured.

    A valid object is spliced into its record as the host printed it rather than decoded
    and encoded again, and a batch stays bytes from the channel to stdout: no Python
    object per record on a busy stream.
    """

    def __init__(self, writer: NDJSONWriter):
        self.w = writer

    def lines(self, host: str, stream: str, lines: list[bytes]) -> None:
        self.w.write_bytes(json_lines(host, time.time_ns(), stream, lines))

    def result(self, result: HostResult) -> None:
        self.w.write(result.to_json())


class TerminalSink(Sink):
    """Prefixed lines on stdout (script stderr on stderr), live status, failures as they come."""

    def __init__(self, out: HostPrefixer, err: HostPrefixer, status: StatusView):
        self.out = out
        self.err = err
        self.status = status

    def state(self, host: str, state: str) -> None:
        self.status.set(host, state)

    def lines(self, host: str, stream: str, lines: list[bytes]) -> None:
        out = self.out if stream == "stdout" else self.err
        for line in lines:
            out.write(host, line.decode(errors="replace"))

    def result(self, result: HostResult) -> None:
        if not result.ok:
            self.status.note_failure(result)


def summary_record(results: list[HostResult], interrupted: bool, elapsed: float) -> dict:
    failed = [r.host for r in results if not r.ok]
    return {
        "type": "summary",
        "hosts": len(results),
        "ok": len(results) - len(failed),
        "failed": len(failed),
        "failed_hosts": failed,
        "interrupted": interrupted,
        "duration_s": round(elapsed, 3),
    }


EXAMPLES = """
\b
Examples:
  ebpfdiag run-script ./probe.py --hosts 'web[01-20],!web07'
  ebpfdiag run-script tcp_rst --hosts client,lb,server --duration 30s -- --port 80
  ebpfdiag run-script ./probe.py --hosts lbs --json | jq -c 'select(.type=="record")'
"""


@click.command("run-script", epilog=EXAMPLES)
@click.argument("script")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- SCRIPT ARGS]")
@host_options()
@click.option("--duration", type=DURATION, help="Stop the script after this long (a normal end).")
@click.option("--timeout", type=DURATION, help="Fail hosts whose script runs longer than this.")
@pass_app
def run_script(
    app: App,
    script: str,
    script_args: tuple[str, ...],
    duration: float | None,
    timeout: float | None,
) -> int:
    """Run SCRIPT (a local Python/BCC file, or a shipped script's name) on every host.

    The script is sent over the SSH channel (no files are left on hosts), runs with sudo
    under the host's python3 and ends when ebpfdiag ends. Lines stream back as they are
    printed. Exit code: 0 all hosts ok, 1 some failed, 2 bad input, 130 interrupted.
    """
    from ebpfdiag.catalog import resolve_script
    from ebpfdiag.fanout import Fanout
    from ebpfdiag.transport import Script

    path = resolve_script(script)
    remote = Script(path.name, _read_script(path), tuple(script_args))
    hosts, opts = app.prepare_run(timeout=timeout, duration=duration)
    started = time.monotonic()
    if app.as_json:
        engine = Fanout(hosts, remote, opts, JSONSink(app.json))
        results = app.run(engine)
        app.json.write(summary_record(results, engine.interrupted, time.monotonic() - started))
        app.json.flush()
    else:
        from ebpfdiag.render.tables import summary_table
        from ebpfdiag.render.terminal import HostPrefixer

        names = [h.name for h in hosts]
        out = HostPrefixer(names, app.term.stdout)
        err = HostPrefixer(names, app.term.stderr)
        with app.status_view(names) as status:
            engine = Fanout(hosts, remote, opts, TerminalSink(out, err, status))
            results = app.run(engine)
        summary_table(results, app.term.err)
    return app.exit_code(results, engine.interrupted)


def _read_script(path: Path) -> bytes:
    """Refuse a script that would only fail on every host: unreadable or not Python.
    What is sent is its bundle: the script with the core modules it imports, if any."""
    try:
        source = path.read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read script {path}: {exc.strerror}") from None
    try:
        compile(source, str(path), "exec")
    except SyntaxError as exc:
        raise UsageError(f"{path}:{exc.lineno}: {exc.msg}") from None
    except ValueError as exc:
        raise UsageError(f"{path}: {exc}") from None
    return bundle(path).encode()
