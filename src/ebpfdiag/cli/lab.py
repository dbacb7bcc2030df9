"""``ebpfdiag lab``: build, inspect and remove the client -> LB -> server lab."""

import json
from pathlib import Path
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from ebpfdiag.lab.scenarios import SCENARIOS, describe, run_scenario, scenario
from ebpfdiag.lab.topology import STATE_DIR_ENV, Lab

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
STATE_DIR_KEY = "ebpfdiag.lab.state_dir"  # in ctx.meta, so the root group's ctx.obj is untouched


@click.group()
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar=STATE_DIR_ENV,
    help=f"Where the lab keeps its state, keys and sshd files (env {STATE_DIR_ENV}).",
)
@click.pass_context
def lab(ctx: click.Context, state_dir: Path | None) -> None:
    """A client -> load balancer -> server lab of network namespaces with real sshd."""
    ctx.meta[STATE_DIR_KEY] = state_dir


def _lab(ctx: click.Context, **kw: Any) -> Lab:
    return Lab(state_dir=ctx.meta.get(STATE_DIR_KEY), **kw)


@lab.command()
@click.option("--servers", type=click.IntRange(1, 50), help="Servers behind the LB (default 1).")
@click.option(
    "--inventory-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Inventory to write (default ~/.config/ebpfdiag/inventory.yaml of the sudo user).",
)
@click.option("--link-headers", is_flag=True, help="Link the nearest kernel headers for BCC.")
@click.option("--prefix", default="ebl", hidden=True)
@click.option("--base", default="198.18.0.0", hidden=True)
@click.pass_context
def up(
    ctx: click.Context,
    servers: int | None,
    inventory_out: Path | None,
    link_headers: bool,
    prefix: str,
    base: str,
) -> None:
    """Create the lab (idempotent) and write a ready inventory and known_hosts."""
    the_lab = _lab(
        ctx,
        servers=servers,
        inventory_out=inventory_out,
        link_headers=link_headers,
        prefix=prefix,
        base=base,
    )
    state = the_lab.up()
    for message in the_lab.messages:
        err.print(f"lab: {message}")
    hosts = ", ".join(f"{h.name} {h.mgmt_address}" for h in state.hosts.values())
    err.print(f"lab up: {hosts}; VIP {state.vip}")
    err.print(f"inventory: {state.inventory}")
    err.print(f"try: ebpfdiag run-script ... --hosts {','.join(state.hosts)}")


@lab.command()
@click.pass_context
def down(ctx: click.Context) -> None:
    """Remove everything the lab made (idempotent, also after a crashed 'lab up')."""
    removed = _lab(ctx).down()
    for item in removed:
        err.print(f"removed {item}")
    err.print("lab down" if removed else "lab down: nothing to remove")


@lab.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Hosts, addresses, sshd state and the LB rules."""
    data = _lab(ctx).status()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
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
    out.print(table)
    ports = ", ".join(f"{name} {port}" for name, port in data["ports"].items())
    out.print(f"scenario ports: {ports}")
    out.print(f"inventory: {data['inventory'] or '-'}")
    if data["lb_rules"]:
        out.print("LB rules (nftables on lb):")
        out.print(data["lb_rules"].rstrip(), markup=False)


@lab.command("scenario")
@click.argument("name", required=False, type=click.Choice(list(SCENARIOS)))
@click.option("--list", "list_", is_flag=True, help="Describe the scenarios.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def scenario_cmd(ctx: click.Context, name: str | None, list_: bool, as_json: bool) -> None:
    """Reproduce a known failure through the LB and print what the client saw."""
    if list_ or name is None:
        _list_scenarios(as_json)
        return
    state = _lab(ctx).state()
    if state is None:
        raise click.UsageError("the lab is not up; run 'sudo ebpfdiag lab up' first")
    result = run_scenario(scenario(name).name, state)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
    else:
        out.print(result.summary(), markup=False)
    if not result.reproduced:
        ctx.exit(1)


def _list_scenarios(as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(describe(), indent=2))
        return
    table = Table()
    for column in ("scenario", "VIP port", "what happens", "client sees", "reset from"):
        table.add_column(column)
    for spec in SCENARIOS.values():
        origin = "-"
        if spec.expected:
            reason = spec.expected.reason or "no tcp_send_reset"
            origin = f"{spec.expected.host} {spec.expected.kind} ({reason})"
        table.add_row(
            spec.name, str(spec.port), spec.summary, spec.client_error or "response", origin
        )
    out.print(table)


@lab.command()
@click.option("--link", is_flag=True, help="Link the nearest installed headers if none match.")
def headers(link: bool) -> None:
    """Check that BCC finds kernel headers for the running kernel; optionally link them.

    Debian ships no headers for custom kernels; --link points
    /lib/modules/$(uname -r)/{build,source} at the nearest installed linux-headers.
    """
    from ebpfdiag.lab.prereqs import ensure_headers, modules_dir

    messages, _made = ensure_headers(link)
    for m in messages:
        err.print(m, markup=False)
    if not (modules_dir() / "build").exists():
        raise SystemExit(1)
    if not messages:
        err.print(f"kernel headers: {modules_dir() / 'build'}", markup=False)
