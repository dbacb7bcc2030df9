"""The ``ebpfdiag`` command: one root group; this module alone maps errors to exit codes."""

from __future__ import annotations

import sys

import click

from ebpfdiag import __version__
from ebpfdiag.errors import EXIT_INTERRUPTED, EXIT_USAGE, EbpfdiagError

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT)
@click.version_option(__version__, prog_name="ebpfdiag")
def cli() -> None:
    """Trace network problems on many Linux hosts at once with eBPF.

    \b
    Examples:
      ebpfdiag hosts --hosts 'web[01-20],!web07'
      ebpfdiag doctor --hosts client,lb,server
      ebpfdiag trace tcp-rst --hosts client,lb,server --port 80
      ebpfdiag run-script ./probe.py --hosts lbs --json | jq .
    """


def _register() -> None:
    from ebpfdiag.cli.bundle import bundle_cmd
    from ebpfdiag.cli.doctor import doctor
    from ebpfdiag.cli.hosts import hosts
    from ebpfdiag.cli.lab import lab
    from ebpfdiag.cli.run_script import run_script
    from ebpfdiag.cli.trace import trace

    for command in (hosts, run_script, doctor, trace, lab, bundle_cmd):
        cli.add_command(command)


_register()


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"ebpfdiag: {message}\n")
    sys.exit(code)


def main() -> None:
    """Entry point: one line and an exit code for every error a user can cause."""
    try:
        code = cli.main(standalone_mode=False, prog_name="ebpfdiag")
    except click.exceptions.NoArgsIsHelpError as exc:
        click.echo(exc.ctx.get_help() if exc.ctx else str(exc), err=True)
        sys.exit(EXIT_USAGE)
    except click.UsageError as exc:
        path = exc.ctx.command_path if exc.ctx else "ebpfdiag"
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
        sys.exit(0)
    sys.exit(code if isinstance(code, int) else 0)
