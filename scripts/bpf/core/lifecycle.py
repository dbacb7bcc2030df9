"""Stopping cleanly: the exceptions and signal state every remote tool shares.

A tool must never outlive its controller: SIGTERM, SIGHUP and SIGINT (and stdin EOF, which
the bootstrap turns into SIGTERM) raise Stop in the main loop, and cleanup always runs.
Python 3.6.
"""


class Stop(BaseException):
    """Raised to leave the run from anywhere; carries the bye reason.

    A BaseException, like KeyboardInterrupt, so `except Exception` around attach steps
    does not mistake a signal for a failed probe.
    """

    def __init__(self, reason: str) -> None:
        BaseException.__init__(self, reason)
        self.reason = reason


class SetupError(Exception):
    """A failure before `ready`: reported as one stderr line and a bye with reason error."""


class StopState:
    """Shared between signal handlers and the loop."""

    def __init__(self) -> None:
        self.reason = None
        self.in_callback = False
        self.cleaning = False

    def handler(self, signum, frame) -> None:
        first = self.reason is None
        self.reason = self.reason or "signal"
        if first and not self.in_callback and not self.cleaning:
            raise Stop("signal")


class ArgError(Exception):
    """A bad argument: one stderr line, a bye with reason error, exit 2."""
