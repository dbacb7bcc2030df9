"""``make bench --against REV``: an earlier commit's controller runs beside this tree's."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bench import builds
from bench.common import PYTHON, ROOT
from tests.conftest import require


def test_an_earlier_commit_runs_from_its_own_sources():
    require(Path(PYTHON).exists(), "needs the project's .venv (make setup)")
    require((ROOT / ".git").exists(), "needs a git checkout")
    first = subprocess.run(
        ["git", "-C", str(ROOT), "rev-list", "--max-parents=0", "HEAD"],
        capture_output=True, text=True, check=True,
    ).stdout.split()[0]  # fmt: skip
    with builds.checkout(first) as build:
        src = Path(build.env["PYTHONPATH"])
        assert (src / "ebpfdiag" / "__init__.py").is_file()
        out = subprocess.run(
            [build.argv[0], "-c", "import ebpfdiag; print(ebpfdiag.__file__)"],
            env=build.environ(), capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
        assert out.startswith(str(src)), out
    assert not src.exists()


def test_an_unknown_revision_is_one_line():
    require((ROOT / ".git").exists(), "needs a git checkout")
    with pytest.raises(SystemExit, match="--against no-such-rev: not a commit"):
        builds.checkout("no-such-rev").__enter__()
