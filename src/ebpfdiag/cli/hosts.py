"""``ebpfdiag hosts``: show what a host expression resolves to, without connecting."""

from __future__ import annotations

import click
from rich.console import Console
from rich.table import Table

from ebpfdiag.cli.common import hosts_option, inventory_option, json_option, select_hosts
from ebpfdiag.render.ndjson import NDJSONWriter

EXAMPLES = """
\b
Examples:
  ebpfdiag hosts --hosts 'web[01-20],!web07'
  ebpfdiag hosts -i fleet.yaml --hosts lbs --json | jq -r .address
"""


@click.command(epilog=EXAMPLES)
@hosts_option
@inventory_option
@json_option
def hosts(hosts_expr: str, inventory: str | None, as_json: bool) -> int:
    """Print the hosts that --hosts selects (nothing is contacted)."""
    selected, _jumps = select_hosts(inventory, hosts_expr)
    if as_json:
        writer = NDJSONWriter()
        for h in selected:
            writer.write({"type": "host", "host": h.name, **h.to_json()})
        writer.flush()
        return 0
    table = Table(show_edge=False, pad_edge=False)
    for col in ("host", "address", "port", "user", "sudo", "python", "groups"):
        table.add_column(col)
    for h in selected:
        table.add_row(
            h.name,
            h.address,
            str(h.port or 22),
            h.user or "",
            "yes" if h.sudo else "no",
            h.python,
            ",".join(h.groups),
        )
    Console().print(table)
    return 0
