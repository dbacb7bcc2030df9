"""Login users for lab hosts, shared by every namespace and counted by owner.

All namespaces share one ``/etc/passwd``, so two fleets may use the same user. A small
registry (``/var/lib/ebpfdiag/lab-users/USER/``) records which owners (fleet or lab
prefixes) hold the user and whether the lab created the account and its sudoers file;
the last owner to leave removes only what the lab created. Entries are written before
the account is made, so teardown after a crash still finds them.
"""

import contextlib
import fcntl
import grp
import pwd
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ebpfdiag.errors import LabError
from ebpfdiag.lab.netns import run

REGISTRY = Path("/var/lib/ebpfdiag/lab-users")
HOMES = Path("/var/lib/ebpfdiag/lab-homes")
SUDOERS_DIR = Path("/etc/sudoers.d")


def sudoers_path(user: str) -> Path:
    # sudo ignores drop-ins whose names contain a dot.
    return SUDOERS_DIR / f"ebpfdiag-{user.replace('.', '_')}"


def group_exists(group: str) -> bool:
    try:
        grp.getgrnam(group)
    except KeyError:
        return False
    return True


def user_exists(user: str) -> bool:
    try:
        pwd.getpwnam(user)
    except KeyError:
        return False
    return True


@contextmanager
def _locked() -> Iterator[None]:
    REGISTRY.mkdir(parents=True, exist_ok=True, mode=0o700)
    with open(REGISTRY / ".lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def acquire(
    user: str,
    owner: str,
    *,
    password_sudo: bool = False,
    sudo: bool = True,
    group: str | None = None,
) -> str | None:
    """Make sure ``user`` exists with sudo rights for ``owner``; return its password if any.

    ``password_sudo`` users get a random password and a sudoers rule without NOPASSWD,
    so ``sudo -n`` fails and ``sudo -S`` with the password works. ``sudo=False`` users get
    no sudoers file of their own; ``group`` (made if missing) is one they belong to.
    """
    with _locked():
        entry = REGISTRY / user
        (entry / "owners").mkdir(parents=True, exist_ok=True)
        (entry / "owners" / owner).touch()
        if group is not None and not group_exists(group):
            (entry / "group").write_text(group)
            run(["groupadd", group])
        if not user_exists(user):
            (entry / "created").touch()
            HOMES.mkdir(parents=True, exist_ok=True, mode=0o755)
            home = str(HOMES / user)
            run(["useradd", "--create-home", "--home-dir", home, "--shell", "/bin/bash", user])
            if password_sudo:
                password = secrets.token_urlsafe(18)
                (entry / "password").write_text(password)
                (entry / "password").chmod(0o600)
                run(["chpasswd"], input=f"{user}:{password}\n")
            else:
                # '*' instead of useradd's locked '!': sshd without PAM refuses locked accounts.
                run(["usermod", "-p", "*", user])
        if group is not None and user not in grp.getgrnam(group).gr_mem:
            run(["usermod", "-a", "-G", group, user])
        if sudo:
            _ensure_sudoers(user, entry, password_sudo)
        password_file = entry / "password"
        if password_sudo and not password_file.exists():
            raise LabError(f"user {user} exists but the lab did not make it: password unknown")
        return password_file.read_text() if password_sudo else None


def _ensure_sudoers(user: str, entry: Path, password_sudo: bool) -> None:
    path = sudoers_path(user)
    if path.exists():
        return
    tag = "ALL" if password_sudo else "NOPASSWD: ALL"
    text = f"# written by ebpfdiag lab for {user}; removed with it\n{user} ALL=(ALL:ALL) {tag}\n"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.chmod(0o440)
    try:
        run(["visudo", "-cf", str(tmp)])
    except LabError:
        tmp.unlink(missing_ok=True)
        raise
    (entry / "sudoers").touch()
    tmp.rename(path)


def release(user: str, owner: str) -> None:
    """Drop ``owner``'s hold on ``user``; the last owner removes what the lab created."""
    with _locked():
        entry = REGISTRY / user
        (entry / "owners" / owner).unlink(missing_ok=True)
        if not entry.exists() or any((entry / "owners").glob("*")):
            return
        if (entry / "sudoers").exists():
            sudoers_path(user).unlink(missing_ok=True)
        if (entry / "created").exists() and user_exists(user):
            run(["userdel", "--remove", user], check=False)
            if user_exists(user):
                raise LabError(f"could not remove user {user} (processes still running?)")
        if (entry / "group").exists():
            group = (entry / "group").read_text()
            if group_exists(group) and not grp.getgrnam(group).gr_mem:
                run(["groupdel", group], check=False)
        shutil.rmtree(entry, ignore_errors=True)
        with contextlib.suppress(OSError):
            HOMES.rmdir()


def owned_by(owner: str) -> list[str]:
    """Users that ``owner`` holds according to the registry (for teardown without state)."""
    if not REGISTRY.exists():
        return []
    return sorted(p.parent.parent.name for p in REGISTRY.glob(f"*/owners/{owner}"))
