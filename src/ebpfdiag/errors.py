"""Exceptions that the CLI turns into one-line messages and exit codes.

Every stage raises these instead of printing, so one place (``cli.app.main``) decides
how an error looks and which exit code it gets.
"""

EXIT_OK = 0
EXIT_HOSTS_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class EbpfdiagError(Exception):
    """Base class: ``str(exc)`` is the one line shown to the user."""

    exit_code = EXIT_USAGE


class UsageError(EbpfdiagError):
    """Bad input (options, inventory, host expressions, scripts): nothing ran."""

    exit_code = EXIT_USAGE


class InventoryError(UsageError):
    """A problem in the inventory file; the message names file and line."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None):
        where = ""
        if path:
            where = f"{path}:{line}: " if line else f"{path}: "
        super().__init__(f"{where}{message}")
        self.path = path
        self.line = line


class HostExpressionError(UsageError):
    """A ``--hosts`` expression that does not resolve."""


class LabError(EbpfdiagError):
    """The built-in lab could not be set up or torn down."""

    exit_code = EXIT_HOSTS_FAILED
