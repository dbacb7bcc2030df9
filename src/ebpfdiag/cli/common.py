"""Options and plumbing shared by the commands that reach hosts."""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import re
import signal
from collections.abc import Callable, Coroutine
from typing import Any

import click

from ebpfdiag.errors import EXIT_HOSTS_FAILED, EXIT_INTERRUPTED, EXIT_OK, UsageError
from ebpfdiag.fanout import DEFAULT_FANOUT, FanoutOptions, HostResult
from ebpfdiag.inventory import Host, load_inventory, resolve_hosts, resolve_jump
from ebpfdiag.transport import SSHOptions

_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "": 1.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|)\s*$")


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


def inventory_option(f):
    return click.option(
        "-i",
        "--inventory",
        metavar="FILE",
        help="Inventory YAML (default: $EBPFDIAG_INVENTORY, ./inventory.yaml, "
        "~/.config/ebpfdiag/inventory.yaml).",
    )(f)


def hosts_option(f):
    return click.option(
        "-H",
        "--hosts",
        "hosts_expr",
        required=True,
        metavar="EXPR",
        help="Hosts: names, groups, web[01-20], !web07, user@addr:port; comma-separated.",
    )(f)


def json_option(f):
    return click.option("--json", "as_json", is_flag=True, help="NDJSON records on stdout.")(f)


def ssh_options(f):
    """Options every command that runs something on hosts shares."""
    for opt in reversed(
        [
            click.option(
                "--fanout",
                type=click.IntRange(1, 4096),
                default=DEFAULT_FANOUT,
                show_default=True,
                help="Hosts worked on at once.",
            ),
            click.option(
                "--accept-new-host-keys",
                is_flag=True,
                help="Trust and record keys of hosts not yet in known_hosts (like OpenSSH "
                "StrictHostKeyChecking=accept-new); a changed key is still refused.",
            ),
            click.option(
                "--ask-sudo-pass",
                is_flag=True,
                help="Ask once for the sudo password (sent over the SSH channel, never in argv).",
            ),
        ]
    ):
        f = opt(f)
    return f


def select_hosts(inventory: str | None, expr: str) -> tuple[list[Host], dict[str, Host]]:
    """Inventory + expression -> hosts and their jump hosts (chains included); every problem
    is a one-line usage error."""
    inv = load_inventory(inventory)
    hosts = resolve_hosts(inv, expr)
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
    inventory: str | None,
    hosts_expr: str,
    *,
    fanout: int,
    accept_new_host_keys: bool,
    ask_sudo_pass: bool,
    timeout: float | None = None,
    duration: float | None = None,
) -> tuple[list[Host], FanoutOptions]:
    """Hosts and fan-out options from the options every host-reaching command shares; the
    sudo password is asked for only once the selection is known to be valid."""
    hosts, jumps = select_hosts(inventory, hosts_expr)
    password = None
    if ask_sudo_pass:
        try:
            password = getpass.getpass("sudo password: ")
        except (EOFError, OSError) as exc:
            raise UsageError("--ask-sudo-pass needs a terminal to ask on") from exc
    ssh = SSHOptions(accept_new_host_keys=accept_new_host_keys, sudo_password=password, jumps=jumps)
    return hosts, FanoutOptions(fanout=fanout, timeout=timeout, duration=duration, ssh=ssh)


def run_until_done(
    main: Coroutine[Any, Any, list[HostResult]], on_stop: Callable[[bool], None]
) -> list[HostResult]:
    """Run ``main``; Ctrl-C / SIGTERM / SIGHUP ask every host to stop cleanly (a second
    Ctrl-C does not skip the cleanup: remote scripts clean up on their own when the
    channel closes)."""

    async def runner() -> list[HostResult]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_stop, True)
        return await main

    return asyncio.run(runner())


def exit_code_for(results: list[HostResult], interrupted: bool) -> int:
    if interrupted:
        return EXIT_INTERRUPTED
    return EXIT_OK if all(r.ok for r in results) else EXIT_HOSTS_FAILED
