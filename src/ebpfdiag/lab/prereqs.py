"""Checks (and, when asked, fixes) that the lab and BCC need on this machine.

Each problem is reported with the exact command that fixes it. Machine-wide changes
(header links, the tracefs mount) are made only when asked or when nothing else works,
are reported, and are recorded so that ``lab down`` undoes exactly those.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from ebpfdiag.errors import LabError, UsageError
from ebpfdiag.lab.netns import run

DEBIAN_PACKAGES = ("openssh-server", "sudo", "nftables", "conntrack", "iproute2", "python3-bpfcc")
TRACEFS = Path("/sys/kernel/tracing")
HEADERS_ROOT = Path("/usr/src")


def check_root() -> None:
    if os.geteuid() != 0:
        raise UsageError("the lab needs root (namespaces, users, nftables); fix: run it with sudo")


def missing_packages(packages: tuple[str, ...] = DEBIAN_PACKAGES) -> list[str]:
    """Debian packages from ``packages`` that dpkg does not list as installed."""
    if shutil.which("dpkg-query") is None:
        raise LabError("dpkg-query not found: the lab supports Debian-based machines only")
    missing = []
    for package in packages:
        proc = subprocess.run(
            ["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True
        )
        if proc.returncode != 0 or not proc.stdout.endswith(" installed"):
            missing.append(package)
    return missing


def check_packages() -> None:
    missing = missing_packages()
    if missing:
        names = " ".join(missing)
        raise UsageError(f"missing Debian packages: {names}; fix: apt-get install {names}")


def modules_dir() -> Path:
    return Path("/lib/modules") / os.uname().release


def nearest_headers() -> tuple[Path, Path] | None:
    """The newest ``linux-headers-*-amd64`` tree and its ``-common`` sibling, if installed."""

    def version(path: Path) -> list[int]:
        return [int(n) for n in re.findall(r"\d+", path.name)]

    builds = sorted(HEADERS_ROOT.glob("linux-headers-*-amd64"), key=version)
    for build in reversed(builds):
        common = build.with_name(build.name[: -len("-amd64")] + "-common")
        if common.is_dir():
            return build, common
    return None


def ensure_headers(link: bool) -> tuple[list[str], dict[str, Any]]:
    """Make BCC find kernel headers; returns (messages, record of what was made)."""
    build = modules_dir() / "build"
    if build.exists():
        return [], {}
    found = nearest_headers()
    if found is None:
        return [
            f"no kernel headers for BCC: {build} is missing and no linux-headers-*-amd64 is "
            "installed; fix: apt-get install linux-headers-amd64, then lab up --link-headers"
        ], {}
    if not link:
        return [
            f"no kernel headers for BCC: {build} is missing; fix: lab up --link-headers "
            f"(links {found[0]})"
        ], {}
    made: dict[str, Any] = {"links": []}
    if not modules_dir().exists():
        modules_dir().mkdir(parents=True)
        made["dir"] = str(modules_dir())
    for name, target in (("build", found[0]), ("source", found[1])):
        path = modules_dir() / name
        if not path.exists() and not path.is_symlink():
            path.symlink_to(target)
            made["links"].append(str(path))
    return [f"linked kernel headers: {build} -> {found[0]}, source -> {found[1]}"], made


def remove_headers(made: dict[str, Any]) -> list[str]:
    """Undo ``ensure_headers``: only the links (and directory) it created; returns them."""
    messages = []
    for link in made.get("links", []):
        path = Path(link)
        if path.is_symlink():
            path.unlink()
            messages.append(f"header link {path}")
    directory = made.get("dir")
    if directory and Path(directory).is_dir() and not any(Path(directory).iterdir()):
        Path(directory).rmdir()
        messages.append(f"dir {directory}")
    return messages


def tracefs_mounted() -> bool:
    mounts = Path("/proc/mounts").read_text().splitlines()
    return any(line.split()[1:3] == [str(TRACEFS), "tracefs"] for line in mounts)


def ensure_tracefs() -> tuple[list[str], bool]:
    """Mount tracefs where BCC looks for it; returns (messages, whether it was mounted now)."""
    if tracefs_mounted():
        return [], False
    run(["mount", "-t", "tracefs", "tracefs", str(TRACEFS)])
    return [f"mounted tracefs at {TRACEFS}"], True


def unmount_tracefs() -> list[str]:
    if tracefs_mounted():
        run(["umount", str(TRACEFS)], check=False)
        return [f"tracefs mount {TRACEFS}"]
    return []
