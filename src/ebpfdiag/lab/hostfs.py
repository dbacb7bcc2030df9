"""Per-host copies of machine-wide paths, so each lab host has its own as a real one does.

Lab hosts are namespaces on one filesystem: what the ebpfdiag runner installs on one host
(its program, catalog, policy, audit file, run slots, sudoers drop-in) would otherwise be
on all of them. Each host's sshd therefore starts in a private mount namespace (``ip netns
exec`` gives it one) where these paths are bind mounts of the host's own directories
under the lab's state directory, and every login to that host sees them.

``/etc/sudoers.d`` is per host too; its first file includes the machine's real drop-ins
(bind-mounted before the directory is covered), so the sudo rules of the lab's other
users keep working on every host.

The mount points themselves (empty directories) must exist on the machine. They are made
once and counted by owner like lab users (``/var/lib/ebpfdiag/lab-mounts/``): the last lab
to leave removes the ones the lab made, never while another lab still mounts over them.
"""

from __future__ import annotations

import contextlib
import fcntl
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: The runner's paths on a host (docs/runner.md) and their modes when empty.
RUNNER_DIRS = {
    "/usr/local/lib/ebpfdiag-runner": 0o755,
    "/etc/ebpfdiag": 0o755,
    "/var/log/ebpfdiag": 0o700,
    "/run/ebpfdiag-runner": 0o700,
}
SUDOERS_DIR = "/etc/sudoers.d"
#: The host's first sudoers drop-in: includes the machine's own ones.
MACHINE_INCLUDE = "00-ebpfdiag-lab-machine"
REGISTRY = Path("/var/lib/ebpfdiag/lab-mounts")


def host_dir_for(target: str) -> str:
    """``/etc/sudoers.d`` -> ``etc-sudoers.d``: the name of a host's copy of ``target``."""
    return target.strip("/").replace("/", "-")


def prepare(hostdir: Path) -> list[tuple[Path, str]]:
    """Make the host's directories (kept while the lab is up, so what was installed
    survives an sshd restart); return the binds its sshd prelude makes, in order."""
    root = hostdir / "fs"
    root.mkdir(mode=0o755, exist_ok=True)
    root.chmod(0o755)
    machine = root / "machine-sudoers.d"
    machine.mkdir(mode=0o755, exist_ok=True)
    sudoers = root / host_dir_for(SUDOERS_DIR)
    sudoers.mkdir(mode=0o755, exist_ok=True)
    include = sudoers / MACHINE_INCLUDE
    if not include.exists():
        tmp = sudoers / f".{MACHINE_INCLUDE}.tmp"
        tmp.write_text(
            "# the machine's /etc/sudoers.d, seen from this lab host (ebpfdiag lab)\n"
            f'@includedir "{machine}"\n'
        )
        tmp.chmod(0o440)
        tmp.rename(include)
    binds: list[tuple[Path, str]] = [(Path(SUDOERS_DIR), str(machine)), (sudoers, SUDOERS_DIR)]
    for target, mode in RUNNER_DIRS.items():
        own = root / host_dir_for(target)
        if not own.exists():
            own.mkdir(mode=mode)
            own.chmod(mode)
        binds.append((own, target))
    return binds


def unpin(hosts_dir: Path) -> None:
    """Let the hosts' copies be removed: an installed runner makes its audit file
    append-only (``chattr +a``), which even root cannot delete until that is cleared."""
    chattr = shutil.which("chattr")
    if chattr is None or not hosts_dir.is_dir():
        return
    for fs in hosts_dir.glob("*/fs"):
        for path in fs.rglob("*"):
            if path.is_file() and not path.is_symlink():
                subprocess.run([chattr, "-a", "-i", str(path)], capture_output=True, check=False)


def prelude(binds: list[tuple[Path, str]]) -> list[str]:
    """Shell lines for the sshd's private mount namespace (after ``set -e``)."""
    return [f"mount --bind {shlex.quote(str(src))} {shlex.quote(dst)}" for src, dst in binds]


@contextmanager
def _locked() -> Iterator[None]:
    (REGISTRY / "owners").mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(REGISTRY / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def acquire(owner: str) -> None:
    """Make the mount points that are missing (recorded as the lab's), held by ``owner``."""
    with _locked():
        (REGISTRY / "owners" / owner).touch()
        for target in RUNNER_DIRS:
            path = Path(target)
            if not path.exists():
                (REGISTRY / "created").mkdir(exist_ok=True)
                (REGISTRY / "created" / host_dir_for(target)).write_text(target)
                path.mkdir(mode=0o755, parents=True)


def release(owner: str) -> list[str]:
    """Drop ``owner``'s hold; the last owner removes the empty mount points the lab made
    (after every host of the lab is gone: nothing is mounted on them any more)."""
    removed: list[str] = []
    with _locked():
        (REGISTRY / "owners" / owner).unlink(missing_ok=True)
        if any((REGISTRY / "owners").iterdir()):
            return removed
        created = REGISTRY / "created"
        for entry in sorted(created.glob("*")) if created.is_dir() else []:
            target = Path(entry.read_text())
            with contextlib.suppress(OSError):  # not empty: someone else's now; keep it
                target.rmdir()
                removed.append(f"dir {target}")
            entry.unlink()
    return removed
