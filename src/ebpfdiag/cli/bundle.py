"""``ebpfdiag bundle``: the exact program a tool becomes on a host, for review."""

from __future__ import annotations

import hashlib
import sys

import click

from ebpfdiag.catalog import resolve_script
from ebpfdiag.errors import UsageError
from ebpfdiag.remote.bundle import bundle

EXAMPLES = """
\b
Examples:
  ebpfdiag bundle tcp_rst -o tcp_rst.bundle.py     # review what runs as root
  ebpfdiag bundle tcp_rst | sha256sum
  /usr/bin/python3 tcp_rst.bundle.py --help        # the bundle runs on its own
"""


@click.command("bundle", epilog=EXAMPLES)
@click.argument("tool", metavar="TOOL")
@click.option("-o", "--output", "output", metavar="FILE", help="Write the bundle to FILE.")
def bundle_cmd(tool: str, output: str | None) -> int:
    """Print the program pushed for TOOL (a shipped tool's name or a script file): the
    tool with the core modules it uses, as one self-contained Python file. Its sha256 goes
    to stderr."""
    program = bundle(resolve_script(tool)).encode()
    digest = hashlib.sha256(program).hexdigest()
    if output:
        try:
            with open(output, "wb") as fh:
                fh.write(program)
        except OSError as exc:
            raise UsageError(f"--output {output}: {exc.strerror or exc}") from None
    else:
        sys.stdout.buffer.write(program)
        sys.stdout.flush()
    click.echo(f"sha256 {digest}  {len(program)} bytes", err=True)
    return 0
