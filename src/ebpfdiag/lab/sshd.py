"""Real OpenSSH servers, one per namespace, each with its own config, host key and pid file.

Key authentication only and no PAM keep each daemon small (a hundred fit on two cores),
and every path lives in the lab's own directory so nothing of the machine's sshd is touched.
"""

import socket
import time
from collections.abc import Sequence
from pathlib import Path

from ebpfdiag.errors import LabError
from ebpfdiag.lab.netns import kill_pids, ns_exec_argv, pid_alive, pid_cmdline, pids_with_arg, run

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = Path("/run/sshd")


def generate_key(path: Path, comment: str) -> Path:
    """An ed25519 key pair without passphrase at ``path`` (kept if it already exists)."""
    if not path.exists():
        path.with_suffix(".pub").unlink(missing_ok=True)
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)])
    return path


def known_hosts_line(address: str, port: int, host_key: Path) -> str:
    """The line OpenSSH looks up: ``address`` for port 22, ``[address]:port`` otherwise."""
    kind, key = host_key.with_suffix(".pub").read_text().split()[:2]
    name = address if port == 22 else f"[{address}]:{port}"
    return f"{name} {kind} {key}"


def write_config(
    path: Path,
    *,
    port: int,
    host_key: Path,
    pid_file: Path,
    authorized_keys: Path,
    users: list[str],
    max_startups: str = "10:30:100",
    max_sessions: int = 10,
) -> Path:
    """An sshd_config that only admits ``users`` with the keys in ``authorized_keys``."""
    lines = [
        f"Port {port}",
        "ListenAddress 0.0.0.0",
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        f"AuthorizedKeysFile {authorized_keys}",
        f"AllowUsers {' '.join(users)}",
        "UsePAM no",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PermitRootLogin no",
        "StrictModes no",
        "UseDNS no",
        "PrintMotd no",
        "PrintLastLog no",
        "X11Forwarding no",
        "AllowTcpForwarding yes",
        f"MaxStartups {max_startups}",
        f"MaxSessions {max_sessions}",
        "LoginGraceTime 30",
        "LogLevel ERROR",
        "Subsystem sftp internal-sftp",
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def read_pid(pid_file: Path, config: Path) -> int | None:
    """The daemon's pid if it is alive and really runs ``config`` (pid files can go stale)."""
    try:
        pid = int(pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    # sshd rewrites its argv into one title string, so match a substring.
    if pid_alive(pid) and str(config) in " ".join(pid_cmdline(pid)):
        return pid
    return None


def start(
    netns: str, config: Path, pid_file: Path, log_file: Path, mounts: Sequence[str] = ()
) -> None:
    """Start sshd inside ``netns``; it daemonizes, so this returns once it has forked.
    ``mounts``: shell lines run first in its private mount namespace (``hostfs.prelude``)."""
    PRIVSEP_DIR.mkdir(mode=0o755, exist_ok=True)
    if read_pid(pid_file, config):
        return
    pid_file.unlink(missing_ok=True)
    # `ip netns exec` gives the daemon a private mount namespace with a fresh /sys, where
    # tracefs is not mounted: mount it there, so BPF scripts run over ssh see the tracepoints
    # exactly as on a real host. That mount, and the host's own ``mounts``, live and die
    # with that private namespace (every login to the host inherits them).
    lines = [
        "set -e",
        "mountpoint -q /sys/kernel/tracing || mount -t tracefs nodev /sys/kernel/tracing",
        *mounts,
        'exec "$@"',
    ]
    argv = ["sh", "-c", "\n".join(lines), "sh", SSHD, "-f", str(config), "-E", str(log_file)]
    run(ns_exec_argv(netns, argv))


def wait_ready(address: str, port: int, pid_file: Path, config: Path, deadline: float) -> int:
    """Block until the daemon wrote its pid and accepts TCP on ``address:port``."""
    while True:
        pid = read_pid(pid_file, config)
        if pid and _accepts(address, port):
            return pid
        if time.monotonic() > deadline:
            log = config.with_name("sshd.log")
            raise LabError(f"sshd for {address}:{port} did not come up (see {log})")
        time.sleep(0.05)


def _accepts(address: str, port: int) -> bool:
    try:
        with socket.create_connection((address, port), timeout=0.5):
            return True
    except OSError:
        return False


def stop(pid_file: Path, config: Path) -> None:
    """Stop the daemon started with ``config`` (by pid file, else by scanning for the config)."""
    pid = read_pid(pid_file, config)
    pids = [pid] if pid else pids_with_arg(str(config))
    kill_pids(pids)
    if pid_file.exists() and not read_pid(pid_file, config):
        pid_file.unlink(missing_ok=True)


def check_readable(path: Path) -> None:
    """sshd reads AuthorizedKeysFile as the login user: every directory above must allow it."""
    path.chmod(0o644)
    for parent in path.parents:
        if not parent.stat().st_mode & 0o001:
            raise LabError(
                f"{parent} is not searchable by other users, so sshd cannot read {path}; "
                "choose a work directory under a world-searchable path"
            )
