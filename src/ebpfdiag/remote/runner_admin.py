"""Installs, reports on or removes the ebpfdiag runner on this host (as root, Python 3.6).

Pushed by ``ebpfdiag runner install|status|uninstall`` like any script, under full sudo;
the controller puts what it installs (runner program, catalog, bundled tools, policy)
into ``PAYLOAD`` below, so nothing else travels. Usage: ``install GROUP``, ``status``,
``uninstall``. Prints one JSON object (``type`` ``runner``) on stdout; exit 1 on failure.
Safe to run twice: files that are already right are left alone, a new release is built
beside the old one and ``current`` is swapped with rename(2), the sudoers drop-in is
checked with ``visudo -cf`` before it is renamed into place. See docs/runner.md.
"""
# ruff: noqa: UP031 - Python 3.6 on the hosts

import base64
import errno
import grp
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import zlib

PAYLOAD = None  # the controller's build, base64 of zlib'd JSON, set when pushed
INSTALL_DIR = "/usr/local/lib/ebpfdiag-runner"
RELEASES = INSTALL_DIR + "/releases"
CURRENT = INSTALL_DIR + "/current"
RUNNER = CURRENT + "/runner"
POLICY_DIR = "/etc/ebpfdiag"
POLICY_FILE = POLICY_DIR + "/runner-policy.json"
SUDOERS_FILE = "/etc/sudoers.d/ebpfdiag-runner"
AUDIT_DIR = "/var/log/ebpfdiag"
AUDIT_FILE = AUDIT_DIR + "/runner.log"
SLOT_DIR = "/run/ebpfdiag-runner"
MARK = "\x1eebpfdiag:"
_GROUP = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,31}$")


class AdminError(Exception):
    """Why this host could not be changed; one line."""


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def _ensure_dir(path, mode):
    if os.path.islink(path) or (os.path.exists(path) and not os.path.isdir(path)):
        raise AdminError("%s exists and is not a directory" % path)
    os.makedirs(path, mode=mode, exist_ok=True)
    os.chown(path, 0, 0)
    os.chmod(path, mode)


def _write(path, data, mode):
    """Write a file through a temporary name and rename(2): readers see old or new."""
    tmp = "%s.tmp-%d" % (path, os.getpid())
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        os.write(fd, data)
        os.fchown(fd, 0, 0)
        os.fchmod(fd, mode)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _release_ok(path, payload):
    """The release directory holds exactly the payload's files, unchanged."""
    if _read(os.path.join(path, "runner")) != payload["runner"].encode():
        return False
    catalog = _read(os.path.join(path, "catalog.json"))
    if catalog is None or json.loads(catalog.decode()) != payload["catalog"]:
        return False
    for entry in payload["catalog"]["tools"].values():
        data = _read(os.path.join(path, entry["file"]))
        if data is None or _sha(data) != entry["sha256"]:
            return False
    return True


def _build_release(path, payload):
    tmp = "%s/.%s.tmp-%d" % (RELEASES, payload["release"], os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    _ensure_dir(tmp, 0o755)
    _ensure_dir(tmp + "/tools", 0o755)
    _write(tmp + "/runner", payload["runner"].encode(), 0o755)
    catalog = json.dumps(payload["catalog"], indent=1, sort_keys=True) + "\n"
    _write(tmp + "/catalog.json", catalog.encode(), 0o644)
    for name, text in payload["tools"].items():
        _write(os.path.join(tmp, payload["catalog"]["tools"][name]["file"]), text.encode(), 0o644)
    if not _release_ok(tmp, payload):
        raise AdminError("release %s did not verify after writing" % payload["release"])
    if os.path.lexists(path):  # a damaged copy of this release: move it out of the way
        aside = "%s/.%s.old-%d" % (RELEASES, payload["release"], os.getpid())
        os.rename(path, aside)
        shutil.rmtree(aside, ignore_errors=True)
    os.rename(tmp, path)


def _swap_current(release):
    target = "releases/" + release
    if os.path.islink(CURRENT) and os.readlink(CURRENT) == target:
        return None
    previous = os.readlink(CURRENT) if os.path.islink(CURRENT) else None
    tmp = "%s.tmp-%d" % (CURRENT, os.getpid())
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.lchown(tmp, 0, 0)
    os.rename(tmp, CURRENT)
    return previous


def _prune(keep):
    """Releases other than the current one and the one it replaced (rollback by hand)."""
    removed = []
    for name in os.listdir(RELEASES):
        if name not in keep:
            shutil.rmtree(os.path.join(RELEASES, name), ignore_errors=True)
            removed.append(name)
    return sorted(removed)


def _sudoers_text(group):
    return (
        "# ebpfdiag runner: members of %s may run the installed runner, nothing else.\n"
        "# Written by 'ebpfdiag runner install'; see docs/runner.md.\n"
        '%%%s ALL=(root) NOPASSWD: %s ""\n' % (group, group, RUNNER)
    )


def _install_sudoers(group):
    text = _sudoers_text(group).encode()
    if _read(SUDOERS_FILE) == text and os.stat(SUDOERS_FILE).st_mode & 0o7777 == 0o440:
        return False
    # A name with a dot is ignored by sudo's #includedir until it is renamed.
    tmp = "/etc/sudoers.d/.ebpfdiag-runner.tmp-%d" % os.getpid()
    _write(tmp, text, 0o440)
    check = subprocess.run(["visudo", "-cf", tmp], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if check.returncode != 0:
        os.unlink(tmp)
        out = check.stdout.decode(errors="replace").strip().replace("\n", "; ")
        raise AdminError("visudo refused the sudoers drop-in: %s" % out)
    os.rename(tmp, SUDOERS_FILE)
    return True


def _install_audit():
    _ensure_dir(AUDIT_DIR, 0o700)
    fd = os.open(AUDIT_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        st = os.fstat(fd)  # an append-only (chattr +a) file refuses even an unchanged chmod
        if st.st_uid != 0 or st.st_gid != 0:
            os.fchown(fd, 0, 0)
        if st.st_mode & 0o7777 != 0o600:
            os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    chattr = shutil.which("chattr")
    if chattr:  # append-only where the filesystem supports it; ignored elsewhere
        subprocess.run(
            [chattr, "+a", AUDIT_FILE], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )


def self_check():
    """Start the installed runner as sudo would, with no request: it runs every start
    check (interpreter, ownership, catalog, policy) and says what stopped it."""
    if not os.path.exists(RUNNER):
        return {"ready": False, "why": "not installed"}
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "SUDO_UID": "0", "SUDO_USER": "root"}
    proc = subprocess.run(
        [RUNNER],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
        cwd="/",
        timeout=60,
    )
    markers = [
        line[len(MARK) :]
        for line in proc.stderr.decode(errors="replace").split("\n")  # not splitlines: \x1e splits
        if line.startswith(MARK)
    ]
    want = [m for m in markers if m.startswith("want-request ")]
    if want:
        return {"ready": True, "want_request": want[0]}
    errors = [m[len("error refused ") :] for m in markers if m.startswith("error refused ")]
    return {"ready": False, "why": errors[0] if errors else "exit status %d" % proc.returncode}


def install(group, payload):
    if not _GROUP.match(group):
        raise AdminError("'%s' is not a group name" % group)
    try:
        grp.getgrnam(group)
    except KeyError:
        raise AdminError("group %s does not exist on this host (create it first)" % group) from None
    if not os.path.exists("/usr/bin/python3"):
        raise AdminError("/usr/bin/python3 is missing (the runner's interpreter)")
    if shutil.which("visudo") is None:
        raise AdminError("visudo is missing (sudo is not installed)")
    os.umask(0o022)
    changed = []
    _ensure_dir(INSTALL_DIR, 0o755)
    _ensure_dir(RELEASES, 0o755)
    release = os.path.join(RELEASES, payload["release"])
    if not _release_ok(release, payload):
        _build_release(release, payload)
        changed.append("release")
    previous = _swap_current(payload["release"])
    if previous is not None or "release" in changed:
        changed.append("current")
    keep = {payload["release"]}
    if previous:
        keep.add(os.path.basename(previous))
    elif os.path.islink(CURRENT):
        keep.add(os.path.basename(os.readlink(CURRENT)))
    pruned = _prune(keep)
    _ensure_dir(POLICY_DIR, 0o755)
    policy = (json.dumps(payload["policy"], indent=1, sort_keys=True) + "\n").encode()
    if _read(POLICY_FILE) != policy:
        _write(POLICY_FILE, policy, 0o644)
        changed.append("policy")
    _install_audit()
    _ensure_dir(SLOT_DIR, 0o700)
    if _install_sudoers(group):
        changed.append("sudoers")
    check = self_check()
    out = {
        "action": "install",
        "version": payload["version"],
        "release": payload["release"],
        "changed": changed,
        "pruned": pruned,
        "group": group,
    }
    out.update(check)
    if not check["ready"]:
        raise AdminError("installed, but the runner refuses to start: %s" % check["why"], out)
    return out


def status():
    out = {"action": "status", "installed": os.path.islink(CURRENT)}
    if not out["installed"]:
        return out
    release = os.path.realpath(CURRENT)
    out["release"] = os.path.basename(release)
    catalog = _read(os.path.join(release, "catalog.json"))
    problems = []
    tools = {}
    try:
        catalog = json.loads(catalog.decode()) if catalog else {}
    except ValueError:
        catalog = {}
        problems.append("catalog.json is not valid JSON")
    out["version"] = catalog.get("runner_version")
    for name, entry in sorted(catalog.get("tools", {}).items()):
        data = _read(os.path.join(release, entry.get("file", "")))
        actual = _sha(data) if data is not None else None
        tools[name] = {"sha256": entry.get("sha256"), "ok": actual == entry.get("sha256")}
        if actual != entry.get("sha256"):
            problems.append("tool %s: file sha256 %s, catalog %s" % (name, actual, entry["sha256"]))
    runner = _read(os.path.join(release, "runner"))
    out["runner_sha256"] = _sha(runner) if runner is not None else None
    out["tools"] = tools
    policy = _read(POLICY_FILE)
    try:
        out["policy"] = json.loads(policy.decode()) if policy else None
    except ValueError:
        out["policy"] = None
        problems.append("%s is not valid JSON" % POLICY_FILE)
    sudoers = _read(SUDOERS_FILE)
    out["sudoers"] = [
        line for line in (sudoers or b"").decode().splitlines() if line and line[0] != "#"
    ]
    if sudoers is None:
        problems.append("%s is missing" % SUDOERS_FILE)
    out.update(self_check())
    out["problems"] = problems
    return out


def _remove_tree(path):
    """Remove what is inside ``path``, then ``path`` itself unless it is a mount point
    (an admin or a test may have mounted the runner's directories: EBUSY is fine)."""
    if not os.path.isdir(path) or os.path.islink(path):
        return False
    for name in sorted(os.listdir(path)):  # "current" first: no new run finds a release
        entry = os.path.join(path, name)
        if os.path.isdir(entry) and not os.path.islink(entry):
            shutil.rmtree(entry)
        else:
            os.unlink(entry)
    _rmdir(path)
    return True


def _rmdir(path):
    """rmdir, except on a mount point (a bind mount is not always ``ismount``)."""
    try:
        os.rmdir(path)
    except OSError as exc:
        if exc.errno != errno.EBUSY:
            raise


def uninstall():
    """Sudoers first (no new runs), then the program, catalog, policy and run slots.
    The audit file stays: it is the record of what ran. Runs under way go on to their end."""
    removed = []
    for path in (SUDOERS_FILE, POLICY_FILE):
        if os.path.lexists(path):
            os.unlink(path)
            removed.append(path)
    for path in (INSTALL_DIR, SLOT_DIR):
        if _remove_tree(path):
            removed.append(path)
    if os.path.isdir(POLICY_DIR) and not os.listdir(POLICY_DIR):
        _rmdir(POLICY_DIR)
    kept = [AUDIT_FILE] if os.path.exists(AUDIT_FILE) else []
    return {"action": "uninstall", "removed": removed, "kept": kept}


def main(argv):
    action = argv[0] if argv else ""
    try:
        if os.geteuid() != 0:
            raise AdminError("needs root (full sudo) on this host")
        if action == "install" and len(argv) == 2 and PAYLOAD:
            payload = json.loads(zlib.decompress(base64.b64decode(PAYLOAD)).decode())
            out = install(argv[1], payload)
        elif action == "status" and len(argv) == 1:
            out = status()
        elif action == "uninstall" and len(argv) == 1:
            out = uninstall()
        else:
            raise AdminError("usage: install GROUP (with a payload) | status | uninstall")
    except (AdminError, OSError, subprocess.SubprocessError) as exc:
        out = {"action": action or None}
        if isinstance(exc, AdminError) and len(exc.args) > 1:
            out.update(exc.args[1])
        out["error"] = str(exc.args[0]) if isinstance(exc, AdminError) else str(exc)
        print(json.dumps(dict(out, type="runner"), sort_keys=True), flush=True)
        return 1
    print(json.dumps(dict(out, type="runner"), sort_keys=True), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
