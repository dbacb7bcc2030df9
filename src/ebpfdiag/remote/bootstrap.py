"""Runs on the remote host as ``python3 -c <this file> ARGS...`` (under sudo).

Never imported by the controller: its text is sent as the ``-c`` argument. It must run on
Python 3.6 and parse on anything older, so it can say the interpreter is too old.

Protocol (stdin from the controller, stderr markers back; stdout belongs to the script):
1. write ``MARK want-script <python version>`` on stderr;
2. read ``EBPFDIAG1 <length> <sha256> <name>`` then exactly <length> bytes of script;
3. check the hash, write ``MARK running <pid>``, run the script as ``__main__``;
4. meanwhile answer every ``ping <seq>`` line with ``MARK clock <seq> <mono_ns> <real_ns>``,
   so the controller can align clocks; on stdin EOF (controller gone or done) send SIGTERM to
   this process, and if the script has not exited 4 s later, end the process.
"""

import sys

MARK = "\x1eebpfdiag:"

if sys.version_info < (3, 6):
    sys.stderr.write(MARK + "error python-too-old " + sys.version.split()[0] + "\n")
    sys.exit(97)

import contextlib  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import os  # noqa: E402
import signal  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402

GRACE_S = 4.0


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
    _tag, length, digest, name = line.decode().split()
    src = inp.read(int(length))
    if len(src) != int(length) or hashlib.sha256(src).hexdigest() != digest:
        _mark("error bad-script")
        sys.exit(98)
    return name, src


def _watch_stdin(inp):
    """Answer clock pings; on EOF stop the script, then the process if it lingers."""
    while True:
        line = inp.readline()
        if not line:
            break
        parts = line.split()
        if len(parts) == 2 and parts[0] == b"ping":
            mono = _clock_ns(time.CLOCK_MONOTONIC)
            real = _clock_ns(time.CLOCK_REALTIME)
            _mark("clock %s %d %d" % (parts[1].decode(), mono, real))
    os.kill(os.getpid(), signal.SIGTERM)
    _mark("eof")
    time.sleep(GRACE_S)
    _mark("error grace-expired")
    os._exit(143)


def main():
    inp = sys.stdin.buffer
    _mark("want-script %d.%d.%d" % sys.version_info[:3])
    name, src = _read_script(inp)
    code = compile(src, name, "exec")
    sys.stdin = open(os.devnull)  # noqa: SIM115 - lives as long as the script
    sys.stdout = io.TextIOWrapper(
        sys.stdout.buffer, encoding="utf-8", errors="replace", line_buffering=True
    )
    sys.argv = [name] + sys.argv[1:]
    watcher = threading.Thread(target=_watch_stdin, args=(inp,), name="ebpfdiag-stdin")
    watcher.daemon = True
    watcher.start()
    _mark("running %d" % os.getpid())
    status = 0
    try:
        exec(code, {"__name__": "__main__", "__file__": name, "__builtins__": __builtins__})
    except SystemExit as exc:
        status = _exit_status(exc.code)
    except KeyboardInterrupt:
        status = 130
    except BaseException:
        traceback.print_exc()
        status = 1
    # Leave without interpreter shutdown: the stdin watcher may be blocked in a read.
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(status)


def _exit_status(code):
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    sys.stderr.write("%s\n" % code)
    return 1


main()
