"""The controller's store of compiled BPF programs, so a tool started again on a host loads
its last compile instead of compiling (half a second or more of its time to ready).

A host offers what it compiled as a `program` record (scripts/bpf/core/programs.py) and
asks for it by key next time (docs/remote-protocol.md). Entries are kept per host
identity, the inventory name and the SSH host key, and only ever sent back to that same
host: byte code one host sent is never loaded on another, so a host that lies can only
harm itself. The store is a cache: a read or write that fails costs a compile, never a run.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import os
import re
from pathlib import Path

#: `off` disables the store; any other value is its directory.
ENV = "EBPFDIAG_PROGRAM_CACHE"
KEY = re.compile(r"[0-9a-f]{64}")
#: Largest entry taken (a compiled tool is about 10-30 KB encoded).
MAX_BYTES = 4 * 1024 * 1024
#: Entries kept per host (one per tool and set of options), least recently used dropped.
PER_HOST = 16


class ProgramStore:
    """Compiled programs by host identity and key, as the host encoded them."""

    def __init__(self, root: Path, per_host: int = PER_HOST, max_bytes: int = MAX_BYTES):
        self.root = root
        self.per_host = per_host
        self.max_bytes = max_bytes

    def _dir(self, identity: str) -> Path:
        return self.root / hashlib.sha256(identity.encode()).hexdigest()[:32]

    def get(self, identity: str, key: str) -> str | None:
        if not KEY.fullmatch(key):
            return None
        path = self._dir(identity) / key
        try:
            data = path.read_text("ascii")
            os.utime(path)  # recently used: kept longest
        except (OSError, UnicodeDecodeError):
            return None
        return data if _valid(data, self.max_bytes) else None

    def put(self, identity: str, key: str, data: str) -> bool:
        """Keep `data` for this host and key; False when it is not a plausible entry or
        cannot be written."""
        if not KEY.fullmatch(key) or not _valid(data, self.max_bytes):
            return False
        folder = self._dir(identity)
        try:
            folder.mkdir(mode=0o700, parents=True, exist_ok=True)
            tmp = folder / f".{key}.{os.getpid()}"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(data)
            os.replace(tmp, folder / key)
            self._trim(folder)
        except OSError:
            return False
        return True

    def _trim(self, folder: Path) -> None:
        entries = sorted(
            (p for p in folder.iterdir() if KEY.fullmatch(p.name)),
            key=lambda p: p.stat().st_mtime_ns,
        )
        for old in entries[: max(0, len(entries) - self.per_host)]:
            with contextlib.suppress(OSError):
                old.unlink()


def _valid(data: str, max_bytes: int) -> bool:
    if not data or len(data) > max_bytes:
        return False
    try:
        base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def default_store() -> ProgramStore | None:
    """The store the environment asks for: `EBPFDIAG_PROGRAM_CACHE` (a directory, or
    `off`), else ebpfdiag/programs under the user's cache directory."""
    value = os.environ.get(ENV, "")
    if value == "off":
        return None
    if value:
        return ProgramStore(Path(value))
    base = os.environ.get("XDG_CACHE_HOME")
    if not base:
        try:
            base = str(Path.home() / ".cache")
        except RuntimeError:  # no home directory: no store
            return None
    return ProgramStore(Path(base) / "ebpfdiag" / "programs")
