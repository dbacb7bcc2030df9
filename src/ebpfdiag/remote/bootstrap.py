"""Runs on the remote host as ``python3 -c <this file> ARGS...`` (under sudo).

Never imported by the controller: its text is sent as the ``-c`` argument. It must run on
Python 3.6 and parse on anything older, so it can say the interpreter is too old.

Protocol (stdin from the controller, stderr markers back; stdout belongs to the script):
1. write ``MARK want-script <python version>`` on stderr;
2. read ``EBPFDIAG1 <length> <sha256> <name>`` then exactly <length> bytes of script;
3. check the hash, write ``MARK running <pid>``, run the script as ``__main__``;
4. meanwhile answer every ``ping <seq>`` line with ``MARK clock <seq> <mono_ns> <real_ns>``,
   so the controller can align clocks; hand every ``ctl <text>`` line to the script's
   ``ebpfdiag_control(text)`` (a module-level function, called from the stdin thread); on
   stdin EOF (controller gone or done) send SIGTERM to this process, and if the script has
   not exited 4 s later, end the process.

``main`` also tells the script (``EBPFDIAG_PROGRAMS=1``) that it may ask the controller for
its kept BPF program instead of compiling (docs/remote-protocol.md, "Kept programs").

The script's fd 1 is a pipe, not the channel: a forked drain process forwards what arrives
in chunks of up to CHUNK bytes, holding a line at most LINGER_S (and not at all after a
quiet spell), so a script that flushes every line costs one channel write per chunk rather
than per line. Being a separate process, the drain forwards everything written before the
script ends however it ends (SIGTERM, os._exit, SIGKILL), and what children of the script
write to fd 1 too.

Steps 3-4 (``run_code``) are shared with the root-owned runner: its program is this file
without the last line, followed by its own code (``ebpfdiag.remote.runner_build``).
"""

import sys

MARK = "\x1eebpfdiag:"

if sys.version_info < (3, 6):
    sys.stderr.write(MARK + "error python-too-old " + sys.version.split()[0] + "\n")
    sys.exit(97)

import contextlib  # noqa: E402
import fcntl  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import select  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

GRACE_S = 4.0
#: The script's function for ``ctl`` lines, looked up in its globals when one comes.
CONTROL_HOOK = "ebpfdiag_control"
#: Longest a line waits in the drain for more output to share its write.
LINGER_S = 0.002
#: Largest write to the channel; with the pipe, it bounds what the host buffers.
CHUNK = 256 * 1024
PIPE_SIZE = 1024 * 1024
F_SETPIPE_SZ = 1031
#: Called with the exit status just before the process ends (the runner's audit record).
AT_LEAVE = []


def _mark(text):
    with contextlib.suppress(OSError):  # the controller is gone; stopping must still happen
        os.write(2, (MARK + text + "\n").encode())


def _clock_ns(clock_id):
    return int(time.clock_gettime(clock_id) * 1e9)


def _read_script(inp):
    while True:
        line = inp.readline()
        if not line:
            _mark("error no-script")
            sys.exit(98)
        if line.startswith(b"EBPFDIAG1 "):
            break
    _tag, length, digest, name = line.decode().rstrip("\n").split(" ", 3)
    src = inp.read(int(length))
    if len(src) != int(length) or hashlib.sha256(src).hexdigest() != digest:
        _mark("error bad-script")
        sys.exit(98)
    return name, src


def _watch_stdin(inp, scope):
    """Answer clock pings, pass control lines to the script (its globals are ``scope``);
    on EOF stop the script, then the process if it lingers."""
    while True:
        line = inp.readline()
        if not line:
            break
        parts = line.split()
        if len(parts) == 2 and parts[0] == b"ping":
            mono = _clock_ns(time.CLOCK_MONOTONIC)
            real = _clock_ns(time.CLOCK_REALTIME)
            _mark("clock %s %d %d" % (parts[1].decode(), mono, real))
        elif parts and parts[0] == b"ctl":
            _control(scope, line.decode("utf-8", "replace").strip()[3:].strip())
    stop_self("eof")


def stop_self(note):
    """SIGTERM to this process (the script cleans up and exits), then end it GRACE_S later."""
    os.kill(os.getpid(), signal.SIGTERM)
    if note:
        _mark(note)
    time.sleep(GRACE_S)
    _mark("error grace-expired")
    leave(143)


def leave(status):
    """End the process now (no interpreter shutdown: the stdin watcher may be in a read)."""
    for hook in AT_LEAVE:
        with contextlib.suppress(Exception):
            hook(status)
    os._exit(status)


def _control(scope, text):
    """One control line to the script; whatever it does, this thread keeps watching stdin."""
    hook = scope.get(CONTROL_HOOK)
    if not callable(hook):
        sys.stderr.write("ebpfdiag: control line ignored (no %s): %s\n" % (CONTROL_HOOK, text))
        return
    try:
        hook(text)
    except BaseException:  # SystemExit here would end the watcher, not the script
        traceback.print_exc()


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _drain(rfd, out):
    """Forward the script's stdout pipe to the channel in chunks, until every writer is gone.

    Output after a quiet spell goes at once. Output that follows the last write within
    LINGER_S is a burst under way: wait LINGER_S once so more of it joins this write
    (unless a full chunk is already there), then send what is there.
    A blocked write (slow controller) stops the reads, the pipe fills and the script's own
    writes block: nothing piles up here.
    """
    poller = select.poll()
    poller.register(rfd, select.POLLIN)
    last_write = 0.0
    while True:
        poller.poll()
        try:
            data = os.read(rfd, CHUNK)
        except BlockingIOError:
            continue
        if not data:
            return
        if len(data) < CHUNK and time.monotonic() - last_write < LINGER_S:
            time.sleep(LINGER_S)
            with contextlib.suppress(BlockingIOError):
                data += os.read(rfd, CHUNK - len(data))
        _write_all(out, data)
        last_write = time.monotonic()


def _start_drain():
    """Make fd 1 a pipe drained by a child process into the real stdout."""
    rfd, wfd = os.pipe()
    with contextlib.suppress(OSError):
        fcntl.fcntl(wfd, F_SETPIPE_SZ, PIPE_SIZE)
    sys.stdout.flush()
    try:
        pid = os.fork()
    except OSError:  # no process to spare: the script writes to the channel itself
        os.close(rfd)
        os.close(wfd)
        return
    if pid == 0:
        try:
            for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            os.close(wfd)
            null = os.open(os.devnull, os.O_RDWR)
            os.dup2(null, 0)
            os.dup2(null, 2)
            fcntl.fcntl(rfd, fcntl.F_SETFL, fcntl.fcntl(rfd, fcntl.F_GETFL) | os.O_NONBLOCK)
            _drain(rfd, 1)
        finally:
            os._exit(0)
    os.dup2(wfd, 1)
    os.close(wfd)
    os.close(rfd)


def main():
    inp = sys.stdin.buffer
    # The controller may send the tool its last compile for this host (the runner, which
    # ends before this function, never says so: it loads nothing the user sends).
    os.environ["EBPFDIAG_PROGRAMS"] = "1"
    _mark("want-script %d.%d.%d" % sys.version_info[:3])
    name, src = _read_script(inp)
    run_code(inp, name, compile(src, name, "exec"), sys.argv[1:])


def run_code(inp, name, code, args):
    """Steps 3-4: run ``code`` as ``__main__`` with argv ``[name] + args`` while the stdin
    thread answers pings, passes control lines and stops it on EOF; never returns."""
    _start_drain()
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the script
    sys.stdout = io.TextIOWrapper(
        sys.stdout.buffer, encoding="utf-8", errors="replace", line_buffering=True
    )
    sys.argv = [name] + list(args)
    scope = {"__name__": "__main__", "__file__": name, "__builtins__": __builtins__}
    watcher = threading.Thread(target=_watch_stdin, args=(inp, scope), name="ebpfdiag-stdin")
    watcher.daemon = True
    watcher.start()
    _mark("running %d" % os.getpid())
    status = 0
    try:
        exec(code, scope)
    except SystemExit as exc:
        status = _exit_status(exc.code)
    except KeyboardInterrupt:
        status = 130
    except BaseException:
        traceback.print_exc()
        status = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    leave(status)


def _exit_status(code):
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    sys.stderr.write("%s\n" % code)
    return 1


main()
