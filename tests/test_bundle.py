"""Bundling: a tool and its core modules become one program that runs on its own."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from ebpfdiag.remote.bundle import BundleError, bundle

REMOTE_PYTHON = "/usr/bin/python3" if Path("/usr/bin/python3").exists() else sys.executable


def write_tool(tmp_path: Path, tool: str, **core: str) -> Path:
    (tmp_path / "core").mkdir(exist_ok=True)
    for name, text in core.items():
        (tmp_path / "core" / f"{name}.py").write_text(text)
    path = tmp_path / "tool.py"
    path.write_text(tool)
    return path


TOOL = '''#!/usr/bin/python3
"""tool: says hello.

Parameters:
  --name NAME  who to greet
"""

import sys

from core.greet import greeting
from core.shout import (
    loud,
)


def main():
    print(loud(greeting(sys.argv[1])))


if __name__ == "__main__":
    main()
'''

GREET = '''"""Greetings."""

import os

from core.shout import loud


def greeting(name):
    return "hello " + name + (loud("!") if os.sep else "")
'''

SHOUT = '''"""Shouting."""

import os


def loud(text):
    return text.upper()
'''


def run(program: str, *args: str) -> str:
    """Run a bundle as the host does, its text read from stdin (a whole tool is larger
    than one command-line argument may be)."""
    return subprocess.run(
        [REMOTE_PYTHON, "-", *args], input=program, capture_output=True, text=True, check=True
    ).stdout


def test_bundle_runs_alone_with_header_first_and_dependencies_before_users(tmp_path):
    tool = write_tool(tmp_path, TOOL, greet=GREET, shout=SHOUT)
    program = bundle(tool)
    assert program.startswith('#!/usr/bin/python3\n"""tool: says hello.')
    assert "from core" not in program
    assert program.index("# ---- core/shout.py") < program.index("# ---- core/greet.py")
    assert program.index("# ---- core/greet.py") < program.index("# ---- tool.py")
    assert run(program, "bob") == "HELLO BOB!\n"
    assert bundle(tool, check=False) == program  # the text-only path sees the same
    # the unbundled tool runs the same from its folder
    unbundled = subprocess.run(
        [REMOTE_PYTHON, str(tool), "bob"], capture_output=True, text=True, check=True
    )
    assert unbundled.stdout == "HELLO BOB!\n"


def test_a_tool_without_core_imports_is_sent_as_it_is(tmp_path):
    tool = tmp_path / "plain.py"
    tool.write_text("print('x')\n")
    assert bundle(tool) == "print('x')\n"
    # BCC's own tools start with __future__ imports: fine when nothing is bundled
    tool.write_text("from __future__ import print_function\nprint('x')\n")
    assert bundle(tool) == tool.read_text()


@pytest.mark.parametrize(
    "tool_text, core, message",
    [
        ("import core.shout\n", {"shout": SHOUT}, "use 'from core.NAME import"),
        ("from core import shout\n", {"shout": SHOUT}, "use 'from core.NAME import"),
        ("from core.nothere import x\n", {"shout": SHOUT}, "no core module 'nothere'"),
        ("from core.a import x\n", {"a": "from core.b import y\nx = 1\n",
                                     "b": "from core.a import x\ny = 2\n"}, "cycle"),
        ("from core.shout import loud\n\ndef loud():\n    pass\n", {"shout": SHOUT},
         "both define 'loud'"),
        ("from core.shout import loud\nos = 3\n", {"shout": SHOUT}, "both define 'os'"),
        ("from __future__ import annotations\nfrom core.shout import loud\n", {"shout": SHOUT},
         "__future__"),
        ("def f():\n    from core.shout import loud\nfrom core.shout import loud\n",
         {"shout": SHOUT}, "top level"),
    ],
)  # fmt: skip
def test_tools_that_cannot_be_bundled_are_refused_by_name(tmp_path, tool_text, core, message):
    tool = write_tool(tmp_path, tool_text, **core)
    with pytest.raises(BundleError, match=message):
        bundle(tool)


def test_same_stdlib_import_in_two_modules_is_fine(tmp_path):
    tool = write_tool(tmp_path, "import os\nfrom core.shout import loud\nprint(loud(os.sep))\n",
                      shout=SHOUT)  # fmt: skip
    assert run(bundle(tool)) == "/\n"


SHIPPED = sorted(p for p in (Path(__file__).parents[1] / "scripts" / "bpf").glob("*.py"))


@pytest.mark.parametrize("tool", SHIPPED, ids=lambda p: p.stem)
def test_every_shipped_tool_bundles_and_its_help_names_its_parameters(tool):
    from ebpfdiag.remote.schema import load_params, params_module

    program = bundle(tool)
    assert "from core" not in program
    # what a trace pushes (text only, no parse) is exactly the checked bundle
    assert bundle(tool, check=False) == program
    out = run(program, "--help")
    params = load_params(tool)
    assert params, f"{tool.name} declares no PARAMS"
    for line in params_module().help_lines(params):
        option = line.split()[0]
        assert option in out
        # the header the docs and the catalog read lists the same parameters
        assert option in tool.read_text().split('"""')[1]


def test_the_bundle_command_writes_the_pushed_program_for_review(tmp_path):
    from ebpfdiag.catalog import script_path

    out = tmp_path / "tcp_rst.bundle.py"
    r = subprocess.run([sys.executable, "-m", "ebpfdiag", "bundle", "tcp_rst", "-o", str(out)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    program = out.read_text()
    assert program == bundle(script_path("tcp_rst"))
    digest = hashlib.sha256(program.encode()).hexdigest()
    assert r.stderr.startswith(f"sha256 {digest}")
    assert (
        "--port PORT[,PORT]"
        in subprocess.run(
            [REMOTE_PYTHON, str(out), "--help"], capture_output=True, text=True, check=True
        ).stdout
    )
    nowhere = str(tmp_path / "no" / "such" / "dir")
    r = subprocess.run([sys.executable, "-m", "ebpfdiag", "bundle", "tcp_rst", "-o", nowhere],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--output" in r.stderr
