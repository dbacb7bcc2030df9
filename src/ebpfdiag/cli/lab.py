"""``ebpfdiag lab``: build, inspect and remove the client -> LB -> server lab."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from ebpfdiag.cli.app import App, pass_app
from ebpfdiag.errors import EXIT_HOSTS_FAILED, EXIT_OK
from ebpfdiag.lab.scenarios import SCENARIOS, describe, run_scenario, scenario
from ebpfdiag.lab.topology import STATE_DIR_ENV, Lab

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
@pass_app
def up(
    app: App,
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
        app.term.status(f"lab: {message}")
    hosts = ", ".join(f"{h.name} {h.mgmt_address}" for h in state.hosts.values())
    app.term.status(f"lab up: {hosts}; VIP {state.vip}")
    app.term.status(f"inventory: {state.inventory}")
    app.term.status(f"inventory for {state.diag_user} (no sudo of its own): {state.diag_inventory}")
    app.term.status(f"try: ebpfdiag run-script ... --hosts {','.join(state.hosts)}")


@lab.command()
@click.pass_context
@pass_app
def down(app: App, ctx: click.Context) -> None:
    """Remove everything the lab made (idempotent, also after a crashed 'lab up')."""
    removed = _lab(ctx).down()
    for item in removed:
        app.term.status(f"removed {item}")
    app.term.status("lab down" if removed else "lab down: nothing to remove")


@lab.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@pass_app
def status(app: App, ctx: click.Context, as_json: bool) -> None:
    """Hosts, addresses, sshd state and the LB rules."""
    data = _lab(ctx).status()
    if as_json:
        app.term.data(json.dumps(data, indent=2))
        return
    from ebpfdiag.render.tables import lab_status

    lab_status(data, app.term.out)


@lab.command("scenario")
@click.argument("name", required=False, type=click.Choice(list(SCENARIOS)))
@click.option("--list", "list_", is_flag=True, help="Describe the scenarios.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@pass_app
def scenario_cmd(
    app: App, ctx: click.Context, name: str | None, list_: bool, as_json: bool
) -> None:
    """Reproduce a known failure through the LB and print what the client saw."""
    if list_ or name is None:
        if as_json:
            app.term.data(json.dumps(describe(), indent=2))
        else:
            from ebpfdiag.render.tables import scenarios_table

            scenarios_table(describe(), app.term.out)
        return
    state = _lab(ctx).state()
    if state is None:
        raise click.UsageError("the lab is not up; run 'sudo ebpfdiag lab up' first")
    result = run_scenario(scenario(name).name, state)
    if as_json:
        app.term.data(json.dumps(result.to_dict(), indent=2))
    else:
        app.term.data(result.summary())
    if not result.reproduced:
        ctx.exit(1)


@lab.command()
@click.option("--link", is_flag=True, help="Link the nearest installed headers if none match.")
@pass_app
def headers(app: App, link: bool) -> int:
    """Check that BCC finds kernel headers for the running kernel; optionally link them.

    Debian ships no headers for custom kernels; --link points
    /lib/modules/$(uname -r)/{build,source} at the nearest installed linux-headers.
    """
    from ebpfdiag.lab.prereqs import ensure_headers, modules_dir

    messages, _made = ensure_headers(link)
    for m in messages:
        app.term.status(m)
    if not (modules_dir() / "build").exists():
        return EXIT_HOSTS_FAILED
    if not messages:
        app.term.status(f"kernel headers: {modules_dir() / 'build'}")
    return EXIT_OK
