"""Engine pieces without outside parts: fd limit, live status rendering."""

from __future__ import annotations

import io
import subprocess
import sys

from rich.console import Console

from ebpfdiag.render.terminal import StatusView


def test_fd_limit_is_raised_for_large_fleets():
    code = (
        "import resource\n"
        "from ebpfdiag.fanout import fd_need, raise_fd_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))\n"
        "raise_fd_limit(500)\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE)[0], hard, fd_need(500, 500))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    soft, hard, need = (int(x) for x in out.stdout.split())
    assert soft == min(need, hard) and soft > 64


def test_live_status_shows_a_line_per_host_and_the_counts():
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=True, width=80, height=40)
    view = StatusView(["web01", "web02", "lb"], console)
    view.set("web01", "running")
    view.set("web02", "failed")
    view.set("lb", "connecting")
    rendered = Console(file=io.StringIO(), width=80)
    rendered.print(view._render())
    text = rendered.file.getvalue()
    lines = [line.split() for line in text.splitlines()]
    assert lines[:3] == [["web01", "running"], ["web02", "failed"], ["lb", "connecting"]]
    assert " ".join(lines[3]) == "3 hosts 1 connecting, 1 failed, 1 running"


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_live_status_block_under_json():
    from ebpfdiag.cli.app import App

    drawn = {}
    for as_json in (False, True):
        err = _Terminal()
        app = App(stdout=_Terminal(), stderr=err)
        app.as_json = as_json
        with app.status_view(["web01", "web02"]) as status:
            status.set("web01", "running")
        drawn[as_json] = err.getvalue()
    assert "web01" in drawn[False]
    assert drawn[True] == ""
