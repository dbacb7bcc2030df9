"""One SSH connection to one host: connect, launch a script under sudo, stream its output.

The script travels over the channel itself (see ``remote/bootstrap.py``): no scp, no
temporary files, and the remote process is bound to the channel's stdin, so it ends when
the controller goes away. Errors become ``HostFailure`` with a kind and a one-line message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import os
import random
import shlex
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import asyncssh
from asyncssh.constants import EXTENDED_DATA_STDERR
from asyncssh.encryption import get_encryption_algs
from asyncssh.kex import get_kex_algs

from ebpfdiag import audit, programs
from ebpfdiag.clock import ClockSample
from ebpfdiag.inventory import Host

MARK = b"\x1eebpfdiag:"
SUDO_PROMPT = "\x1eebpfdiag:sudo-prompt\n"
#: Clock pings settle to one per this many seconds (one short line each way).
CLOCK_PERIOD_S = 1.0
#: How long a script gets to clean up and exit after stdin EOF before its channel is
#: closed on it (the bootstrap itself gives the script 4 s after its SIGTERM).
STOP_GRACE_S = 6.0
#: Exit code of the bootstrap itself when the script did not arrive intact.
EXIT_BAD_SCRIPT = 98
#: Largest SSH packet we accept on a script's channel. OpenSSH sends bigger packets when
#: allowed (asyncssh's default is 32 KiB): a busy stream costs fewer packets to decrypt and
#: dispatch, ~0.5 us less controller CPU per 290-byte record. The window is unchanged, so
#: what one host can have in flight stays bounded.
MAX_PACKET = 256 * 1024
#: The root-owned runner of the shipped tools (docs/runner.md): the path its sudoers rule
#: names, run without arguments.
RUNNER = "/usr/local/lib/ebpfdiag-runner/current/runner"
#: Chooses the launch on the host, in the launch's own channel (no extra round trip): where
#: a runner is installed and ``sudo -l`` does not allow the python command line (``$@``)
#: but allows the runner, the runner; else the python command line under sudo as before
#: (so that sudo's own message says why, when neither is allowed). A host without a
#: runner costs a ``test``, not a ``sudo -l``.
CHOOSE_SUDO = (
    f'if [ -e {RUNNER} ] && ! sudo -n -l -- "$@" >/dev/null 2>&1 && '
    f"sudo -n -l -- {RUNNER} >/dev/null 2>&1; then exec sudo -n -- {RUNNER}; fi; "
    'exec sudo -n -- "$@"'
)
#: How the first line of a shipped tool's stdout starts (its ``hello`` record).
HELLO_PREFIXES = (b'{"type":"hello"', b'{"type": "hello"')
#: A compile the host offers to keep (never shown: see ebpfdiag.programs).
PROGRAM_PREFIX = b'{"type":"program",'
READY_LINE = b'{"type":"ready"'


def _supported(preferred: tuple[str, ...], available: list[bytes]) -> list[str]:
    return [alg for alg in preferred if alg.encode() in available]


#: Key exchange and ciphers proposed, in this order: OpenSSH's client defaults (nothing
#: weaker is ever proposed; asyncssh's own list adds SHA-1 and other legacy ones), the
#: cheapest first. AES-GCM costs the controller one call per packet where asyncssh's
#: ChaCha20-Poly1305 makes five, so it comes first (both are AEAD, as strong as each other).
#: The post-quantum hybrid stays first where the host offers it.
KEX_ALGS = _supported(
    (
        "mlkem768x25519-sha256",
        "curve25519-sha256",
        "curve25519-sha256@libssh.org",
        "ecdh-sha2-nistp256",
        "ecdh-sha2-nistp384",
        "ecdh-sha2-nistp521",
        "diffie-hellman-group-exchange-sha256",
        "diffie-hellman-group16-sha512",
        "diffie-hellman-group18-sha512",
        "diffie-hellman-group14-sha256",
    ),
    get_kex_algs(),
)
ENCRYPTION_ALGS = _supported(
    (
        "aes128-gcm@openssh.com",
        "aes256-gcm@openssh.com",
        "chacha20-poly1305@openssh.com",
        "aes128-ctr",
        "aes192-ctr",
        "aes256-ctr",
    ),
    get_encryption_algs(),
)


class HostFailure(Exception):
    """A per-host failure: ``kind`` is stable (for JSON), ``str()`` is the one-line message;
    ``via`` is how the script was launched, when the host said so before failing."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.via: str | None = None


@dataclass(frozen=True)
class Script:
    """A script to run remotely: its name (shown in tracebacks), source and arguments."""

    name: str
    source: bytes
    args: tuple[str, ...] = ()

    @classmethod
    def from_path(cls, path: Path, args: tuple[str, ...] = ()) -> Script:
        """The program to push for a shipped tool: bundled with the core modules it uses
        (checked in full by the tests, so only its text is read here)."""
        from ebpfdiag.remote.bundle import bundle

        return cls(path.name, bundle(path, check=False).encode(), args)

    @functools.cached_property
    def digest(self) -> str:
        """sha256 of the bytes pushed: what a runner checks its installed copy against."""
        return hashlib.sha256(self.source).hexdigest()

    @functools.cached_property
    def catalog_tool(self) -> str | None:
        """The shipped tool this script is, byte for byte (``tcp_rst``), else None.

        Only such a script can go through a runner, which runs its own installed copy
        and takes the name, never code: whatever else it is (a local file, a changed
        copy of a tool) is arbitrary code."""
        from ebpfdiag.catalog import scripts_dir
        from ebpfdiag.errors import EbpfdiagError
        from ebpfdiag.remote.bundle import bundle

        stem = self.name.removesuffix(".py")
        try:
            path = scripts_dir() / f"{stem}.py"
            if "/" in stem or not path.is_file():
                return None
            shipped = bundle(path, check=False).encode()
        except (EbpfdiagError, OSError, ValueError):
            return None
        return stem if shipped == self.source else None

    def frame(self) -> bytes:
        """Header line + source; the name is the header's last field (spaces allowed)."""
        name = self.name.replace("\n", " ")
        head = f"EBPFDIAG1 {len(self.source)} {self.digest} {name}\n"
        return head.encode(errors="replace") + self.source

    def request(self, ssh_user: str) -> bytes:
        """What a runner gets instead of the code: the tool, the digest this controller
        would push, the arguments, and who logged in (for its audit record)."""
        body = {
            "tool": self.catalog_tool,
            "sha256": self.digest,
            "args": list(self.args),
            "ssh_user": ssh_user,
        }
        return b"EBPFDIAG-RUN1 " + json.dumps(body, separators=(",", ":")).encode() + b"\n"


@dataclass(frozen=True)
class SSHOptions:
    """Connection settings shared by every host of one run."""

    accept_new_host_keys: bool = False
    sudo_password: str | None = field(default=None, repr=False)
    #: handshakes dropped by sshd (MaxStartups) are tried again this many times: measured
    #: with 1,000 logins at a fan-out of 64 to one sshd at MaxStartups 10:30:60, 3 left
    #: 3% of them failed; with 8 (about 25 s of back-off at most) none did
    connect_retries: int = 8
    keepalive_interval: float = 15.0
    #: host name -> the host to tunnel through (ProxyJump), resolved from the inventory
    jumps: Mapping[str, Host] = field(default_factory=dict)


class JumpPool:
    """One connection per jump host, shared by every host behind it (and opened once)."""

    def __init__(self, opts: SSHOptions):
        self.opts = opts
        self._conns: dict[str, asyncio.Task] = {}

    async def get(self, jump: Host) -> asyncssh.SSHClientConnection:
        task = self._conns.get(jump.name)
        if task is None or (task.done() and (task.cancelled() or task.exception())):
            task = asyncio.ensure_future(connect(jump, self.opts, self))
            self._conns[jump.name] = task
        try:
            return await asyncio.shield(task)
        except HostFailure as exc:
            raise HostFailure(exc.kind, f"jump host {jump.name}: {exc}") from None

    def close(self) -> None:
        for task in self._conns.values():
            if task.done() and not task.cancelled() and not task.exception():
                task.result().close()
            else:
                task.cancel()


@functools.cache
def bootstrap_source() -> str:
    return resources.files("ebpfdiag.remote").joinpath("bootstrap.py").read_text()


def remote_command(host: Host, script: Script, use_sudo: bool, with_password: bool) -> str:
    """The shell command line run on the host (no secrets: the password goes over stdin).

    Under ``sudo -n`` a small ``sh`` prelude picks full sudo or the runner on the host
    (``CHOOSE_SUDO``); with a password, sudo is asked for the python command line alone."""
    return _command_line(host.python, script.args, use_sudo, with_password)


@functools.lru_cache(maxsize=64)  # quoting the 9 KB bootstrap once per run, not per host
def _command_line(python: str, args: tuple[str, ...], use_sudo: bool, with_password: bool) -> str:
    argv = [python, "-c", bootstrap_source(), *args]
    if use_sudo and with_password:
        argv = ["sudo", "-S", "-p", SUDO_PROMPT, "--", *argv]
    elif use_sudo:
        argv = ["sh", "-c", CHOOSE_SUDO, "ebpfdiag", *argv]
    return " ".join(shlex.quote(a) for a in argv)


def _known_hosts_files(host: Host) -> tuple[Path, ...]:
    """Where this host's keys are trusted from, as OpenSSH decides: the inventory's file,
    else ~/.ssh/config's UserKnownHostsFile for the host, else ~/.ssh/known_hosts."""
    if host.known_hosts:
        return _named_known_hosts(host.known_hosts)
    return _default_known_hosts(host.address)


@functools.cache
def _named_known_hosts(name: str) -> tuple[Path, ...]:
    return (Path(os.path.expanduser(name)),)


#: The client configuration asyncssh reads (it does not read /etc/ssh/ssh_config).
SSH_CONFIG = "~/.ssh/config"


@functools.cache
def _config_text() -> str | None:
    try:
        return Path(SSH_CONFIG).expanduser().read_text(errors="replace")
    except OSError:
        return None


def _config_may_set(*keywords: str) -> bool:
    """Whether ~/.ssh/config names one of ``keywords`` (or includes other files): only then
    is it parsed for a host, which costs a millisecond or two per host of a large fleet."""
    text = _config_text()
    if text is None:
        return False
    names = {k.lower() for k in (*keywords, "Include")}
    return any(
        line.split(None, 1)[0].split("=", 1)[0].lower() in names
        for line in text.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )


@functools.cache  # known_hosts and algorithms both ask for a host's options
def _host_options(address: str, config: bool) -> asyncssh.SSHClientConnectionOptions:
    return asyncssh.SSHClientConnectionOptions(
        config=[os.path.expanduser(SSH_CONFIG)] if config else [], host=address
    )


@functools.cache
def _default_known_hosts(address: str) -> tuple[Path, ...]:
    if _config_may_set("UserKnownHostsFile"):
        try:
            files = _host_options(address, True).known_hosts
        except (OSError, ValueError, asyncssh.Error):
            files = None
        if files:
            return tuple(Path(os.path.expanduser(f)) for f in files)
    return (Path("~/.ssh/known_hosts").expanduser(),)


@functools.cache
def _algorithms(address: str) -> dict[str, list[str]]:
    """Our key exchange and cipher lists, except one that ~/.ssh/config chooses for this
    host (``KexAlgorithms``, ``Ciphers``): a site's policy wins over our speed order."""
    ours = {"kex_algs": KEX_ALGS, "encryption_algs": ENCRYPTION_ALGS}
    if not _config_may_set("KexAlgorithms", "Ciphers"):
        return ours
    try:
        configured, default = _host_options(address, True), _host_options(address, False)
    except (OSError, ValueError, asyncssh.Error):
        return ours  # connect() reads the same file and reports what is wrong with it
    return {k: v for k, v in ours.items() if getattr(configured, k) == getattr(default, k)}


def _known_hosts_path(host: Host) -> Path:
    """The file named in messages, and where --accept-new-host-keys records a key."""
    return _known_hosts_files(host)[0]


#: parsed known_hosts per file set, with the (inode, size, mtime) of each file it came from
_KNOWN_HOSTS: dict[tuple[str, ...], tuple[tuple, asyncssh.SSHKnownHosts]] = {}


def _stamps(paths: tuple[Path, ...]) -> tuple[tuple[str, ...], tuple]:
    """The files of ``paths`` that exist, and what identifies each one's content."""
    present, stamps = [], []
    for path in paths:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            continue
        present.append(str(path))
        stamps.append((st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(present), tuple(stamps)


def trusted_host_keys(host: Host) -> asyncssh.SSHKnownHosts:
    """The host's known_hosts files, parsed once per content rather than once per host:
    asyncssh given file names parses them at every connection, which costs O(lines) per
    host, so O(hosts^2) for a fleet whose keys share one file (20 ms per host at 1,000).
    A file that changes (--accept-new-host-keys appends to it) is read again."""
    files, stamp = _stamps(_known_hosts_files(host))
    if not files:  # no file yet: nothing is trusted (asyncssh would fail on a missing file)
        return asyncssh.import_known_hosts("")
    cached = _KNOWN_HOSTS.get(files)
    if cached is None or cached[0] != stamp:
        cached = (stamp, asyncssh.read_known_hosts(list(files)))
        _KNOWN_HOSTS[files] = cached
    return cached[1]


def _host_key_entry_name(host: Host) -> str:
    port = host.port or 22
    return host.address if port == 22 else f"[{host.address}]:{port}"


def _has_known_key(host: Host) -> bool:
    try:
        trusted, ca, *_ = asyncssh.match_known_hosts(
            trusted_host_keys(host), host.address, host.address, host.port or 22
        )
    except (OSError, ValueError, asyncssh.Error):
        return False
    return bool(trusted or ca)


#: loaded client keys per identity file, with the file's stamp
_CLIENT_KEYS: dict[str, tuple[tuple, list]] = {}


def client_keys(path: str) -> list:
    """The identity file's key pair (with its .pub and -cert.pub), loaded once per run
    rather than by asyncssh at every connection."""
    st = os.stat(path)
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _CLIENT_KEYS.get(path)
    if cached is None or cached[0] != stamp:
        cached = (stamp, asyncssh.load_keypairs([path]))
        _CLIENT_KEYS[path] = cached
    return cached[1]


def _remember_host_key(host: Host, key: asyncssh.SSHKey) -> None:
    path = _known_hosts_path(host)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = f"{_host_key_entry_name(host)} {key.export_public_key().decode().strip()}\n"
    with open(path, "a") as f:
        f.write(line)


def _describe(host: Host, exc: BaseException) -> HostFailure:
    """Map asyncssh/OS errors to a kind and a short message with a hint."""
    where = f"{host.address}:{host.port or 22}"
    if isinstance(exc, asyncssh.HostKeyNotVerifiable):
        if _has_known_key(host):
            return HostFailure(
                "host-key-changed",
                f"host key for {where} does not match {_known_hosts_path(host)} (it changed: "
                f"possible man-in-the-middle); refused. If the change is expected: "
                f"ssh-keygen -R {shlex.quote(_host_key_entry_name(host))}",
            )
        return HostFailure(
            "host-key-unknown",
            f"host key for {where} is not in {_known_hosts_path(host)}; "
            "add it (ssh-keyscan) or pass --accept-new-host-keys",
        )
    if isinstance(exc, asyncssh.PermissionDenied):
        return HostFailure(
            "auth", f"authentication failed for {host.user or '(default user)'}@{where}"
        )
    if isinstance(exc, ConnectionRefusedError):
        return HostFailure("unreachable", f"connection refused by {where}")
    if isinstance(exc, asyncio.TimeoutError | TimeoutError):
        return HostFailure("unreachable", f"connection to {where} timed out")
    if isinstance(exc, OSError):
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        return HostFailure("unreachable", f"cannot connect to {where}: {reason}")
    if isinstance(exc, asyncssh.Error):
        return HostFailure("ssh", f"ssh error from {where}: {exc.reason}")
    return HostFailure("ssh", f"ssh error from {where}: {exc}")


#: back-off between handshakes dropped by sshd: doubling from the first, at most the last,
#: each stretched by up to 100% at random so that a dropped burst does not come back as one
RETRY_FIRST_S = 0.2
RETRY_MAX_S = 3.0

_RETRYABLE = (asyncssh.ConnectionLost, ConnectionResetError, BrokenPipeError, EOFError)


async def connect(host: Host, opts: SSHOptions, jumps: JumpPool) -> asyncssh.SSHClientConnection:
    """Open a connection, retrying when sshd drops it during key exchange (MaxStartups)."""
    accept_new = opts.accept_new_host_keys and not _has_known_key(host)
    kwargs: dict = {
        "host": host.address,
        "known_hosts": None if accept_new else trusted_host_keys(host),
        "connect_timeout": host.connect_timeout,
        "login_timeout": host.connect_timeout,
        "keepalive_interval": opts.keepalive_interval,
        "keepalive_count_max": 3,
        **_algorithms(host.address),
        "compression_algs": None,
    }
    if host.port:
        kwargs["port"] = host.port
    if host.user:
        kwargs["username"] = host.user
    if host.identity_file:
        path = os.path.expanduser(host.identity_file)
        try:
            kwargs["client_keys"] = client_keys(path)
        except (OSError, ValueError, asyncssh.Error) as exc:
            reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            raise HostFailure("auth", f"cannot use identity file {path}: {reason}") from None
    jump = opts.jumps.get(host.name)  # resolved from the inventory for every jumping host
    if jump is not None:
        kwargs["tunnel"] = await jumps.get(jump)
    delay = RETRY_FIRST_S
    for attempt in range(opts.connect_retries + 1):
        try:
            conn = await asyncssh.connect(**kwargs)
            break
        except _RETRYABLE as exc:
            if attempt == opts.connect_retries:
                raise _describe(host, exc) from None
            await asyncio.sleep(delay * (1 + random.random()))
            delay = min(delay * 2, RETRY_MAX_S)
        except (OSError, asyncio.TimeoutError, asyncssh.Error) as exc:
            raise _describe(host, exc) from None
    if accept_new:
        key = conn.get_server_host_key()
        if key is not None:
            _remember_host_key(host, key)
    return conn


LinesHandler = Callable[[str, list[bytes]], None]
"""Called with (stream, lines without their newlines) for each batch of script output."""


@dataclass
class RunOutcome:
    exit_status: int | None
    exit_signal: str | None
    stopped_by_us: bool
    #: how the script ran: ``sudo``, ``runner``, ``root`` (logged in as root) or ``direct``
    #: (``sudo: false``: the login user's own rights)
    via: str | None = None


class StopSignal:
    """Whether one host's run should end, and whom to tell when it should.

    Like an ``asyncio.Event``, but those who must act on it register a callback: waiting
    for an event takes a task and a future per waiter, which on a large fleet is a
    measurable part of the controller's CPU per host."""

    def __init__(self) -> None:
        self._set = False
        self._callbacks: list[Callable[[], None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    def on_set(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when the signal is set (now, if it is); returns the function
        that unregisters it."""
        if self._set:
            callback()
            return _nothing
        self._callbacks.append(callback)

        def forget() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return forget


def _nothing() -> None:
    pass


class _Channel(asyncssh.SSHClientSession):
    """A launched script's channel: output goes to its ``RemoteRun`` as it arrives, as
    complete lines, one call per SSH packet (the streams API costs a task wake-up and a
    future per read)."""

    def __init__(self, run: RemoteRun):
        self._run = run
        self._partial = {None: b"", EXTENDED_DATA_STDERR: b""}

    def data_received(self, data: bytes, datatype: int | None) -> None:
        if b"\n" not in data:
            self._partial[datatype] += data
            return
        lines = data.split(b"\n")
        rest = self._partial[datatype]
        if rest:  # the unfinished line joins its rest (the packet itself is not copied)
            lines[0] = rest + lines[0]
        self._partial[datatype] = lines.pop()
        self._deliver(datatype, lines)

    def eof_received(self) -> bool:
        self._flush()
        self._run._ended()
        return True  # stdin stays open: the run decides when to end it

    def connection_lost(self, exc: Exception | None) -> None:
        self._flush()
        self._run._closed(exc)

    def _flush(self) -> None:
        """An unfinished last line is a line too, once no more can come."""
        for datatype, rest in self._partial.items():
            if rest:
                self._partial[datatype] = b""
                self._deliver(datatype, [rest])

    def _deliver(self, datatype: int | None, lines: list[bytes]) -> None:
        if datatype == EXTENDED_DATA_STDERR:
            self._run._on_stderr(lines)
        else:
            self._run._on_stdout(lines)


class RemoteRun:
    """Drives one launched script: sudo prompt, script transfer, clock pings, stop, exit.

    Everything the host says is handled in callbacks as it arrives (markers answered
    there, the script written as soon as it is asked for); the run's coroutine only
    waits for the channel to close."""

    def __init__(
        self,
        host: Host,
        script: Script,
        opts: SSHOptions,
        on_lines: LinesHandler,
        on_running: Callable[[], None],
        on_clock: Callable[[ClockSample], None] | None,
        clock_pings: int = 5,
        stop_grace: float = STOP_GRACE_S,
    ):
        """``stop_grace``: seconds the script gets to exit once stopped (stdin EOF); past
        them the channel is closed and the run fails with a ``stop`` error."""
        self.host = host
        self.script = script
        self.opts = opts
        self.on_lines = on_lines
        self.on_running = on_running
        self.on_clock = on_clock
        self.clock_pings = clock_pings
        self.stop_grace = stop_grace
        self.via: str | None = None
        self.use_sudo = host.sudo and host.user != "root"
        #: how the script is launched when the host does not say otherwise (the runner)
        self.default_via = "sudo" if self.use_sudo else "root" if host.user == "root" else "direct"
        self.ssh_user = host.user or ""
        self._hello_pending = True
        #: what was written to answer ``want-script`` or ``want-request``; None until then
        self.launched: bytes | None = None
        self.running = False
        self.stopped_by_us = False
        self.remote_ended = False
        self.failure: HostFailure | None = None
        self.sudo_prompts = 0
        self.stderr_tail: list[str] = []
        self.ping_sent: dict[int, int] = {}
        self.chan: asyncssh.SSHClientChannel | None = None
        self.programs = programs.default_store()
        self._identity: str | None = None
        #: from a tool's ``hello`` to its ``ready``, a ``program`` record may come
        self._programs_open = False
        self._conn: asyncssh.SSHClientConnection | None = None
        self._closed_waiter: asyncio.Future | None = None
        self._task: asyncio.Task | None = None
        self._pinger: asyncio.Task | None = None
        self._grace: asyncio.TimerHandle | None = None

    def _write(self, data: bytes) -> bool:
        """Write to the script's stdin; False when it is closed (the run is ending)."""
        if self.chan is None:
            return False
        try:
            self.chan.write(data)
        except (OSError, asyncssh.Error):
            return False
        return True

    def _fail(self, failure: HostFailure) -> None:
        if self.failure is None:
            self.failure = failure
        if self.chan is not None:
            self.chan.close()

    def _on_stderr(self, lines: list[bytes]) -> None:
        """Markers drive the launch; other lines are the script's diagnostics."""
        plain: list[bytes] = []
        for line in lines:
            pos = line.find(MARK)
            if pos < 0:
                plain.append(line)
                continue
            if pos > 0:
                plain.append(line[:pos])
            self._on_marker(line[pos + len(MARK) :])
        if not plain:
            return
        if self.running:
            self.on_lines("stderr", plain)
        else:  # sudo/launch diagnostics: kept for the error
            self.stderr_tail.extend(line.decode(errors="replace") for line in plain)
            del self.stderr_tail[:-5]

    def _on_marker(self, marker: bytes) -> None:
        words = marker.decode(errors="replace").split()
        kind = words[0] if words else ""
        if kind == "sudo-prompt":
            self.sudo_prompts += 1
            if self.sudo_prompts > 1 or self.opts.sudo_password is None:
                self._fail(HostFailure("sudo", f"sudo on {self.host.name} rejected the password"))
            else:
                self._write(self.opts.sudo_password.encode() + b"\n")
        elif kind == "want-script":
            self._launch(self.script.frame())
        elif kind == "want-request":
            self._want_request(words[1:])
        elif kind == "want-program" and len(words) == 2:
            self._answer_program(words[1])
        elif kind == "running":
            self.running = True
            self.on_running()
            if self.on_clock is not None and not self.stopped_by_us:
                self._pinger = asyncio.ensure_future(self._ping())
        elif kind == "clock" and len(words) == 4:
            sent = self.ping_sent.pop(int(words[1]), None)
            if sent is not None and self.on_clock is not None:
                self.on_clock(ClockSample(sent, int(words[2]), time.monotonic_ns()))
        elif kind == "error" and len(words) >= 3 and words[1] == "refused":
            why = " ".join(words[2:])
            self._fail(HostFailure("runner", f"the runner on {self.host.name} refused: {why}"))
        elif kind == "error" and len(words) >= 3 and words[1] == "python-too-old":
            self._fail(
                HostFailure(
                    "python",
                    f"{self.host.python} on {self.host.name} is Python {words[2]}; need 3.6+",
                )
            )

    def _launch(self, data: bytes) -> None:
        """Answer the host's request for the script, unless the run is already ending."""
        if self.stopped_by_us or self.failure is not None or self.launched is not None:
            return
        if self.via is None:
            self.via = self.default_via
        self.launched = data
        self._write(data)

    def _want_request(self, words: list[str]) -> None:
        """The host has only the runner (``want-request PYTHON VERSION TOOLS``): ask it for
        the shipped tool by name; arbitrary code is refused here, before anything runs."""
        self.via = "runner"
        allowed = words[2].replace(",", ", ") if len(words) > 2 else "no tool"
        if self.script.catalog_tool is None:
            self._fail(HostFailure("runner", f"runner only on {self.host.name}: allows {allowed}"))
            return
        self._launch(self.script.request(self.ssh_user))

    def _answer_program(self, key: str) -> None:
        """The host's compiled program for ``key`` if it offered one before, else ``-``
        (compile); always answered, so the tool never waits for nothing."""
        data = None
        if self.programs is not None and self.via != "runner":
            data = self.programs.get(self._host_identity(), key)
        self._write(f"ctl program {key} {data or '-'}\n".encode())

    def _keep_program(self, line: bytes) -> None:
        if self.programs is None or self.via == "runner":
            return
        try:
            record = json.loads(line)
            key, data = record["key"], record["data"]
        except (ValueError, KeyError, TypeError):
            return
        if isinstance(key, str) and isinstance(data, str):
            self.programs.put(self._host_identity(), key, data)

    def _host_identity(self) -> str:
        """Whose programs these are: the inventory name and the host key it showed."""
        if self._identity is None:
            key = self._conn.get_server_host_key() if self._conn is not None else None
            fingerprint = key.get_fingerprint() if key is not None else "-"
            self._identity = f"{self.host.name} {self.host.address} {fingerprint}"
        return self._identity

    def _take_programs(self, lines: list[bytes]) -> list[bytes]:
        """Keep and remove a ``program`` record, which a tool writes between its ``hello``
        and its ``ready`` (other lines are not looked at: the stream's hot path)."""
        out = []
        for line in lines:
            if self._programs_open and line.startswith(PROGRAM_PREFIX):
                self._keep_program(line)
                continue
            if line.startswith(READY_LINE):
                self._programs_open = False
            out.append(line)
        return out

    def _on_stdout(self, lines: list[bytes]) -> None:
        """The script's stdout; the first line, a shipped tool's ``hello``, says ``via``
        (and only after one may a ``program`` record come)."""
        if self._hello_pending and lines:
            self._hello_pending = False
            first = lines[0]
            self._programs_open = first.startswith(HELLO_PREFIXES)
            if self._programs_open and self.via is not None:
                cut = first.index(b'"hello"') + len(b'"hello"')
                via = f',"via":"{self.via}"'.encode()
                lines = [first[:cut] + via + first[cut:], *lines[1:]]
        if self._programs_open:
            lines = self._take_programs(lines)
            if not lines:
                return
        self.on_lines("stdout", lines)

    def _ended(self) -> None:
        """The host closed the script's output (it has exited, or is about to)."""
        self.remote_ended = True

    def _closed(self, exc: Exception | None) -> None:
        if self._closed_waiter is not None and not self._closed_waiter.done():
            if exc is None:
                self._closed_waiter.set_result(None)
            else:
                self._closed_waiter.set_exception(exc)

    def stop(self) -> None:
        """End the script: stdin EOF (the bootstrap stops it and exits; before the launch
        it gets no script), unless it has already ended; given up after ``stop_grace``."""
        if self.remote_ended or self.stopped_by_us:
            return
        self.stopped_by_us = True
        if self.chan is not None:  # else the EOF follows as soon as the channel is open
            with contextlib.suppress(OSError, asyncssh.Error):
                self.chan.write_eof()
        self._grace = asyncio.get_running_loop().call_later(self.stop_grace, self._give_up)

    def _give_up(self) -> None:
        """The script did not exit in time once stopped: fail the run now, closing its
        channel without waiting for the host to confirm (the link may be dead), or
        stop waiting for the channel to open."""
        self._fail(
            HostFailure("stop", f"script did not exit within {self.stop_grace:g}s of being stopped")
        )
        if self.chan is not None:
            self._closed(None)
        elif self._task is not None:
            self._task.cancel()

    async def _ping(self) -> None:
        """Clock pings, stamped with the controller's monotonic clock (never its wall
        clock, which NTP may step): a quick burst, then at a growing interval up to
        ``CLOCK_PERIOD_S`` for as long as the script runs, so that offsets are followed
        over a long trace and a good sample comes soon after the script's busy start."""
        seq = 0
        delay = 0.02
        while True:
            self.ping_sent[seq] = time.monotonic_ns()
            if not self._write(f"ping {seq}\n".encode()):
                return
            seq += 1
            await asyncio.sleep(delay)
            if seq >= self.clock_pings:
                delay = min(max(delay * 2, 0.1), CLOCK_PERIOD_S)

    def send_control(self, text: str) -> bool:
        """Write ``ctl <text>`` to the running script's stdin, next to the pings (the
        bootstrap hands it to the script's ``ebpfdiag_control``); False when it cannot."""
        if not self.running or self.stopped_by_us or "\n" in text:
            return False
        return self._write(f"ctl {text}\n".encode())

    async def run(self, conn: asyncssh.SSHClientConnection, stop: StopSignal) -> RunOutcome:
        """Launch and stream until the script exits or ``stop`` is set (then stdin EOF);
        with an audit log, what happened is recorded there however the run ends."""
        started = time.time_ns()
        outcome: RunOutcome | None = None
        failure: BaseException | None = None
        try:
            outcome = await self._run(conn, stop)
            return outcome
        except HostFailure as exc:
            exc.via = self.via
            failure = exc
            raise
        except BaseException as exc:
            failure = exc
            raise
        finally:
            if audit.destination() is not None:
                audit.write(audit.host_run(self, started, outcome, failure))

    async def _run(self, conn: asyncssh.SSHClientConnection, stop: StopSignal) -> RunOutcome:
        host = self.host
        use_sudo = self.use_sudo
        with_password = use_sudo and self.opts.sudo_password is not None
        command = remote_command(host, self.script, use_sudo, with_password)
        self.ssh_user = conn.get_extra_info("username") or self.ssh_user
        self._conn = conn
        self._closed_waiter = asyncio.get_running_loop().create_future()
        self._task = asyncio.current_task()
        forget = stop.on_set(self.stop)
        try:
            try:
                self.chan, _ = await conn.create_session(
                    functools.partial(_Channel, self), command, encoding=None,
                    max_pktsize=MAX_PACKET,
                )  # fmt: skip
            except asyncio.CancelledError:
                if self.failure is None:  # cancelled from outside, not given up on
                    raise
                raise self.failure from None
            if self.stopped_by_us:  # stopped while the channel opened
                with contextlib.suppress(OSError, asyncssh.Error):
                    self.chan.write_eof()
            await self._closed_waiter
        finally:
            forget()
            if self._pinger is not None:
                self._pinger.cancel()
            if self._grace is not None:
                self._grace.cancel()
            if self.chan is not None and not self._closed_waiter.done():
                self.chan.close()  # cancelled: the channel goes with us
        if self.failure is not None:
            raise self.failure
        status = self.chan.get_exit_status()
        if not self.running and not self.stopped_by_us:
            raise _launch_failure(host, status, self.stderr_tail, use_sudo and not with_password)
        exit_signal = self.chan.get_exit_signal()
        signal = exit_signal[0] if exit_signal else None
        return RunOutcome(status, signal, self.stopped_by_us, self.via)


def _launch_failure(
    host: Host, status: int | None, stderr_tail: list[str], chose: bool = False
) -> HostFailure:
    """Why the bootstrap never ran the script: sudo, missing python, or something else
    (``chose``: the host was asked for full sudo or the runner, and allowed neither)."""
    text = " ".join(stderr_tail).strip()
    low = text.lower()
    if "password is required" in low or "a terminal is required" in low:
        runner = ", or install the ebpfdiag runner for this user's group" if chose else ""
        return HostFailure(
            "sudo",
            f"sudo needs a password on {host.name}; use --ask-sudo-pass or allow "
            f"NOPASSWD for this user{runner}",
        )
    if "not in the sudoers" in low or "not allowed to execute" in low or "may not run sudo" in low:
        user = host.user or "the login user"
        if chose:
            return HostFailure(
                "sudo",
                f"{user} may sudo neither {host.python} nor the ebpfdiag runner on {host.name}",
            )
        return HostFailure("sudo", f"{user} may not sudo on {host.name}")
    if status == 127 or "command not found" in low or "no such file" in low:
        return HostFailure("python", f"{host.python} not found on {host.name}")
    if status == EXIT_BAD_SCRIPT:
        return HostFailure("transfer", f"the script did not arrive intact on {host.name}")
    detail = f": {text}" if text else ""
    return HostFailure(
        "launch", f"could not start the script on {host.name} (exit {status}){detail}"
    )
