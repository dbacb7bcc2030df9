"""What runs on the hosts must run on their python3, which may be as old as 3.6.

vermin reads the source and reports the lowest Python version each construct needs; the
controller's own tests run on 3.10+, so nothing else would notice a newer construct in a
remote script until a host refused it.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require

ROOT = Path(__file__).resolve().parent.parent
FLOOR = "3.6"
REMOTE = sorted((ROOT / "scripts" / "bpf").glob("**/*.py")) + [
    ROOT / "src" / "ebpfdiag" / "remote" / "bootstrap.py"
]


def vermin(*paths: Path) -> subprocess.CompletedProcess:
    """vermin with the floor as its target: exit status 0 only when every file meets it."""
    require(importlib.util.find_spec("vermin") is not None, "needs vermin (the test extra)")
    run = "import sys, vermin; sys.argv[0] = 'vermin'; sys.exit(vermin.main())"
    cmd = [sys.executable, "-c", run, "--no-tips", "--violations", f"--target={FLOOR}-"]
    cmd += ["--feature", "fstring-self-doc", "--eval-annotations", *map(str, paths)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def test_remote_code_runs_on_the_oldest_host_python():
    assert len(REMOTE) >= 4 and all(p.exists() for p in REMOTE)
    assert any(p.parent.name == "core" for p in REMOTE)
    proc = vermin(*REMOTE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Target versions not met" not in proc.stdout


@pytest.mark.parametrize(
    "source, needs",
    [
        ('x = 1\nprint(f"{x=}")\n', "3.8"),
        ("merged = {} | {1: 2}\n", "3.9"),
        ("import subprocess\nsubprocess.run(['true'], capture_output=True)\n", "3.7"),
    ],
)
def test_a_newer_construct_fails_the_check(tmp_path, source, needs):
    """The check is live: each of these in a remote script would fail it."""
    script = tmp_path / "remote.py"
    script.write_text(source)
    proc = vermin(script)
    assert proc.returncode != 0
    assert f"Minimum required versions: {needs}" in proc.stdout, proc.stdout
