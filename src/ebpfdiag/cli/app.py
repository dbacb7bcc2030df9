"""The application object of one ``ebpfdiag`` run, and the one place errors become exit codes.

The root group builds an :class:`App` into ``ctx.obj``. It carries the options every
host-reaching command shares (declared once here and stored on the app, not passed to
each command), the terminal writer (data to stdout, status to stderr) and the JSON writer
(NDJSON on stdout). Heavy modules (asyncssh, rich, correlation) are imported only where a
command needs them, so ``--version`` and ``hosts`` start quickly.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import click

from ebpfdiag.errors import (
    EXIT_HOSTS_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    EbpfdiagError,
    UsageError,
)

if TYPE_CHECKING:
    from rich.console import Console

    from ebpfdiag.clock import ClockSample
    from ebpfdiag.fanout import Fanout, FanoutOptions, HostResult
    from ebpfdiag.inventory import Host
    from ebpfdiag.render.ndjson import NDJSONWriter
    from ebpfdiag.render.terminal import StatusView

PROG = "ebpfdiag"
#: Same value as ``ebpfdiag.fanout.DEFAULT_FANOUT`` (a test checks it); repeated here so that
#: declaring the options does not import asyncssh.
DEFAULT_FANOUT = 64

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|)\s*$")


def process_started() -> float | None:
    """This process's start on the ``time.monotonic()`` clock (from /proc, to 10 ms), so
    that a time to ready counts the interpreter and the imports as a user waits for
    them; None where /proc does not say."""
    try:
        with open("/proc/self/stat") as f:
            after_comm = f.read().rsplit(")", 1)[1].split()
        ticks = int(after_comm[19])  # field 22, starttime: clock ticks after boot
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
    return time.monotonic() - max(age, 0.0)


def parse_duration(text: str) -> float:
    """'90', '90s', '1.5m', '500ms', '2h' -> seconds; anything else is a usage error."""
    m = _DURATION.match(text)
    if not m:
        raise UsageError(f"invalid duration '{text}' (use e.g. 30s, 5m, 500ms, 1h)")
    return float(m.group(1)) * _UNITS[m.group(2)]


class Duration(click.ParamType):
    name = "DURATION"

    def convert(self, value, param, ctx):
        if isinstance(value, int | float):
            return float(value)
        try:
            return parse_duration(value)
        except UsageError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()


class Terminal:
    """All human-readable output: data on stdout, status and errors on stderr.

    rich is loaded the first time a console is asked for, so commands that only print
    plain lines never pay for it.
    """

    def __init__(self, stdout: TextIO | None = None, stderr: TextIO | None = None):
        self.stdout = stdout or sys.stdout
        self.stderr = stderr or sys.stderr
        self._out: Console | None = None
        self._err: Console | None = None

    @property
    def out(self) -> Console:
        """Tables and timelines; when piped they keep 200 columns instead of 80."""
        if self._out is None:
            from rich.console import Console

            width = None if self.stdout.isatty() else 200
            self._out = Console(file=self.stdout, highlight=False, width=width)
        return self._out

    @property
    def err(self) -> Console:
        if self._err is None:
            from rich.console import Console

            self._err = Console(file=self.stderr, highlight=False)
        return self._err

    def data(self, text: str) -> None:
        """A plain line of data on stdout (no markup, no wrapping)."""
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def status(self, text: str) -> None:
        """A plain status line on stderr (through the console when one is live)."""
        if self._err is not None:
            self._err.print(text, markup=False, highlight=False, soft_wrap=True)
        else:
            self.stderr.write(text + "\n")
            self.stderr.flush()

    def error(self, text: str) -> None:
        """``ebpfdiag: text`` on stderr: a host's failure or a problem that does not stop us."""
        self.status(f"{PROG}: {text}")


class NullStatus:
    """The status view of ``--json`` runs: nothing is drawn, stderr stays quiet."""

    def __enter__(self) -> NullStatus:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def close(self) -> None:
        pass

    def set(self, host: str, state: str) -> None:
        pass

    def note_failure(self, result: HostResult) -> None:
        pass


class Sink:
    """A fan-out sink that ignores every event; sinks override only what they use."""

    wants_clock = False

    def state(self, host: str, state: str) -> None:
        pass

    def lines(self, host: str, stream: str, lines: list[bytes]) -> None:
        pass

    def clock(self, host: str, sample: ClockSample) -> None:
        pass

    def result(self, result: HostResult) -> None:
        pass


class RecordSink(Sink):
    """Keeps the JSON records of one ``type`` each host prints on stdout (tagged with
    the host), for commands whose tool answers in records: doctor, runner."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.records: dict[str, list[dict]] = {}

    def lines(self, host: str, stream: str, lines: list[bytes]) -> None:
        if stream != "stdout":
            return
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("type") == self.kind:
                self.records.setdefault(host, []).append({**rec, "host": host})


def summary_record(
    results: list[HostResult],
    interrupted: bool,
    elapsed: float,
    failed: list[str] | None = None,
    **extra: object,
) -> dict:
    """The last record of a command that ran something on hosts (docs/json.md);
    ``failed`` when the command judges hosts itself, ``extra`` its own fields."""
    if failed is None:
        failed = [r.host for r in results if not r.ok]
    return {
        "type": "summary",
        "hosts": len(results),
        "ok": len(results) - len(failed),
        "failed": len(failed),
        "failed_hosts": failed,
        "interrupted": interrupted,
        "duration_s": round(elapsed, 3),
        **extra,
    }


@dataclass
class HostOptions:
    """What every host-reaching command takes: which hosts, and how to reach them."""

    hosts_expr: str = ""
    inventory: str | None = None
    fanout: int = DEFAULT_FANOUT
    accept_new_host_keys: bool = False
    ask_sudo_pass: bool = False


class App:
    """One per invocation, in ``ctx.obj``: shared options, output writers, exit codes."""

    def __init__(self, stdout: TextIO | None = None, stderr: TextIO | None = None):
        self.options = HostOptions()
        self.as_json = False
        self.term = Terminal(stdout, stderr)
        self._json: NDJSONWriter | None = None
        self._stop: Callable[[], None] | None = None

    # -- output ----------------------------------------------------------------------
    @property
    def json(self) -> NDJSONWriter:
        """NDJSON on stdout; a closed pipe (``| head``) stops the running hosts cleanly."""
        if self._json is None:
            from ebpfdiag.render.ndjson import NDJSONWriter

            self._json = NDJSONWriter(self.term.stdout, on_closed=self._output_closed)
        return self._json

    def _output_closed(self) -> None:
        if self._stop is not None:
            self._stop()

    def status_view(self, names: list[str]) -> StatusView | NullStatus:
        """The live per-host block on a terminal's stderr; never under ``--json``."""
        if self.as_json:
            return NullStatus()
        from ebpfdiag.render.terminal import StatusView

        return StatusView(names, self.term.err)

    # -- hosts -----------------------------------------------------------------------
    def select_hosts(self) -> tuple[list[Host], dict[str, Host]]:
        """Inventory + expression -> hosts and their jump hosts (chains included); every
        problem is a one-line usage error."""
        from ebpfdiag.inventory import load_inventory, resolve_hosts, resolve_jump

        inv = load_inventory(self.options.inventory)
        hosts = resolve_hosts(inv, self.options.hosts_expr)
        jumps: dict[str, Host] = {}
        todo = list(hosts)
        while todo:
            host = todo.pop()
            jump = resolve_jump(inv, host)
            if jump is not None and host.name not in jumps:
                jumps[host.name] = jump
                todo.append(jump)
        return hosts, jumps

    def prepare_run(
        self, *, timeout: float | None = None, duration: float | None = None
    ) -> tuple[list[Host], FanoutOptions]:
        """Hosts and fan-out options from the shared options; the sudo password is asked
        for only once the selection is known to be valid."""
        import getpass

        from ebpfdiag.fanout import FanoutOptions
        from ebpfdiag.transport import SSHOptions

        hosts, jumps = self.select_hosts()
        password = None
        if self.options.ask_sudo_pass:
            try:
                # getpass reads the controlling terminal, else a terminal on stdin; with
                # neither it would read an echoing stdin (with warnings): refuse that
                if not sys.stdin.isatty():
                    with open("/dev/tty"):
                        pass
                password = getpass.getpass("sudo password: ")
            except (EOFError, OSError) as exc:
                raise UsageError("--ask-sudo-pass needs a terminal to ask on") from exc
        ssh = SSHOptions(
            accept_new_host_keys=self.options.accept_new_host_keys,
            sudo_password=password,
            jumps=jumps,
        )
        opts = FanoutOptions(
            fanout=self.options.fanout, timeout=timeout, duration=duration, ssh=ssh
        )
        return hosts, opts

    def run(self, engine: Fanout) -> list[HostResult]:
        """Run the fan-out. Ctrl-C / SIGTERM / SIGHUP and a closed stdout ask every host to
        stop cleanly (a second Ctrl-C does not skip the cleanup: remote scripts clean up on
        their own when the channel closes)."""
        import asyncio
        import contextlib
        import signal

        self._stop = engine.stop

        async def runner() -> list[HostResult]:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, engine.stop, True)
            return await engine.run()

        try:
            return asyncio.run(runner())
        finally:
            self._stop = None

    @staticmethod
    def exit_code(results: list[HostResult], interrupted: bool) -> int:
        if interrupted:
            return EXIT_INTERRUPTED
        return EXIT_OK if all(r.ok for r in results) else EXIT_HOSTS_FAILED

    # -- files -----------------------------------------------------------------------
    @staticmethod
    def check_writable(path: Path) -> None:
        """Refuse an output file that could not be written, before any host is contacted
        (an existing file is left as it is)."""
        existed = path.exists()
        if path.is_dir():
            raise UsageError(f"cannot write {path}: is a directory")
        try:
            with open(path, "a"):
                pass
        except OSError as exc:
            raise UsageError(f"cannot write {path}: {exc.strerror}") from None
        if not existed:
            path.unlink()

    def write_file(self, path: Path, text: str) -> bool:
        """Write ``text``; on failure say so on stderr and return False (exit code 1)."""
        try:
            path.write_text(text)
        except OSError as exc:
            self.term.error(f"cannot write {path}: {exc.strerror}")
            return False
        return True


pass_app = click.make_pass_decorator(App, ensure=True)


def _store(field: str) -> Callable[[click.Context, click.Parameter, Any], Any]:
    """An option callback that puts the value on the app instead of the command's kwargs."""

    def callback(ctx: click.Context, _param: click.Parameter, value: Any) -> Any:
        app = ctx.ensure_object(App)
        if field == "as_json":
            app.as_json = bool(value)
        else:
            setattr(app.options, field, value)
        return value

    return callback


def json_option(f):
    return click.option(
        "--json",
        is_flag=True,
        expose_value=False,
        callback=_store("as_json"),
        help="NDJSON records on stdout (schema: docs/json.md).",
    )(f)


def host_options(*, ssh: bool = True):
    """-H/--hosts, -i/--inventory, --json and, for commands that connect, --fanout,
    --accept-new-host-keys, --ask-sudo-pass. Values land in ``app.options``/``app.as_json``."""
    opts = [
        click.option(
            "-H",
            "--hosts",
            required=True,
            metavar="EXPR",
            expose_value=False,
            callback=_store("hosts_expr"),
            help="Hosts: names, groups, web[01-20], !web07, user@addr:port; comma-separated.",
        ),
        click.option(
            "-i",
            "--inventory",
            metavar="FILE",
            expose_value=False,
            callback=_store("inventory"),
            help="Inventory YAML (default: $EBPFDIAG_INVENTORY, ./inventory.yaml, "
            "~/.config/ebpfdiag/inventory.yaml).",
        ),
    ]
    if ssh:
        opts += [
            click.option(
                "--fanout",
                type=click.IntRange(1, 4096),
                default=DEFAULT_FANOUT,
                show_default=True,
                expose_value=False,
                callback=_store("fanout"),
                help="Hosts worked on at once (guidance: run-script --help).",
            ),
            click.option(
                "--accept-new-host-keys",
                is_flag=True,
                expose_value=False,
                callback=_store("accept_new_host_keys"),
                help="Trust and record keys of hosts not yet in known_hosts (like OpenSSH "
                "StrictHostKeyChecking=accept-new); a changed key is still refused.",
            ),
            click.option(
                "--ask-sudo-pass",
                is_flag=True,
                expose_value=False,
                callback=_store("ask_sudo_pass"),
                help="Ask once for the sudo password (sent over the SSH channel, never in argv).",
            ),
        ]

    def decorate(f):
        f = json_option(f)
        if ssh:
            from ebpfdiag.cli.options import audit_log_option

            f = audit_log_option(f)
        for opt in reversed(opts):
            f = opt(f)
        return f

    return decorate


class LazyGroup(click.Group):
    """A group whose commands are imported when used, so ``--version`` imports none."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return [*self.lazy, *super().list_commands(ctx)]

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy:
            import importlib

            module, attr = self.lazy[name].split(":")
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"{PROG}: {message}\n")
    sys.exit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one line and an exit code for every error a user can cause."""
    from ebpfdiag.cli import cli

    try:
        code = cli.main(args=argv, standalone_mode=False, prog_name=PROG)
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
        sys.exit(EXIT_USAGE)
    except click.UsageError as exc:
        path = exc.ctx.command_path if exc.ctx else PROG
        _fail(f"{exc.format_message()} (see '{path} --help')", EXIT_USAGE)
    except click.exceptions.Abort:
        _fail("interrupted", EXIT_INTERRUPTED)
    except click.ClickException as exc:
        _fail(exc.format_message(), exc.exit_code)
    except EbpfdiagError as exc:
        _fail(str(exc), exc.exit_code)
    except KeyboardInterrupt:
        _fail("interrupted", EXIT_INTERRUPTED)
    except BrokenPipeError:
        sys.exit(EXIT_OK)
    sys.exit(code if isinstance(code, int) else EXIT_OK)
