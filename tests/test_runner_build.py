"""The runner program and its catalog as built on the controller; its checks as functions.

The host side (sudo, sudoers, audit, syslog, real runs) is in test_runner_host.py.
"""

from __future__ import annotations

import hashlib
import json
import types
from pathlib import Path

import pytest

from ebpfdiag.catalog import script_path
from ebpfdiag.remote import runner_build
from ebpfdiag.remote.bundle import bundle
from ebpfdiag.remote.runner_build import (
    RUNNER_TOOLS,
    admin_script,
    build_bootstrap,
    build_payload,
    build_runner,
    runner_functions,
)
from tests.conftest import require
from tests.test_remote_floor import vermin

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def payload():
    return build_payload()


@pytest.fixture(scope="module")
def runner():
    """The runner program's functions, loaded without its last line (the call of main)."""
    return types.SimpleNamespace(**runner_functions())


def test_bootstrap_text_is_the_file_the_controller_sends():
    from ebpfdiag.transport import bootstrap_source

    assert build_bootstrap() == bootstrap_source()
    assert build_bootstrap() == (ROOT / "src/ebpfdiag/remote/bootstrap.py").read_text()


def test_runner_is_bootstrap_params_and_runner_code_in_one_file(payload):
    text = payload.runner
    assert text.startswith("#!/usr/bin/python3 -IS\n")
    boot = build_bootstrap()
    # the bootstrap's lifecycle is in it verbatim, once; only the entry call is left out
    assert boot[: -len("main()\n")] in text and text.count("def _watch_stdin(") == 1
    assert (ROOT / "scripts/bpf/core/params.py").read_text() in text
    assert "from ebpfdiag" not in text and "from core." not in text
    assert f"RUNNER_VERSION = {payload.version!r}" in text
    compile(text, "runner", "exec")


def test_runner_and_admin_script_run_on_the_oldest_host_python(tmp_path, payload):
    (tmp_path / "runner.py").write_text(payload.runner)
    (tmp_path / "runner_admin.py").write_text(admin_script("install", payload, {}))
    proc = vermin(tmp_path / "runner.py", tmp_path / "runner_admin.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_two_parts_defining_one_name_are_refused(monkeypatch):
    real = runner_build._remote_text

    def clashing(name: str) -> str:
        text = real(name)
        return text + "\n\ndef convert(x):\n    return x\n" if name == "runner.py" else text

    monkeypatch.setattr(runner_build, "_remote_text", clashing)
    with pytest.raises(RuntimeError, match="core/params.py and runner.py both define 'convert'"):
        build_runner()


def test_catalog_holds_the_bundles_the_controller_pushes(payload):
    assert sorted(payload.catalog["tools"]) == sorted(RUNNER_TOOLS)
    for name, entry in payload.catalog["tools"].items():
        pushed = bundle(script_path(name), check=False)
        assert payload.tools[name] == pushed
        assert entry["sha256"] == hashlib.sha256(pushed.encode()).hexdigest()
        assert entry["file"] == f"tools/{name}.py"
        assert entry["long_running"] == (name == "netmetrics")
        assert entry["params"] and all("type" in p for p in entry["params"]) or name == "doctor"
    assert payload.release.startswith(payload.version + "-")


def test_admin_script_carries_the_payload_only_for_an_install(payload):
    import base64
    import zlib

    assert "PAYLOAD = None" in admin_script("status")
    text = admin_script("install", payload, {"max_runs_per_host": 1})
    blob = text.split('PAYLOAD = "', 1)[1].split('"', 1)[0]
    data = json.loads(zlib.decompress(base64.b64decode(blob)))
    assert data["runner"] == payload.runner and data["policy"] == {"max_runs_per_host": 1}
    assert data["release"] == payload.release


TCP_RST = build_payload().catalog["tools"]["tcp_rst"]["params"]


@pytest.mark.parametrize(
    "args, why",
    [
        (["--port", "80;sh"], "contains characters the runner refuses (';')"),
        (["--port", "80 81"], "contains characters the runner refuses (' ')"),
        (["--interfaces", "../../etc"], "contains characters the runner refuses ('/')"),
        (["--port", "0x50"], "is not a port number"),
        (["--count", "2147483648"], "is too large"),
        (["--duration", "inf"], "not a finite number"),
        (["--duration", "1e400"], "not a finite number"),
        (["--history", "-1"], "out of range"),
        (["--all-flows", "--all-flows"], "--all-flows: given twice"),
        (["--count", "1", "--count", "2"], "--count: given twice"),
        (["--ebpf"], "only for local use"),
        (["--format-dir", "d"], "only for local use"),
        (["-p", "80"], "'-p': not an option"),
        (["80"], "'80': not an option"),
        (["--port"] * 65, "65 arguments (at most 64)"),
    ],
)
def test_arguments_outside_the_schema_are_refused(runner, args, why):
    with pytest.raises(runner.Refused, match=_re(why)):
        runner.check_args(TCP_RST, args)


def _re(text: str) -> str:
    import re

    return re.escape(text)


def test_path_parameters_are_refused_even_when_not_local(runner):
    params = [{"name": "dir", "type": "path"}]
    with pytest.raises(runner.Refused, match="reads a file the caller names"):
        runner.check_args(params, ["--dir", "x"])


def test_arguments_inside_the_schema_pass_with_their_values(runner):
    values = runner.check_args(
        TCP_RST,
        ["--port", "80,443", "--port", "8080", "--addr", "198.18.0.1", "--interfaces", "eth0"]
        + ["--duration", "30", "--all-flows", "--tc-mode", "clsact", "--history", "8"],
    )
    assert values["port"] == [80, 443, 8080] and values["addr"] == ["198.18.0.1"]
    assert values["duration"] == 30.0 and values["all-flows"] is True


def test_duration_cap_refuses_longer_and_bounds_the_rest(runner):
    assert runner.duration_limit("tcp_rst", {"duration": 60.0}, 600, set()) == 600
    assert runner.duration_limit("doctor", {}, 600, set()) == 600
    assert runner.duration_limit("netmetrics", {}, 600, {"netmetrics"}) is None
    with pytest.raises(runner.Refused, match=r"--duration 20m over the policy's cap of 10m"):
        runner.duration_limit("tcp_rst", {"duration": 1200.0}, 600, set())


@pytest.mark.parametrize(
    "env, why",
    [
        ({"PYTHONPATH": "/tmp"}, "environment: PYTHONPATH is set"),
        ({"PYTHONWARNINGS": "x"}, "environment: PYTHONWARNINGS is set"),
        ({"LD_AUDIT": "x.so"}, "environment: LD_AUDIT is set"),
    ],
)
def test_interpreter_environment_is_checked(runner, env, why):
    isolated = types.SimpleNamespace(isolated=1, no_site=1, ignore_environment=1)
    runner.check_interpreter({"PATH": "/bin", "SUDO_UID": "1000"}, isolated)
    with pytest.raises(runner.Refused, match=why):
        runner.check_interpreter(env, isolated)
    plain = types.SimpleNamespace(isolated=0, no_site=0, ignore_environment=0)
    with pytest.raises(runner.Refused, match="not started isolated"):
        runner.check_interpreter({}, plain)


def test_tool_names_that_are_paths_or_unknown_are_refused(runner):
    allowed = {"doctor": 600, "tcp_rst": 600}
    runner.check_tool_name("doctor", allowed)
    for name in ("../x", "/usr/bin/id", ".", "..", "a/b"):
        with pytest.raises(runner.Refused, match="is a path, not a tool name"):
            runner.check_tool_name(name, allowed)
    for name in ("drop", "Doctor", "doctor.py", "x" * 100):
        with pytest.raises(runner.Refused, match=r"unknown tool .* \(allowed: doctor, tcp_rst\)"):
            runner.check_tool_name(name, allowed)


def test_policy_grants_the_union_of_the_users_groups(runner, payload):
    policy = runner.check_policy(
        {
            "max_runs_per_host": 2,
            "groups": {
                "net": {"tools": ["tcp_rst", "drop"], "max_duration_s": 60},
                "ops": {"tools": "*", "max_duration_s": 600},
                "web": {"tools": ["tcp_rst", "nosuch"], "max_duration_s": 900},
            },
        }
    )
    catalog = payload.catalog
    assert runner.allowed_tools(policy, catalog, 1000, ["net"]) == {"drop": 60, "tcp_rst": 60}
    both = runner.allowed_tools(policy, catalog, 1000, ["net", "web"])
    assert both == {"drop": 60, "tcp_rst": 900}
    assert sorted(runner.allowed_tools(policy, catalog, 0, [])) == sorted(RUNNER_TOOLS)
    assert runner.allowed_tools(policy, catalog, 1000, ["users"]) == {}
    bads = [
        {},
        {"groups": {}, "max_runs_per_host": 0},
        {"groups": {"g": {"tools": "x", "max_duration_s": 1}}, "max_runs_per_host": 1},
        {"groups": {"g": {"tools": "*", "max_duration_s": 0}}, "max_runs_per_host": 1},
    ]
    for bad in bads:
        with pytest.raises(runner.Refused, match="policy"):
            runner.check_policy(bad)


def test_status_judges_old_missing_and_current_runners():
    from ebpfdiag import __version__
    from ebpfdiag.cli.runner import judge

    hint = "ebpfdiag runner install --hosts H --group GROUP"
    old = judge({"action": "status", "installed": True, "version": "0.0.1"}, hint)
    assert old["current"] is False and old["update"] == (
        f"runner 0.0.1 is older than the controller ({__version__}): {hint}"
    )
    assert judge({"action": "status", "installed": False}, hint)["update"] == hint
    same = judge({"action": "status", "installed": True, "version": __version__}, hint)
    assert same["current"] is True and "update" not in same


def test_a_policy_file_is_checked_before_any_host_is_contacted(tmp_path, capsys):
    from ebpfdiag.cli.app import main

    bad = tmp_path / "policy.json"
    group = {"tools": ["sh"], "max_duration_s": 5}
    bad.write_text(json.dumps({"max_runs_per_host": 1, "groups": {"g": group}}))
    with pytest.raises(SystemExit) as exc:
        main(["runner", "install", "--hosts", "nohost", "--group", "g", "--policy", str(bad)])
    assert exc.value.code == 2
    assert "group g: 'tools' must be \"*\" or a list of doctor, drop" in capsys.readouterr().err


@pytest.mark.root
def test_a_slot_another_runner_is_only_looking_at_is_not_a_run():
    """A runner checking a slot's holder holds a shared lock for a moment: one taking a
    slot at that moment waits for it rather than refusing (max 1 run on the host here)."""
    import fcntl
    import os
    import shutil
    import threading
    import time

    require(os.geteuid() == 0, "slot files must be root-owned")
    scope = runner_functions()
    slots = f"/run/ebpfdiag-test-slots-{os.getpid()}"
    scope["SLOT_DIR"] = slots
    try:
        os.makedirs(slots, mode=0o700)
        probe = os.open(f"{slots}/slot-0", os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(probe, fcntl.LOCK_SH)  # another runner's _holder, mid-look
        threading.Timer(0.03, fcntl.flock, (probe, fcntl.LOCK_UN)).start()
        started = time.monotonic()
        fd = scope["take_slot"](1, 0, "doctor", False)
        assert time.monotonic() - started < 1.0
        os.close(fd)
        # a slot really held by a run is refused after the tries
        fcntl.flock(probe, fcntl.LOCK_EX)
        with pytest.raises(scope["Refused"], match=r"1 runs already on this host"):
            scope["take_slot"](1, 0, "doctor", False)
        os.close(probe)
    finally:
        shutil.rmtree(slots, ignore_errors=True)
