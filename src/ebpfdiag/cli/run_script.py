"""``ebpfdiag run-script``: push a self-contained script to hosts, run it with sudo, stream it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ebpfdiag.cli.app import DURATION, App, Sink, host_options, pass_app, summary_record
from ebpfdiag.cli.confirm import CONFIRM_ABOVE, confirm_fleet, yes_option
from ebpfdiag.errors import UsageError
from ebpfdiag.hostexpr import compress_names
from ebpfdiag.records import json_lines
from ebpfdiag.remote.bundle import bundle
from ebpfdiag.render.fold import FOLD_ABOVE
from ebpfdiag.render.ndjson import NDJSONWriter

if TYPE_CHECKING:
    from ebpfdiag.fanout import FanoutOptions, HostResult
    from ebpfdiag.inventory import Host
    from ebpfdiag.render.fold import OutputFolder
    from ebpfdiag.render.terminal import HostPrefixer, StatusView
    from ebpfdiag.transport import Script


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


class FoldSink(Sink):
    """Gathers every host's lines for folding at the end; the live block shows progress."""

    def __init__(self, folder: OutputFolder, status: StatusView):
        self.folder = folder
        self.status = status

    def state(self, host: str, state: str) -> None:
        self.status.set(host, state)

    def lines(self, host: str, stream: str, lines: list[bytes]) -> None:
        self.folder.add(host, stream, lines)

    def result(self, result: HostResult) -> None:
        if not result.ok:
            self.status.note_failure(result)


EXAMPLES = f"""
\b
Examples:
  ebpfdiag run-script ./probe.py --hosts 'web[01-20],!web07'
  ebpfdiag run-script tcp_rst --hosts client,lb,server --duration 30s -- --port 80
  ebpfdiag run-script ./probe.py --hosts lbs --json | jq -c 'select(.type=="record")'
  ebpfdiag run-script ./probe.py --hosts 'web[001-900]' --canary 5 --yes

\b
Large runs:
  Above {FOLD_ABOVE} hosts the output is folded: one block per distinct stdout with the
  hosts that printed it (web[001-120,122]), then failures grouped by cause; --no-fold
  lists every line as it comes. Above {CONFIRM_ABOVE} hosts run-script asks first
  (--yes skips; without a terminal --yes is required). --canary K runs the first K
  hosts of the selection alone and stops there if any of them fails.
  --fanout (hosts worked on at once, default 64): one controller core starts about
  110-140 hosts a second; 64 suits most fleets (measured at 500 hosts: 32 took 30 s,
  64 and 128 took 24-26 s, 256 took 27 s); raise it for far-away hosts (long round
  trips), lower it when one sshd (a bastion's) refuses connections past its
  MaxStartups. Figures: docs/benchmarks.md, fan-out.
"""


@click.command("run-script", epilog=EXAMPLES)
@click.argument("script")
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED, metavar="[-- SCRIPT ARGS]")
@host_options()
@click.option("--duration", type=DURATION, help="Stop the script after this long (a normal end).")
@click.option("--timeout", type=DURATION, help="Fail hosts whose script runs longer than this.")
@click.option(
    "--fold/--no-fold",
    default=None,
    help=f"Gather identical outputs into one block per distinct output, shown at the end "
    f"[default: fold above {FOLD_ABOVE} hosts]. No effect on --json.",
)
@click.option(
    "--canary",
    type=click.IntRange(min=1),
    metavar="K",
    help="Run on the first K hosts first; if any of them fails, stop (exit 1) without "
    "starting the rest.",
)
@yes_option
@pass_app
def run_script(
    app: App,
    script: str,
    script_args: tuple[str, ...],
    duration: float | None,
    timeout: float | None,
    fold: bool | None,
    canary: int | None,
    yes: bool,
) -> int:
    """Run SCRIPT (a local Python/BCC file, or a shipped script's name) on every host.

    The script is sent over the SSH channel (no files are left on hosts), runs with sudo
    under the host's python3 and ends when ebpfdiag ends. Lines stream back as they are
    printed (or are folded at the end, see below). Exit code: 0 all hosts ok, 1 some
    failed (or a canary did), 2 bad input or not confirmed, 130 interrupted.
    """
    from ebpfdiag.catalog import resolve_script
    from ebpfdiag.transport import Script

    path = resolve_script(script)
    remote = Script(path.name, _read_script(path), tuple(script_args))
    hosts, opts = app.prepare_run(timeout=timeout, duration=duration)
    confirm_fleet("run-script", path.name, [h.name for h in hosts], yes, canary)
    phases = [hosts[:canary], hosts[canary:]] if canary and canary < len(hosts) else [hosts]
    started = time.monotonic()
    if app.as_json:
        results, interrupted, not_run = run_phases(app, phases, remote, opts, JSONSink(app.json))
        summary = summary_record(
            results, interrupted, time.monotonic() - started, not_run=list(not_run)
        )
        app.json.write(summary)
        app.json.flush()
    else:
        from ebpfdiag.render.fold import OutputFolder
        from ebpfdiag.render.terminal import HostPrefixer, StatusView

        fold = len(hosts) > FOLD_ABOVE if fold is None else fold
        names = [h.name for h in hosts]
        aliases = {h.name: host_aliases(h) for h in hosts}
        status = StatusView(names, app.term.err, aliases=aliases, failure_lines=not fold)
        if fold:
            folder = OutputFolder(names)
            sink: Sink = FoldSink(folder, status)
        else:
            out = HostPrefixer(names, app.term.stdout)
            err = HostPrefixer(names, app.term.stderr)
            sink = TerminalSink(out, err, status)
        with status:
            results, interrupted, not_run = run_phases(app, phases, remote, opts, sink)
        if fold:
            print_folded(app, folder, results, aliases)
        else:
            from ebpfdiag.render.tables import summary_table

            summary_table(results, app.term.err)
    if not_run and not interrupted:
        failed = [r.host for r in results if not r.ok]
        app.term.error(
            f"canary failed on {len(failed)} of {len(phases[0])} hosts "
            f"({compress_names(failed)}); not started on the other {len(not_run)} hosts"
        )
    return app.exit_code(results, interrupted)


def run_phases(
    app: App, phases: list[list[Host]], remote: Script, opts: FanoutOptions, sink: Sink
) -> tuple[list[HostResult], bool, list[str]]:
    """Run the canary batch (if any), then the rest unless a canary failed.
    Returns every result, whether the run was interrupted, and the hosts not started
    (because a canary failed, or Ctrl-C came during the canaries)."""
    from ebpfdiag.fanout import Fanout

    results: list[HostResult] = []
    for index, batch in enumerate(phases):
        engine = Fanout(batch, remote, opts, sink)
        results += app.run(engine)
        later = [h.name for phase in phases[index + 1 :] for h in phase]
        if engine.interrupted:
            return results, True, later
        if later and not all(r.ok for r in results):
            return results, False, later
    return results, False, []


def host_aliases(host: Host) -> tuple[str, ...]:
    """How a host's failure messages may name it besides its name (its address, with or
    without a port), so that equal causes fold whatever the host."""
    return (host.address,)


def print_folded(
    app: App, folder: OutputFolder, results: list[HostResult], aliases: dict[str, tuple]
) -> None:
    """Stdout blocks on stdout, stderr blocks on stderr, then failures by cause and a
    one-line count, most hosts first in each."""
    from ebpfdiag.render.fold import failure_line, fold_failures, hosts_phrase, render_block

    out = [line for block in folder.blocks("stdout") for line in render_block(block)]
    if out:
        app.term.stdout.write("\n".join(out) + "\n")
        app.term.stdout.flush()
    err = [line for block in folder.blocks("stderr") for line in render_block(block)]
    if err:
        app.term.stderr.write("\n".join(err) + "\n")
        app.term.stderr.flush()
    console = app.term.err
    failed = [(r.host, r.error or r.status) for r in results if not r.ok]
    for group in fold_failures(failed, aliases):
        console.print(
            failure_line(group), style="red", markup=False, highlight=False, soft_wrap=True
        )
    silent = folder.silent(r.host for r in results if r.ok)
    if silent:
        console.print(
            f"{hosts_phrase(len(silent))} ok without output: {compress_names(silent)}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
    ok = len(results) - len(failed)
    console.print(
        f"{ok}/{len(results)} hosts ok",
        style="red" if failed else "green",
        markup=False,
        highlight=False,
    )


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
