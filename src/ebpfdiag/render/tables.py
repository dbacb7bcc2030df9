"""End-of-command tables for the terminal: hosts, doctor, run-script summary, lab.

Commands build plain records once; these functions only draw them. Nothing here runs
under ``--json``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ebpfdiag.inventory import compress_names
from ebpfdiag.render.terminal import STATE_STYLE, host_colour

if TYPE_CHECKING:
    from ebpfdiag.fanout import HostResult


def doctor_table(
    rows: Iterable[Mapping[str, Any]], failed: Iterable[dict], console: Console
) -> None:
    """One row per host (readable for 3 hosts or 300), then every failed check with its fix.

    ``rows``: ``host``, ``ready``, ``kernel``, ``probes`` (usable kinds), ``problems``.
    """
    table = Table(show_edge=False, pad_edge=False)
    for col in ("host", "ready", "kernel", "usable probes", "problems"):
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(
            row["host"],
            Text("yes", style="green") if row["ready"] else Text("no", style="bold red"),
            row["kernel"],
            ", ".join(row["probes"]),
            ", ".join(row["problems"]),
        )
    console.print(table)
    for c in failed:
        fix = f" -> fix: {c['fix']}" if c["fix"] else ""
        console.print(
            f"{c['host']}: {c['name']}: {c['detail']}{fix}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def summary_table(results: list[HostResult], console: Console, detail_limit: int = 30) -> None:
    """End-of-run table: every host when few, else failures in full and the rest folded."""
    table = Table(title=None, show_edge=False, pad_edge=False)
    for col in ("host", "status", "exit", "time", "error"):
        table.add_column(col, overflow="fold")
    shown = results if len(results) <= detail_limit else [r for r in results if not r.ok]
    for r in shown:
        table.add_row(
            Text(r.host, style=host_colour(r.host)),
            Text(r.status, style=STATE_STYLE.get(r.status, "")),
            "" if r.exit_code is None else str(r.exit_code),
            f"{r.duration_s:.2f}s",
            r.error or "",
        )
    if len(shown) < len(results):
        ok = [r.host for r in results if r.ok]
        table.add_row(compress_names(ok), Text("ok", style="green"), "", "", f"{len(ok)} hosts")
    console.print(table)
    failed = [r.host for r in results if not r.ok]
    line = f"{len(results) - len(failed)}/{len(results)} hosts ok"
    if failed:
        line += f"; failed: {compress_names(failed)}"
    console.print(line, style="red" if failed else "green", markup=False, highlight=False)


def lab_status(data: Mapping[str, Any], console: Console) -> None:
    """``lab status``: hosts, addresses, sshd state, scenario ports and LB rules."""
    table = Table(title=f"lab {'up' if data['up'] else 'down'}: VIP {data['vip']}")
    for column in ("host", "role", "netns", "mgmt", "data", "sshd"):
        table.add_column(column)
    for host in data["hosts"]:
        table.add_row(
            host["name"],
            host["role"],
            host["netns"] if host["netns_exists"] else f"{host['netns']} (missing)",
            host["mgmt_address"],
            " ".join(f"{i}={a}" for i, a in host["interfaces"].items()),
            f"running ({host['sshd_pid']})" if host["sshd_pid"] else "stopped",
        )
    console.print(table)
    ports = ", ".join(f"{name} {port}" for name, port in data["ports"].items())
    console.print(f"scenario ports: {ports}", markup=False)
    console.print(f"inventory: {data['inventory'] or '-'}", markup=False)
    if data["lb_rules"]:
        console.print("LB rules (nftables on lb):")
        console.print(data["lb_rules"].rstrip(), markup=False)


def scenarios_table(scenarios: Iterable[Mapping[str, Any]], console: Console) -> None:
    """``lab scenario --list``, from the same records ``--json`` prints."""
    table = Table()
    for column in ("scenario", "VIP port", "what happens", "client sees", "reset from"):
        table.add_column(column)
    for spec in scenarios:
        origin = "-"
        expected = spec.get("expected")
        if expected:
            reason = expected.get("reason") or "no tcp_send_reset"
            origin = f"{expected['host']} {expected['kind']} ({reason})"
        port = str(spec["port"])
        if spec.get("backend_port"):
            port += f" -> {spec['backend_port']}"
        if spec.get("min_servers", 1) > 1:
            port += f" (lab up --servers {spec['min_servers']})"
        table.add_row(
            spec["name"],
            port,
            spec["summary"],
            spec.get("client_error") or "response",
            origin,
        )
    console.print(table)
