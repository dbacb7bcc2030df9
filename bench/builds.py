"""Which ebpfdiag a benchmark runs: this tree, or an earlier commit side by side with it.

``--against REV`` exports REV's tree (``git archive``, no work tree of ours is touched) and
runs its controller with this venv's interpreter and ``PYTHONPATH`` pointing at its
sources, so both versions are measured in the same run, interleaved, on the same lab.
"""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import tarfile
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from bench.common import EBPFDIAG, PYTHON, ROOT


@dataclass(frozen=True)
class Build:
    """A controller to run: its label in tables, its argv prefix and extra environment."""

    label: str
    argv: tuple[str, ...]
    env: dict[str, str] = field(default_factory=dict)

    def environ(self) -> dict[str, str] | None:
        return {**os.environ, **self.env} if self.env else None


CURRENT = Build("this tree", (EBPFDIAG,))


@contextlib.contextmanager
def checkout(rev: str) -> Iterator[Build]:
    """REV's sources in a temporary folder, removed afterwards."""
    try:
        full = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--verify", f"{rev}^{{commit}}"],
            capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except subprocess.CalledProcessError:
        raise SystemExit(f"bench: --against {rev}: not a commit of this repository") from None
    with tempfile.TemporaryDirectory(prefix="ebpfdiag-baseline-") as tmp:
        archive = subprocess.run(
            ["git", "-C", str(ROOT), "archive", "--format=tar", full, "src", "scripts"],
            capture_output=True, check=True,
        ).stdout  # fmt: skip
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            # our own commit's files; the "data" filter where this Python has it (3.11.4+)
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp, **safe)
        src = Path(tmp) / "src"
        yield Build(f"{rev} ({full[:10]})", (PYTHON, "-m", "ebpfdiag"), {"PYTHONPATH": str(src)})
