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
    from ebpfdiag.render.tables import hosts_table

    hosts_table(selected, app.term.out)
    return 0
