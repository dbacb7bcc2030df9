"""The controller's side of the runner (no hosts): which launch a host gets, what a runner
is sent, what is refused before anything runs, how the run is recorded."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import stat
import subprocess
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from ebpfdiag import audit
from ebpfdiag.catalog import script_path
from ebpfdiag.cli.options import audit_log_option
from ebpfdiag.errors import UsageError
from ebpfdiag.inventory import Host
from ebpfdiag.remote.bundle import bundle
from ebpfdiag.transport import (
    CHOOSE_SUDO,
    RUNNER,
    HostFailure,
    RemoteRun,
    RunOutcome,
    Script,
    SSHOptions,
    _launch_failure,
    remote_command,
)

SHIPPED = ("doctor", "drop", "netmetrics", "tcp_latency", "tcp_rst")


def shipped(name: str, args: tuple[str, ...] = ()) -> Script:
    return Script.from_path(script_path(name), args)


class Channel:
    """What a RemoteRun writes to the script's channel, and whether it closed it."""

    def __init__(self):
        self.data = b""
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def close(self) -> None:
        self.closed = True


def remote_run(script: Script, name: str = "lb") -> tuple[RemoteRun, list]:
    lines: list = []
    run = RemoteRun(
        Host(name=name, address="198.18.0.1", user="diag"),
        script,
        SSHOptions(),
        on_lines=lambda stream, batch: lines.append((stream, batch)),
        on_running=lambda: None,
        on_clock=lambda sample: None,
    )
    run.chan = Channel()
    return run, lines


# -- what a script is ---------------------------------------------------------------


@pytest.mark.parametrize("name", SHIPPED)
def test_a_shipped_tool_is_known_by_its_bytes(name):
    assert shipped(name).catalog_tool == name
    # run-script NAME pushes the checked bundle: the same bytes, so the same tool
    assert Script(f"{name}.py", bundle(script_path(name)).encode()).catalog_tool == name


def test_anything_else_is_arbitrary_code(tmp_path):
    source = bundle(script_path("tcp_rst")).encode()
    assert Script("tcp_rst.py", source + b"\nimport os\n").catalog_tool is None  # changed copy
    assert Script("probe.py", source).catalog_tool is None  # not named as the tool
    assert Script("probe.py", b"print(1)\n").catalog_tool is None
    assert Script("../tcp_rst.py", source).catalog_tool is None
    assert Script("nosuch.py", b"").catalog_tool is None


def test_the_request_names_the_tool_and_carries_no_code():
    script = shipped("tcp_rst", ("--port", "8080"))
    line = script.request("diag")
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    tag, body = line.decode().rstrip("\n").split(" ", 1)
    assert tag == "EBPFDIAG-RUN1"
    assert json.loads(body) == {
        "tool": "tcp_rst",
        "sha256": script.digest,
        "args": ["--port", "8080"],
        "ssh_user": "diag",
    }
    assert script.digest == hashlib.sha256(script.source).hexdigest()
    assert len(line) < 200  # the tool's code is never in it


# -- the launch command -------------------------------------------------------------


def test_sudo_launch_chooses_on_the_host():
    host = Host(name="h", address="198.18.0.1", user="alice")
    argv = shlex.split(remote_command(host, Script("x.py", b"", ("-a",)), True, False))
    assert argv[:4] == ["sh", "-c", CHOOSE_SUDO, "ebpfdiag"]
    assert argv[4:6] == ["python3", "-c"] and argv[-1] == "-a"
    assert f"exec sudo -n -- {RUNNER};" in CHOOSE_SUDO


def test_password_and_root_launches_are_unchanged():
    host = Host(name="h", address="198.18.0.1", user="alice")
    with_password = shlex.split(remote_command(host, Script("x.py", b""), True, True))
    assert with_password[:5] == ["sudo", "-S", "-p", "\x1eebpfdiag:sudo-prompt\n", "--"]
    assert with_password[5] == "python3"
    plain = shlex.split(remote_command(host, Script("x.py", b""), False, False))
    assert plain[:2] == ["python3", "-c"]


FAKE_SUDO = """#!/bin/sh
printf '%s %s %s %s\\n' "$1" "$2" "$3" "$4" >> "$SUDO_LOG"
if [ "$1 $2" = "-n -l" ]; then
    shift 3
    case "$1" in
        python3) [ "$ALLOW" = python ] || [ "$ALLOW" = both ] ;;
        */runner) [ "$ALLOW" = runner ] || [ "$ALLOW" = both ] ;;
        *) false ;;
    esac
    exit $?
fi
shift 2
case "$ALLOW $1" in
    "python python3"|"both python3"|"both "*/runner|"runner "*/runner) echo "ran $1" ;;
    *) echo "sudo: a password is required" >&2; exit 1 ;;
esac
"""


@pytest.mark.parametrize(
    ("allow", "installed", "ran", "asked"),
    [
        ("python", True, "ran python3", 1),  # full sudo: one question, then python
        ("both", True, "ran python3", 1),  # full sudo wins over the runner
        ("runner", True, "ran RUNNER", 2),  # runner only: no code on the command line runs
        ("none", True, "", 2),  # neither: the plain launch, so sudo says why
        ("runner", False, "", 0),  # no runner on the host: no question at all
        ("python", False, "ran python3", 0),
    ],
)
def test_the_prelude_picks_full_sudo_then_the_runner(tmp_path, allow, installed, ran, asked):
    sudo = tmp_path / "sudo"
    sudo.write_text(FAKE_SUDO)
    sudo.chmod(sudo.stat().st_mode | stat.S_IXUSR)
    runner = tmp_path / "lib" / "runner"  # stands for RUNNER, whose directory is not here
    if installed:
        runner.parent.mkdir()
        runner.touch()
    log = tmp_path / "sudo.log"
    host = Host(name="h", address="198.18.0.1", user="alice")
    command = remote_command(host, Script("x.py", b""), True, False).replace(RUNNER, str(runner))
    env = {**os.environ, "PATH": f"{tmp_path}:/usr/bin:/bin", "ALLOW": allow, "SUDO_LOG": str(log)}
    proc = subprocess.run(["sh", "-c", command], capture_output=True, text=True, env=env)
    assert proc.stdout.strip() == ran.replace("RUNNER", str(runner))
    calls = log.read_text().splitlines()
    assert sum(c.startswith("-n -l --") for c in calls) == asked
    assert len(calls) == asked + 1  # then exactly one exec
    if not ran:
        assert proc.returncode == 1 and "password is required" in proc.stderr


# -- the conversation ---------------------------------------------------------------


def test_arbitrary_code_is_refused_at_want_request_and_nothing_is_sent():
    run, _ = remote_run(Script("probe.py", b"import os; os.system('sh')\n"))
    run._on_stderr([b"\x1eebpfdiag:want-request 3.11.2 0.9.0 doctor,drop,tcp_rst"])
    assert isinstance(run.failure, HostFailure) and run.failure.kind == "runner"
    assert str(run.failure) == "runner only on lb: allows doctor, drop, tcp_rst"
    assert run.chan.closed and run.chan.data == b"" and run.launched is None
    assert run.via == "runner"


def test_a_shipped_tool_is_requested_by_name():
    script = shipped("drop", ("--port", "80"))
    run, _ = remote_run(script)
    run.ssh_user = "diag"
    run._on_stderr([b"\x1eebpfdiag:want-request 3.11.2 0.9.0 doctor,drop,tcp_rst"])
    assert run.failure is None and run.chan.data == script.request("diag") == run.launched
    assert run.via == "runner"


def test_the_bootstrap_still_gets_the_script():
    script = Script("probe.py", b"print(1)\n")
    run, _ = remote_run(script)
    run._on_stderr([b"\x1eebpfdiag:want-script 3.11.2"])
    assert run.chan.data == script.frame() == run.launched


def test_a_refusal_is_a_runner_failure_with_the_runners_line():
    run, _ = remote_run(shipped("tcp_rst"))
    why = "tool tcp_rst: controller expects sha256 ab12..., runner has cd34..."
    run._on_stderr([f"\x1eebpfdiag:error refused {why}".encode()])
    assert run.failure.kind == "runner"
    assert str(run.failure) == f"the runner on lb refused: {why}"


def test_the_hello_says_how_the_tool_ran():
    run, lines = remote_run(shipped("tcp_rst"))
    run.via = "runner"
    run._on_stdout([b'{"type":"hello","script":"tcp_rst"}', b'{"type":"hello"}'])
    run._on_stdout([b'{"type":"hello"}'])
    first = [json.loads(line) for _, batch in lines for line in batch]
    assert first[0] == {"type": "hello", "via": "runner", "script": "tcp_rst"}
    assert first[1:] == [{"type": "hello"}, {"type": "hello"}]  # only the first line
    other, lines = remote_run(Script("probe.py", b""))
    other.via = "sudo"
    other._on_stdout([b"not json", b'{"type":"hello"}'])
    assert lines == [("stdout", [b"not json", b'{"type":"hello"}'])]


def test_neither_sudo_nor_runner_says_so():
    host = Host(name="server", address="198.18.0.1", user="bob")
    denied = ["Sorry, user bob is not allowed to execute '/usr/bin/python3 -c ...' as root"]
    assert str(_launch_failure(host, 1, denied, chose=True)) == (
        "bob may sudo neither python3 nor the ebpfdiag runner on server"
    )
    assert str(_launch_failure(host, 1, denied)) == "bob may not sudo on server"
    password = _launch_failure(host, 1, ["sudo: a password is required"], chose=True)
    assert password.kind == "sudo" and "install the ebpfdiag runner" in str(password)


# -- audit --------------------------------------------------------------------------


@pytest.fixture
def audit_path(tmp_path, monkeypatch):
    monkeypatch.setattr(audit, "_configured", audit._UNSET)
    path = tmp_path / "audit.ndjson"
    monkeypatch.setenv(audit.ENV, str(path))
    return path


def test_audit_records_one_line_per_host_run(audit_path):
    script = shipped("tcp_rst", ("--port", "8080"))
    run, _ = remote_run(script)
    run.via, run.ssh_user = "runner", "diag"
    audit.write(audit.host_run(run, 1_795_000_000_000_000_000, RunOutcome(0, None, True), None))
    failed, _ = remote_run(Script("probe.py", b"x"), name="server")
    failure = HostFailure("runner", "runner only on server: allows doctor")
    audit.write(audit.host_run(failed, 1_795_000_000_000_000_000, None, failure))
    first, second = [json.loads(line) for line in audit_path.read_text().splitlines()]
    assert first["type"] == "run" and first["start"] == "2026-11-18T11:06:40.000Z"
    assert first["controller_user"] == audit.controller_user()
    assert {k: first[k] for k in ("host", "ssh_user", "via", "tool", "sha256", "args")} == {
        "host": "lb",
        "ssh_user": "diag",
        "via": "runner",
        "tool": "tcp_rst",
        "sha256": script.digest,
        "args": ["--port", "8080"],
    }
    assert (first["exit_code"], first["stopped"], first["error_kind"]) == (0, True, None)
    assert second["tool"] is None and second["script"] == "probe.py"
    assert (second["error_kind"], second["error"]) == ("runner", str(failure))
    assert os.stat(audit_path).st_mode & 0o777 == 0o600


def test_audit_log_option_wins_over_the_environment_and_is_checked_first(audit_path, tmp_path):
    @click.command()
    @audit_log_option
    def cmd() -> None:
        click.echo(str(audit.destination()))

    runner = CliRunner()
    assert runner.invoke(cmd, []).output.strip() == str(audit_path)
    chosen = tmp_path / "chosen.log"
    assert runner.invoke(cmd, ["--audit-log", str(chosen)]).output.strip() == str(chosen)
    result = runner.invoke(cmd, ["--audit-log", str(tmp_path / "no" / "dir.log")])
    assert isinstance(result.exception, UsageError)
    assert "cannot write" in str(result.exception)
    assert "--audit-log FILE" in runner.invoke(cmd, ["--help"]).output


def test_no_audit_without_option_or_environment(monkeypatch):
    monkeypatch.setattr(audit, "_configured", audit._UNSET)
    monkeypatch.delenv(audit.ENV, raising=False)
    assert audit.destination() is None
    assert Path(os.devnull).exists()  # nothing written anywhere: write() returns at once
    audit.write({"type": "run"})
