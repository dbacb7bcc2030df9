"""``ebpfdiag hosts``: show what a host expression resolves to, without connecting."""

from __future__ import annotations

import click

from ebpfdiag.cli.app import App, host_options, pass_app

EXAMPLES = """
\b
Examples:
  ebpfdiag hosts --hosts 'web[01-20],!web07'
  ebpfdiag hosts -i fleet.yaml --hosts lbs --json | jq -r .address
"""


@click.command(epilog=EXAMPLES)
@host_options(ssh=False)
@pass_app
def hosts(app: App) -> int:
    """Print the hosts that --hosts selects (nothing is contacted)."""
    selected, _jumps = app.select_hosts()
    if app.as_json:
        for h in selected:
            app.json.write({"type": "host", "host": h.name, **h.to_json()})
        app.json.flush()
        return 0
    rows = [("host", "address", "port", "user", "sudo", "python", "groups")]
    rows += [
        (h.name, h.address, str(h.port or 22), h.user or "", "yes" if h.sudo else "no",
         h.python, ",".join(h.groups))
        for h in selected
    ]  # fmt: skip
    app.term.data("\n".join(columns(rows)))
    return 0


def columns(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows as aligned plain-text columns: quick to print (no rich to load for a listing)
    and easy to cut, grep or awk."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
            for row in rows]  # fmt: skip
