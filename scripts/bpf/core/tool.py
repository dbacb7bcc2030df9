"""A tool's main sequence, shared by every remote tool: arguments, set-up, hello, ready,
run, and a cleanup that always runs before the last record, `bye`. Python 3.6.
"""

import contextlib
import signal
import sys
import time

from core.discovery import process_age
from core.events import Output
from core.lifecycle import ArgError, SetupError, Stop, StopState
from core.params import ParamError, parse
from core.programs import offer_program, program_answer, program_source, programs_allowed

#: hello.setup's phases after `process`, in the order a tool's set-up goes through them
SETUP_PHASES = ("import", "discover", "compile", "attach")

#: The running tool's name and session, for control lines (set while run_tool runs).
LIVE = {}


def ebpfdiag_control(text):
    """The bootstrap's hook for `ctl <text>` lines (docs/remote-protocol.md), passed to the
    session's `control(text)`; a tool takes control lines by importing this name."""
    if programs_allowed() and program_answer(text):
        return
    session = LIVE.get("session")
    script = LIVE.get("script", "tool")
    if session is None:
        sys.stderr.write("%s: control line before the session, ignored: %s\n" % (script, text))
        return
    if not hasattr(session, "control"):
        sys.stderr.write("%s: control line not understood, ignored: %s\n" % (script, text))
        return
    with contextlib.suppress(Stop):  # stdout is gone: the main loop ends the run too
        session.control(text)


class SetupTimes:
    """Where a tool's set-up time went, for its hello's `setup` (docs/json.md): `process`
    (host process start -> set-up), then each phase in SETUP_PHASES as the tool ends it,
    and `cpu` (CPU seconds up to ready, the figure a loaded host does not move)."""

    def __init__(self) -> None:
        self.times = {"process": process_age()}
        self.last = time.monotonic()

    def done(self, phase: str) -> None:
        now = time.monotonic()
        self.times[phase] = now - self.last
        self.last = now
        if phase == SETUP_PHASES[-1]:
            self.times["cpu"] = time.process_time()

    def report(self) -> dict:
        return dict((k, round(v, 3)) for k, v in self.times.items() if v is not None)


def parse_tool_args(params, argv, script, doc):
    """A tool's arguments against its schema; the docstring's first paragraph is the
    description, the rest the epilog (the Parameters/Fields header). ArgError when bad."""
    parts = (doc or "").split("\n\n", 1)
    try:
        args = parse(params, argv, script, parts[0], parts[1] if len(parts) > 1 else None)
    except ParamError as exc:
        raise ArgError(str(exc)) from None
    if args.format_dir and not args.ebpf:
        raise ArgError("--format-dir only goes with --ebpf")
    return args


def run_tool(script, argv, parse_args, print_ebpf, make_session) -> int:
    """A tool's whole life after `main`: arguments, set-up, hello, ready, run, and a cleanup
    that always runs, then `bye`. Returns the exit code.

    `make_session(args, out, stop)` builds the tool's session: `setup()`, `hello()`,
    `run()` -> bye reason, `cleanup()` -> errors (it reads `ready` to know whether the run
    got that far and its final records are owed). While it runs, control lines go to its
    `control(text)` (see `ebpfdiag_control`).
    """
    out = Output(sys.stdout)
    try:
        args = parse_args(argv)
    except ArgError as exc:
        sys.stderr.write("%s: %s\n" % (script, exc))
        out.write({"type": "bye", "reason": "error", "error": str(exc)})
        out.flush()
        return 2
    if args.ebpf:
        return print_ebpf(args, sys.stdout)
    stop = StopState()
    for signum in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        signal.signal(signum, stop.handler)
    session = make_session(args, out, stop)
    session.ready = False
    LIVE.update(script=script, session=session)
    bye = {"type": "bye", "reason": "error"}
    code = 1
    try:
        try:
            session.setup()
            hello = session.hello()
            if program_source():
                hello["program"] = program_source()
            out.write(hello)
            # before `ready`: a trace stopped as soon as it is ready still leaves its
            # compile with the controller (a few ms, only after a compile)
            offer_program(out)
            out.write({"type": "ready"})
            out.flush()
            session.ready = True
            bye["reason"] = session.run()
            code = 0
        except Stop as exc:
            bye["reason"] = exc.reason
            code = 0
        except KeyboardInterrupt:
            bye["reason"] = "signal"
            code = 0
        except SetupError as exc:
            bye["error"] = str(exc)
        except Exception as exc:  # noqa: BLE001 - report, clean up, exit 1
            bye["error"] = "%s: %s" % (type(exc).__name__, exc)
    finally:
        stop.cleaning = True
        LIVE.pop("session", None)
        errors = session.cleanup()
    if errors:
        sys.stderr.write("%s: cleanup: %s\n" % (script, "; ".join(errors)))
    if code:
        sys.stderr.write("%s: %s\n" % (script, bye.get("error")))
    try:
        out.write(bye)
        out.flush()
    except Stop:
        pass
    return code
