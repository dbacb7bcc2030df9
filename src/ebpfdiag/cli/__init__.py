"""The ``ebpfdiag`` command: one root group that builds the app object; commands load lazily."""

from __future__ import annotations

import click

from ebpfdiag import __version__
from ebpfdiag.cli.app import App, LazyGroup, main

__all__ = ["cli", "main"]

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
#: name -> "module:attribute"; a command's module is imported only when it runs (or for help).
COMMANDS = {
    "hosts": "ebpfdiag.cli.hosts:hosts",
    "run-script": "ebpfdiag.cli.run_script:run_script",
    "doctor": "ebpfdiag.cli.doctor:doctor",
    "trace": "ebpfdiag.cli.trace:trace",
    "show": "ebpfdiag.cli.show:show",
    "lab": "ebpfdiag.cli.lab:lab",
    "bundle": "ebpfdiag.cli.bundle:bundle_cmd",
    "metrics": "ebpfdiag.cli.metrics:metrics",
    "runner": "ebpfdiag.cli.runner:runner",
}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings=CONTEXT)
@click.version_option(__version__, prog_name="ebpfdiag")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Trace network problems on many Linux hosts at once with eBPF.

    \b
    Examples:
      ebpfdiag hosts --hosts 'web[01-20],!web07'
      ebpfdiag doctor --hosts client,lb,server
      ebpfdiag trace tcp-rst --hosts client,lb,server --port 80 --output rst.json
      ebpfdiag show rst.json
      ebpfdiag run-script ./probe.py --hosts lbs --json | jq .
      ebpfdiag bundle tcp_rst -o tcp_rst.bundle.py
    """
    ctx.obj = App()
