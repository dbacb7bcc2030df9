"""The root-owned runner: runs one vetted tool of its installed catalog, nothing else.

Never imported by the controller. ``ebpfdiag.remote.runner_build`` makes the installed
program from ``bootstrap.py`` (the lifecycle: drain, pings, control lines, stop on stdin
EOF), ``scripts/bpf/core/params.py`` (the parameter rules the tools themselves apply) and
this file, whose imports from those two are dropped. Python 3.6, started by sudo through
its ``#!/usr/bin/python3 -IS`` line, with no arguments.

Conversation (docs/runner.md): ``MARK want-request <python> <version> <tools>`` on stderr;
one line ``EBPFDIAG-RUN1 <json>`` on stdin; then either ``MARK error refused <why>`` and
exit status 77, or the bootstrap's steps from ``running <pid>`` on, the tool being the
installed file. Every run, refused or not, is written to the audit file and to syslog.
"""
# ruff: noqa: UP031 - Python 3.6 on the hosts; %-formatting like the bootstrap

import contextlib
import fcntl
import grp
import hashlib
import json
import math
import os
import pwd
import re
import signal
import socket
import stat
import sys
import syslog
import threading
import time

from core.params import ParamError, convert, option

from ebpfdiag.remote.bootstrap import AT_LEAVE, GRACE_S, _mark, run_code, stop_self

RUNNER_VERSION = "0"  # replaced by the builder with the controller's version
INSTALL_DIR = "/usr/local/lib/ebpfdiag-runner"
RELEASE_DIR = INSTALL_DIR + "/current"
POLICY_FILE = "/etc/ebpfdiag/runner-policy.json"
AUDIT_DIR = "/var/log/ebpfdiag"
AUDIT_FILE = AUDIT_DIR + "/runner.log"
SLOT_DIR = "/run/ebpfdiag-runner"
#: Where the tools' imports come from: the distribution's packages only (no site, no .pth,
#: no /usr/local, whose dist-packages is writable by group staff on Debian).
SYSTEM_PACKAGES = (
    "/usr/lib/python3/dist-packages",
    "/usr/lib/python%d.%d/site-packages" % sys.version_info[:2],
    "/usr/lib64/python%d.%d/site-packages" % sys.version_info[:2],
)
TOOL_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
EXIT_REFUSED = 77
REQUEST_TAG = b"EBPFDIAG-RUN1 "
MAX_REQUEST = 64 * 1024
MAX_ARGS = 64
MAX_ARG_LEN = 256
#: How long a stale run of the same user and tool gets to stop before it is killed: a
#: tool still compiling its BPF program only sees SIGTERM once the compile is done.
STALE_TERM_S = 15.0
#: A locked slot may only be another runner looking at its holder (a shared lock held for
#: microseconds), not a run: the slots are tried this many times, this far apart, before a
#: refusal says they are all taken.
SLOT_TRIES = 5
SLOT_RETRY_S = 0.02
#: Numbers beyond this are refused even where a tool's schema sets no maximum.
MAX_NUMBER = 2**31 - 1
#: What a parameter value may contain: letters, digits and the punctuation of addresses,
#: interface names, durations and comma lists. Nothing a shell or a path would use.
_SAFE_VALUE = re.compile(r"^[A-Za-z0-9_.:,@%+=-]*$")
_TOOL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_BAD_ENV = ("LD_PRELOAD", "LD_LIBRARY_PATH", "LD_AUDIT")


class Refused(Exception):
    """A run the runner will not start; the message is the one line the caller sees."""


def _describe_s(seconds):
    if seconds >= 3600 and seconds % 3600 == 0:
        return "%dh" % (seconds // 3600)
    if seconds >= 60 and seconds % 60 == 0:
        return "%dm" % (seconds // 60)
    return "%gs" % seconds


# -- trust: files and directories only root can change ----------------------------------


def check_trusted(path, kind="file"):
    """``path`` and every directory above it are owned by root and not writable by group or
    other (symlinks included, and their targets in turn); Refused otherwise."""
    seen = 0
    todo = [os.path.abspath(path)]
    while todo:
        current = todo.pop()
        parts = current.split("/")
        for i in range(len(parts), 0, -1):
            sub = "/".join(parts[:i]) or "/"
            try:
                st = os.lstat(sub)
            except OSError as exc:
                raise Refused("%s %s: %s" % (kind, path, exc.strerror)) from None
            if st.st_uid != 0:
                raise Refused(
                    "%s %s: %s is owned by uid %d, not root" % (kind, path, sub, st.st_uid)
                )
            if stat.S_ISLNK(st.st_mode):
                seen += 1
                if seen > 8:
                    raise Refused("%s %s: too many symlinks" % (kind, path))
                target = os.readlink(sub)
                rest = "/".join(parts[i:])
                base = os.path.dirname(sub)
                todo.append(os.path.normpath(os.path.join(base, target, rest)))
                break
            if st.st_mode & 0o022:
                raise Refused(
                    "%s %s: %s is writable by group or other (mode %o)"
                    % (kind, path, sub, stat.S_IMODE(st.st_mode))
                )


def read_trusted(path, kind="file", limit=64 * 1024 * 1024):
    """The bytes of a trusted regular file, read from the descriptor that was checked."""
    check_trusted(path, kind)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise Refused("%s %s: %s" % (kind, path, exc.strerror)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o022:
            raise Refused("%s %s: not a root-owned regular file" % (kind, path))
        chunks = []
        total = 0
        while True:
            data = os.read(fd, 1 << 20)
            if not data:
                break
            total += len(data)
            if total > limit:
                raise Refused("%s %s: larger than %d bytes" % (kind, path, limit))
            chunks.append(data)
        return b"".join(chunks)
    finally:
        os.close(fd)


def check_interpreter(environ, flags):
    """The runner's own start: isolated interpreter, no site, nothing injected by the
    environment. sudo's env_reset hides such variables; a direct start may not."""
    for key in sorted(environ):
        if key.startswith("PYTHON") or key in _BAD_ENV:
            raise Refused("environment: %s is set" % key)
    if not (flags.isolated and flags.no_site and flags.ignore_environment):
        raise Refused(
            "interpreter: not started isolated (the runner runs as its own program, "
            "#!/usr/bin/python3 -IS, never as 'python3 runner')"
        )


def trusted_packages():
    """System package directories that pass the trust check, for the tools' imports."""
    found = []
    for path in SYSTEM_PACKAGES:
        if os.path.isdir(path):
            check_trusted(path, "package directory")
            found.append(path)
    for path in sys.path:
        if path and os.path.exists(path):
            check_trusted(path, "module directory")
    return found


# -- who is asking ----------------------------------------------------------------------


def identify(environ):
    """(user name, uid, group names) of the invoking user as sudo reports it, from the
    system's databases (never from anything the user controls); root when run directly."""
    uid_text = environ.get("SUDO_UID")
    uid = int(uid_text) if uid_text and uid_text.isdigit() else os.getuid()
    try:
        entry = pwd.getpwuid(uid)
    except KeyError:
        raise Refused("user: uid %d has no account on this host" % uid) from None
    groups = set()
    for gid in os.getgrouplist(entry.pw_name, entry.pw_gid):
        with contextlib.suppress(KeyError):
            groups.add(grp.getgrgid(gid).gr_name)
    return entry.pw_name, uid, sorted(groups)


# -- catalog and policy -----------------------------------------------------------------


def load_json(path, kind):
    try:
        value = json.loads(read_trusted(path, kind).decode("utf-8"))
    except ValueError as exc:
        raise Refused("%s %s: not valid JSON (%s)" % (kind, path, exc)) from None
    if not isinstance(value, dict):
        raise Refused("%s %s: not a JSON object" % (kind, path))
    return value


def check_policy(policy):
    """The policy's shape (docs/runner.md); a broken policy refuses every run."""
    groups = policy.get("groups")
    limit = policy.get("max_runs_per_host")
    if not isinstance(groups, dict) or not isinstance(limit, int) or limit < 1:
        raise Refused("policy: needs 'groups' (an object) and 'max_runs_per_host' (>= 1)")
    for name, entry in groups.items():
        tools = entry.get("tools") if isinstance(entry, dict) else None
        cap = entry.get("max_duration_s") if isinstance(entry, dict) else None
        if not (tools == "*" or isinstance(tools, list)):
            raise Refused("policy: group %s: 'tools' is neither \"*\" nor a list" % name)
        if not isinstance(cap, (int, float)) or cap <= 0:
            raise Refused("policy: group %s: 'max_duration_s' must be > 0" % name)
    if not isinstance(policy.get("long_running", []), list):
        raise Refused("policy: 'long_running' must be a list of tool names")
    return policy


def allowed_tools(policy, catalog, uid, groups):
    """tool -> longest duration the user's groups allow it (root: every tool, any group)."""
    out = {}
    for name, entry in sorted(policy["groups"].items()):
        if uid != 0 and name not in groups:
            continue
        tools = catalog["tools"] if entry["tools"] == "*" else entry["tools"]
        for tool in tools:
            if tool in catalog["tools"]:
                out[tool] = max(out.get(tool, 0), entry["max_duration_s"])
    return out


# -- the request ------------------------------------------------------------------------


def read_request(inp):
    """The controller's request, skipping lines before it (a sudo password echo)."""
    while True:
        line = inp.readline(MAX_REQUEST)
        if not line:
            raise Refused("no request (stdin closed)")
        if line.startswith(REQUEST_TAG):
            break
    if not line.endswith(b"\n"):
        raise Refused("request longer than %d bytes" % MAX_REQUEST)
    try:
        req = json.loads(line[len(REQUEST_TAG) :].decode("utf-8"))
    except ValueError:
        raise Refused("request is not valid JSON") from None
    if not isinstance(req, dict):
        raise Refused("request is not a JSON object")
    args = req.get("args", [])
    if not isinstance(req.get("tool"), str) or not isinstance(req.get("sha256"), str):
        raise Refused("request needs 'tool' and 'sha256' strings")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise Refused("request 'args' must be a list of strings")
    if not isinstance(req.get("ssh_user", ""), str):
        raise Refused("request 'ssh_user' must be a string")
    return req


def check_tool_name(tool, allowed):
    if "/" in tool or tool.startswith(".") or tool in ("", "..") or "\x00" in tool:
        raise Refused("tool %r is a path, not a tool name" % tool)
    if not _TOOL_NAME.match(tool) or tool not in allowed:
        raise Refused(
            "unknown tool %r (allowed: %s)" % (tool[:64], ", ".join(sorted(allowed)) or "none")
        )


def load_tool(release, catalog, tool, expected):
    """The installed tool's bytes, checked against the catalog and the controller."""
    entry = catalog["tools"][tool]
    rel = entry.get("file", "")
    if rel != "tools/%s.py" % tool:
        raise Refused("tool %s: catalog names file %r, not tools/%s.py" % (tool, rel, tool))
    src = read_trusted(os.path.join(release, rel), "tool")
    actual = hashlib.sha256(src).hexdigest()
    if actual != entry.get("sha256"):
        raise Refused(
            "tool %s: installed copy changed (catalog sha256 %s, file sha256 %s)"
            % (tool, entry.get("sha256"), actual)
        )
    if expected != actual:
        raise Refused(
            "tool %s: controller expects sha256 %s, runner has %s (update with: "
            "ebpfdiag runner install ...)" % (tool, expected[:64], actual)
        )
    return src


def check_args(params, args):
    """Every word against the tool's schema, stricter than the tool's own parser: exact
    long options only, no local or path parameters, bounded sizes and numbers. Returns
    {param name: converted value or list}."""
    if len(args) > MAX_ARGS:
        raise Refused("%d arguments (at most %d)" % (len(args), MAX_ARGS))
    by_option = {option(p): p for p in params}
    values = {}
    i = 0
    while i < len(args):
        word = args[i]
        param = by_option.get(word)
        if param is None:
            raise Refused("%s: not an option of this tool" % _shown(word))
        if param.get("local"):
            raise Refused("%s: only for local use, never through the runner" % word)
        if param["type"] == "path":
            raise Refused("%s: reads a file the caller names, not through the runner" % word)
        if param["type"] == "flag":
            if param["name"] in values:
                raise Refused("%s: given twice" % word)
            values[param["name"]] = True
            i += 1
            continue
        if i + 1 >= len(args):
            raise Refused("%s: needs a value" % word)
        value = args[i + 1]
        _check_word(word, value)
        try:
            if param.get("multiple"):
                for part in value.split(","):
                    if part.strip():
                        values.setdefault(param["name"], []).append(
                            _bounded(param, convert(param, part))
                        )
            elif param["name"] in values:
                raise Refused("%s: given twice" % word)
            else:
                values[param["name"]] = _bounded(param, convert(param, value))
        except ParamError as exc:
            raise Refused(str(exc)) from None
        i += 2
    return values


def _shown(word):
    return repr(word[:40] + ("..." if len(word) > 40 else ""))


def _check_word(flag, value):
    if len(value) > MAX_ARG_LEN:
        raise Refused("%s: value of %d characters (at most %d)" % (flag, len(value), MAX_ARG_LEN))
    if not _SAFE_VALUE.match(value):
        bad = sorted(set(c for c in value if not _SAFE_VALUE.match(c)))
        raise Refused(
            "%s: %s contains characters the runner refuses (%s)"
            % (flag, _shown(value), " ".join(repr(c) for c in bad))
        )


def _bounded(param, value):
    if isinstance(value, float) and not math.isfinite(value):
        raise Refused("%s: %s is not a finite number" % (option(param), value))
    if isinstance(value, (int, float)) and abs(value) > MAX_NUMBER:
        raise Refused("%s: %s is too large (at most %d)" % (option(param), value, MAX_NUMBER))
    return value


def duration_limit(tool, values, cap, long_running):
    """Seconds after which the runner stops the tool itself (None: no limit), refusing a
    ``--duration`` over the cap. A tool without a duration runs until the cap."""
    if tool in long_running:
        return None
    asked = values.get("duration") or 0
    if asked > cap:
        raise Refused(
            "--duration %s over the policy's cap of %s" % (_describe_s(asked), _describe_s(cap))
        )
    return cap


# -- run slots: how many runs at once on this host --------------------------------------


def _proc_start(pid):
    """The process's start time in clock ticks (tells a pid from its reuse), or None."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


def take_slot(limit, uid, tool, replace_stale):
    """Lock one of ``limit`` slot files for the life of this process. When
    ``replace_stale``, first stop this user's earlier run of the same tool (a session that
    reconnected): SIGTERM after checking the slot's pid, uid, tool and start time."""
    os.makedirs(SLOT_DIR, mode=0o700, exist_ok=True)
    check_trusted(SLOT_DIR, "slot directory")
    mine = {"pid": os.getpid(), "uid": uid, "tool": tool, "start": _proc_start(os.getpid())}
    fds = []
    try:
        for n in range(limit):
            fds.append(_open_slot(n))
        if replace_stale:
            for fd in fds:
                holder = _holder(fd)
                if holder and holder.get("uid") == uid and holder.get("tool") == tool:
                    _stop_holder(holder, fd)
        for attempt in range(SLOT_TRIES):
            if attempt:
                time.sleep(SLOT_RETRY_S)
            for fd in fds:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue
                os.ftruncate(fd, 0)
                os.pwrite(fd, json.dumps(mine).encode(), 0)
                for other in fds:
                    if other != fd:
                        os.close(other)
                return fd
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    for fd in fds:
        os.close(fd)
    raise Refused("%d runs already on this host (policy max %d)" % (limit, limit))


def _open_slot(n):
    path = "%s/slot-%d" % (SLOT_DIR, n)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    st = os.fstat(fd)
    if st.st_uid != 0 or not stat.S_ISREG(st.st_mode) or st.st_mode & 0o077:
        os.close(fd)
        raise Refused("slot file %s: not a root-owned 0600 regular file" % path)
    return fd


def _holder(fd):
    """What the slot's holder wrote, when the slot is held; None when it is free."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        try:
            return json.loads(os.pread(fd, 4096, 0).decode() or "null")
        except ValueError:
            return None
    fcntl.flock(fd, fcntl.LOCK_UN)
    return None


def _stop_holder(holder, fd):
    """SIGTERM the slot's holder (it cleans up as on a controller's stop), SIGKILL it if
    it still holds the slot after STALE_TERM_S, and wait for the slot to be free."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or pid <= 1 or _proc_start(pid) != holder.get("start"):
        return
    try:
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return
    if _slot_freed(fd, STALE_TERM_S):
        return
    if _proc_start(pid) == holder.get("start"):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    _slot_freed(fd, GRACE_S)  # the drain process lets go once the pipe is drained


def _slot_freed(fd, seconds):
    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
            continue
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True


# -- audit ------------------------------------------------------------------------------


class Audit:
    """One JSON line per event in the root-only append-only file and in syslog."""

    def __init__(self, environ):
        self.base = {
            "type": "runner-run",
            "host": socket.gethostname(),
            "runner_version": RUNNER_VERSION,
            "pid": os.getpid(),
            "sudo_user": environ.get("SUDO_USER"),
            "sudo_uid": _int_or_none(environ.get("SUDO_UID")),
            "uid": os.getuid(),
        }
        self.started = None
        syslog.openlog("ebpfdiag-runner", syslog.LOG_PID, syslog.LOG_AUTHPRIV)

    def write(self, event, **fields):
        record = dict(self.base)
        record.update(fields)
        record["event"] = event
        record["time"] = _utc(time.time())
        line = json.dumps(record, sort_keys=True)
        level = syslog.LOG_WARNING if event == "refused" else syslog.LOG_INFO
        with contextlib.suppress(Exception):
            syslog.syslog(level, line)
        try:
            self._append(line)
        except (OSError, Refused) as exc:  # syslog has it; say why the file does not
            sys.stderr.write("ebpfdiag-runner: audit file not written: %s\n" % exc)

    def _append(self, line):
        if not os.path.isdir(AUDIT_DIR):
            os.makedirs(AUDIT_DIR, mode=0o700, exist_ok=True)
        check_trusted(AUDIT_DIR, "audit directory")
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(AUDIT_FILE, flags, 0o600)
        try:
            st = os.fstat(fd)
            if st.st_uid == 0 and stat.S_ISREG(st.st_mode) and not st.st_mode & 0o077:
                os.write(fd, (line + "\n").encode())
        finally:
            os.close(fd)


def _int_or_none(text):
    return int(text) if text and text.isdigit() else None


def _utc(seconds):
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + ".%03dZ" % (
        int(seconds * 1000) % 1000
    )


# -- the run ----------------------------------------------------------------------------


def prepare(environ, inp, facts):
    """Every check, in order; returns what ``run_code`` needs. ``facts`` collects what is
    known so far for the audit record of a refusal."""
    check_interpreter(environ, sys.flags)
    me = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not me.startswith(INSTALL_DIR + "/"):
        raise Refused("runner started as %r, not from %s" % (me, INSTALL_DIR))
    check_trusted(me, "runner")
    packages = trusted_packages()
    release = os.path.realpath(RELEASE_DIR)
    check_trusted(release, "release directory")
    catalog = load_json(os.path.join(release, "catalog.json"), "catalog")
    policy = check_policy(load_json(POLICY_FILE, "policy"))
    user, uid, groups = identify(environ)
    facts.update(user=user, groups=groups)
    allowed = allowed_tools(policy, catalog, uid, groups)
    if not allowed:
        raise Refused("user %s is in no group the policy allows (groups: %s)"
                      % (user, ", ".join(groups) or "none"))  # fmt: skip
    _mark(
        "want-request %d.%d.%d %s %s"
        % (sys.version_info[:3] + (RUNNER_VERSION, ",".join(sorted(allowed))))
    )
    req = read_request(inp)
    tool, args = req["tool"], req["args"]
    shown = [a[: MAX_ARG_LEN + 1] for a in args[: MAX_ARGS + 1]]  # a record stays one line
    facts.update(tool=tool[:64], args=shown, ssh_user=(req.get("ssh_user") or "")[:64] or None)
    check_tool_name(tool, allowed)
    src = load_tool(release, catalog, tool, req["sha256"])
    facts["sha256"] = hashlib.sha256(src).hexdigest()
    values = check_args(catalog["tools"][tool].get("params", []), args)
    long_running = set(policy.get("long_running", []))
    if catalog["tools"][tool].get("long_running"):
        long_running.add(tool)
    limit = duration_limit(tool, values, allowed[tool], long_running)
    slot = take_slot(policy["max_runs_per_host"], uid, tool, tool in long_running)
    facts["slot"] = slot
    return tool, src, args, limit, packages


def _stop_after(seconds, tool):
    time.sleep(seconds)
    sys.stderr.write(
        "ebpfdiag-runner: %s stopped at the policy's cap of %s\n" % (tool, _describe_s(seconds))
    )
    stop_self(None)


def runner_main():
    environ = dict(os.environ)
    audit = Audit(environ)
    facts = {}
    inp = sys.stdin.buffer
    started = time.time()
    try:
        tool, src, args, limit, packages = prepare(environ, inp, facts)
    except Refused as exc:
        why = str(exc).replace("\n", " ")
        facts.pop("slot", None)
        audit.write("refused", start=_utc(started), refusal=why, exit_status=EXIT_REFUSED, **facts)
        _mark("error refused " + why)
        sys.exit(EXIT_REFUSED)
    facts.pop("slot")
    audit.write("start", start=_utc(started), **facts)

    def at_leave(status):
        audit.write("end", start=_utc(started), end=_utc(time.time()), exit_status=status, **facts)

    AT_LEAVE.append(at_leave)
    os.environ.clear()
    os.environ.update(TOOL_ENV)
    os.chdir("/")
    os.umask(0o022)
    sys.path[:] = [p for p in sys.path if p] + packages
    if limit is not None:
        timer = threading.Thread(target=_stop_after, args=(limit, tool), name="ebpfdiag-cap")
        timer.daemon = True
        timer.start()
    name = tool + ".py"
    run_code(inp, name, compile(src, name, "exec"), args)
