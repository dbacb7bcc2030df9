"""User mistakes get one line and exit 2, before any host is contacted."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def cli(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ebpfdiag", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
    )


@pytest.fixture
def inv(tmp_path):
    path = tmp_path / "inventory.yaml"
    path.write_text(
        "defaults: {user: ops}\n"
        "hosts:\n"
        "  web01: {address: 198.18.200.1}\n"
        "  web02: {address: 198.18.200.2}\n"
        "groups:\n"
        "  web: [web01, web02]\n"
    )
    return path


@pytest.fixture
def probe(tmp_path):
    path = tmp_path / "probe.py"
    path.write_text("print('hi')\n")
    return path


def assert_one_line_usage_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("ebpfdiag: ")
    assert "Traceback" not in r.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    assert r.stdout == ""


def test_unknown_host_suggests_close_names(inv, probe):
    r = cli("run-script", str(probe), "-i", str(inv), "--hosts", "wbe01")
    assert_one_line_usage_error(r, "wbe01", "web01")


def test_malformed_inventory_names_file_and_line(tmp_path, probe):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts:\n  web01: {address: 198.18.200.1}\n  web02: [unclosed\n")
    r = cli("run-script", str(probe), "-i", str(bad), "--hosts", "web01")
    assert_one_line_usage_error(r, str(bad))


def test_unknown_inventory_key_is_refused(tmp_path, probe):
    bad = tmp_path / "bad.yaml"
    bad.write_text("hosts:\n  web01: {address: 198.18.200.1, prot: 22}\n")
    r = cli("hosts", "-i", str(bad), "--hosts", "web01")
    assert_one_line_usage_error(r, f"{bad}:2", "prot")


def test_missing_inventory_file(tmp_path, probe):
    r = cli("hosts", "-i", str(tmp_path / "nope.yaml"), "--hosts", "web01")
    assert_one_line_usage_error(r, "nope.yaml")


def test_bad_range_and_empty_selection(inv):
    assert_one_line_usage_error(cli("hosts", "-i", str(inv), "--hosts", "web[05-01"), "unbalanced")
    assert_one_line_usage_error(
        cli("hosts", "-i", str(inv), "--hosts", "web[05-01]"), "05 is after 01"
    )
    assert_one_line_usage_error(cli("hosts", "-i", str(inv), "--hosts", "web,!web"), "no hosts")


def test_bad_script_and_duration(inv, tmp_path, probe):
    broken = tmp_path / "broken.py"
    broken.write_text("def f(:\n")
    assert_one_line_usage_error(
        cli("run-script", str(broken), "-i", str(inv), "--hosts", "web"), "broken.py:1"
    )
    assert_one_line_usage_error(
        cli("run-script", str(tmp_path / "none.py"), "-i", str(inv), "--hosts", "web"), "none.py"
    )
    assert_one_line_usage_error(
        cli("run-script", str(probe), "-i", str(inv), "--hosts", "web", "--duration", "soon"),
        "soon",
    )


def test_missing_option_is_one_line(probe):
    assert_one_line_usage_error(cli("run-script", str(probe)), "--hosts")


def test_hosts_json_resolves_without_connecting(inv):
    r = cli("hosts", "-i", str(inv), "--hosts", "web,!web02,root@198.18.200.9:2222", "--json")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in r.stdout.splitlines()]
    assert [x["host"] for x in recs] == ["web01", "root@198.18.200.9:2222"]
    assert all(x["type"] == "host" for x in recs)
    assert recs[1]["port"] == 2222 and recs[1]["user"] == "root"


def test_hosts_table_is_aligned_plain_text(inv):
    r = cli("hosts", "-i", str(inv), "--hosts", "web,root@198.18.200.9:2222")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["host", "address", "port", "user", "sudo", "python", "groups"]
    assert [line.split()[:4] for line in lines[1:]] == [
        ["web01", "198.18.200.1", "22", "ops"],
        ["web02", "198.18.200.2", "22", "ops"],
        ["root@198.18.200.9:2222", "198.18.200.9", "2222", "root"],
    ]
    column = lines[0].index("address")
    assert all(line[column:].startswith("198.18.200.") for line in lines[1:]), r.stdout
    assert "\x1b" not in r.stdout


def test_inventory_found_through_environment(inv, tmp_path):
    import os

    env = {**os.environ, "EBPFDIAG_INVENTORY": str(inv)}
    r = cli("hosts", "--hosts", "web", "--json", cwd=tmp_path, env=env)
    assert r.returncode == 0, r.stderr
    assert len(r.stdout.splitlines()) == 2


def test_help_shows_examples():
    for cmd in ("run-script", "doctor", "hosts"):
        r = cli(cmd, "--help")
        assert r.returncode == 0 and "Examples:" in r.stdout


def test_shipped_scripts_are_found_by_name():
    from ebpfdiag.catalog import list_scripts, resolve_script

    names = {s.name for s in list_scripts()}
    assert "doctor" in names
    assert resolve_script("doctor").name == "doctor.py"
    doctor = next(s for s in list_scripts() if s.name == "doctor")
    assert ("--no-compile", "skip the test compile (saves about 0.5 s of CPU)") in doctor.parameters
    assert any(f[0] == "check.ok" and f[1] == "bool" for f in doctor.fields)


def test_wheel_ships_the_scripts(tmp_path):
    """An installed ebpfdiag finds its remote scripts without the source tree."""
    import zipfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(root)],
        check=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("ebpfdiag-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {p.name for p in (root / "scripts" / "bpf").glob("*.py")}
    assert {f"ebpfdiag/scripts/bpf/{n}" for n in shipped} <= set(names)
    assert "ebpfdiag/remote/bootstrap.py" in names
    assert not [n for n in names if n.endswith("/fleet.py")]  # the test fleet is not the product


def test_trace_rejects_bad_filters_before_connecting(inv):
    assert_one_line_usage_error(
        cli("trace", "tcp-rst", "-i", str(inv), "--hosts", "web", "--port", "99999"), "99999"
    )
    assert_one_line_usage_error(
        cli("trace", "tcp-rst", "-i", str(inv), "--hosts", "web", "--addr", "foo"), "foo"
    )
    assert_one_line_usage_error(
        cli("trace", "tcp-rst", "-i", str(inv), "--hosts", "web", "--count", "0"), "--count"
    )


def test_version_and_hosts_load_no_ssh_rich_or_correlation(inv):
    """Start-up cost: these commands must not import what only host runs need."""
    engine = ("asyncssh", "ebpfdiag.questions.rst", "ebpfdiag.fanout")
    rich = ("rich.console", "rich.table")
    hosts = ["hosts", "-i", str(inv), "--hosts", "web"]
    for args, heavy in (
        (["--version"], engine + rich),
        ([*hosts, "--json"], engine + rich),
        (hosts, engine + rich),  # a plain-text table
    ):
        code = (
            "import sys\n"
            "from ebpfdiag.cli.app import main\n"
            "try:\n"
            f"    main({args!r})\n"
            "except SystemExit as exc:\n"
            "    assert exc.code == 0, exc.code\n"
            f"print([m for m in {heavy!r} if m in sys.modules], file=sys.stderr)\n"
        )
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        assert r.stderr.strip() == "[]", (args, r.stderr)
        assert r.stdout


def test_fanout_default_is_the_engines():
    from ebpfdiag.cli.app import DEFAULT_FANOUT
    from ebpfdiag.fanout import DEFAULT_FANOUT as ENGINE_DEFAULT

    assert DEFAULT_FANOUT == ENGINE_DEFAULT


def test_unwritable_output_is_refused_before_anything_else(inv, tmp_path):
    # --ask-sudo-pass without a terminal would fail next: the output check must come first.
    base = ["trace", "tcp-rst", "-i", str(inv), "--hosts", "web", "--ask-sudo-pass"]
    missing = tmp_path / "no-such-dir" / "rst.json"
    assert_one_line_usage_error(cli(*base, "--output", str(missing)), str(missing))
    assert_one_line_usage_error(cli(*base, "--output", str(tmp_path)), str(tmp_path))
    kept = tmp_path / "kept.json"
    r = cli(*base, "--output", str(kept))
    assert_one_line_usage_error(r, "--ask-sudo-pass")
    assert not kept.exists()


def test_failed_hosts_is_a_list_in_run_script_summary():
    from ebpfdiag.cli.app import summary_record
    from ebpfdiag.fanout import HostResult

    results = [HostResult("h1", "ok"), HostResult("h2", "failed"), HostResult("h3", "timeout")]
    summary = summary_record(results, False, 1.0)
    assert summary["failed_hosts"] == ["h2", "h3"] and summary["failed"] == 2


def test_show_help_and_root_help_list_every_command():
    r = cli("--help")
    assert r.returncode == 0
    for name in ("hosts", "run-script", "doctor", "trace", "show", "lab"):
        assert f"  {name} " in r.stdout
    assert "Examples:" in cli("show", "--help").stdout


def test_the_trace_path_to_ready_loads_no_correlation_or_renderer():
    """What ``trace`` imports before the hosts are contacted: correlation and the timeline
    renderer (and rich) come later, at the first event or the end."""
    code = (
        "import sys\n"
        "import ebpfdiag.cli.trace, ebpfdiag.tracing, ebpfdiag.fanout, ebpfdiag.transport\n"
        "late = ('ebpfdiag.questions.rst', 'ebpfdiag.render.timeline', 'rich.console')\n"
        "print([m for m in late if m in sys.modules])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


@pytest.mark.parametrize("command", ["tcp-rst", "drop", "latency"])
def test_no_trace_command_loads_its_question_or_renderer_before_the_run(inv, command):
    """Up to the run (hosts contacted, waiting for ready), a trace command has loaded
    neither its correlation nor its renderers: they come at the first event or the end."""
    code = (
        "import os, sys\n"
        "from ebpfdiag.cli.app import App, main\n"
        "late = ('ebpfdiag.questions.rst', 'ebpfdiag.questions.drop',\n"
        "        'ebpfdiag.questions.latency', 'ebpfdiag.render.timeline',\n"
        "        'ebpfdiag.render.drop', 'ebpfdiag.render.latency')\n"
        "def run(self, engine):\n"
        "    print([m for m in late if m in sys.modules], flush=True)\n"
        "    os._exit(0)\n"
        "App.run = run\n"
        f"main(['trace', {command!r}, '-i', {str(inv)!r}, '--hosts', 'web01', '--json'])\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]", r.stdout


def test_each_host_is_announced_ready_as_it_comes_whatever_the_tool():
    """The per-host ready callback is driven by any tool's ``ready`` record: the first
    host is announced before the others are ready and before tracing starts."""
    from ebpfdiag.render.terminal import ready_line
    from ebpfdiag.tracing import TraceSession

    calls: list[tuple] = []
    session = TraceSession(
        ["a", "b"],
        on_host_ready=lambda host, after, hello: calls.append(("host", host, after, hello)),
        on_ready=lambda ready, failed: calls.append(("tracing", ready)),
        launched=0.0,
    )
    hello = {"type": "hello", "script": "some_tool", "attach": {"x": {"kind": "tracepoint"}}}
    session.lines("a", "stdout", [json.dumps(hello).encode(), b'{"type":"ready"}'])
    assert [c[:2] for c in calls] == [("host", "a")]
    assert calls[0][2] > 0 and calls[0][3] == hello
    assert session.hosts["a"].ready_after_s == calls[0][2]
    session.lines("b", "stdout", [b'{"type":"ready"}', b'{"type":"ready"}'])
    assert [c[:2] for c in calls] == [("host", "a"), ("host", "b"), ("tracing", ["a", "b"])]
    assert ready_line("a", 0.8449, hello) == "a ready in 0.84 s (1 probe)"
    tc = {"attach": {"tc": {"kind": "tcx-link", "interfaces": ["eth0", "mgmt0"]},
                     "tcp_send_reset": {"kind": "tracepoint"}},
          "missing": [{"probe": "p", "why": "w"}]}  # fmt: skip
    assert ready_line("lb", 1.2, tc) == "lb ready in 1.20 s (tcx, 2 interfaces, 1 probe, 1 missing)"


def test_the_ssh_engine_loads_without_running_gcc_or_ld(tmp_path):
    """Importing asyncssh (through the engine) must not spend start-up on compilers: its
    liboqs lookup is answered from the ldconfig cache, and find_library is left as it was."""
    marker = tmp_path / "ran"
    for tool in ("gcc", "cc", "ld"):
        fake = tmp_path / tool
        fake.write_text(f"#!/bin/sh\necho {tool} >> {marker}\nexit 1\n")
        fake.chmod(0o755)
    code = (
        "import ctypes.util\n"
        "standard = ctypes.util.find_library\n"
        "import ebpfdiag.fanout\n"
        "assert ctypes.util.find_library is standard\n"
        "print(ebpfdiag.fanout.asyncssh.__name__)\n"
    )
    env = {**__import__("os").environ, "PATH": f"{tmp_path}:/usr/bin:/bin"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "asyncssh"
    assert not marker.exists(), marker.read_text()
