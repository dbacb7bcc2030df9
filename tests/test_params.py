"""Parameter schemas: one set of rules for the tool, the CLI and the docs."""

from __future__ import annotations

import pytest

from ebpfdiag.errors import UsageError
from ebpfdiag.remote.schema import load_params, params_module, tool_argv

P = params_module()
SCHEMA = [
    {"name": "port", "type": "port", "multiple": True, "help": "ports"},
    {"name": "addr", "type": "addr", "multiple": True, "help": "addresses"},
    {"name": "interfaces", "type": "ifname", "multiple": True, "help": "interfaces"},
    {"name": "history", "type": "int", "min": 0, "max": 8, "default": 4, "help": "history"},
    {"name": "duration", "type": "duration", "min": 0, "default": 0, "help": "how long"},
    {"name": "tc-mode", "type": "choice", "choices": ["auto", "tcx"], "default": "auto"},
    {"name": "all-flows", "type": "flag", "help": "all"},
    {"name": "ebpf", "type": "flag", "hidden": True, "local": True},
]


def test_parse_normalises_lists_and_converts_values():
    argv = ["--port", "80,443", "--port", "80", "--addr", "::1,198.18.0.1",
            "--history", "2", "--duration", "1.5m", "--all-flows"]  # fmt: skip
    args = P.parse(SCHEMA, argv, "t")
    assert args.port == [80, 443]
    assert args.addr == ["198.18.0.1", "::1"]
    assert args.history == 2 and args.duration == 90.0 and args.all_flows
    assert args.tc_mode == "auto" and args.ebpf is False and args.interfaces == []


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--port", "0"], "--port: '0' is not a port number (1-65535)"),
        (["--port", "80,http"], "--port: 'http' is not a port number"),
        (["--addr", "300.1.1.1"], "--addr: '300.1.1.1' is not an IPv4 or IPv6 address"),
        (["--history", "9"], "--history: 9 is out of range (0-8)"),
        (["--history", "x"], "'x' is not a whole number"),
        (["--duration", "-1"], "is not a duration"),
        (["--tc-mode", "bogus"], "'bogus' is not one of auto, tcx"),
        (["--interfaces", "eth0;rm"], "'eth0;rm' is not an interface name"),
        (["--nope"], "unrecognized arguments: --nope"),
    ],
)
def test_bad_values_are_one_line_naming_the_option(argv, message):
    with pytest.raises(P.ParamError) as err:
        P.parse(SCHEMA, argv, "t")
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_to_argv_refuses_what_the_tool_would_refuse_and_round_trips():
    argv = P.to_argv(SCHEMA, {"port": ["443,80"], "history": 3, "all-flows": True, "addr": []})
    assert argv == ["--port", "80", "--port", "443", "--history", "3", "--all-flows"]
    assert P.parse(SCHEMA, argv, "t").port == [80, 443]
    with pytest.raises(P.ParamError, match="--history: 12 is out of range"):
        P.to_argv(SCHEMA, {"history": 12})
    with pytest.raises(P.ParamError, match="only for local use"):
        P.to_argv(SCHEMA, {"ebpf": True}, allow_local=False)
    with pytest.raises(P.ParamError, match="not a parameter"):
        P.to_argv(SCHEMA, {"colour": "red"})


def test_help_lines_leave_hidden_parameters_out():
    lines = P.help_lines(SCHEMA)
    assert any(line.strip().startswith("--port PORT") for line in lines)
    assert not any("--ebpf" in line for line in lines)


@pytest.mark.parametrize(
    "bad",
    [
        [{"name": "x", "type": "colour"}],
        [{"name": "x", "type": "int"}, {"name": "x", "type": "int"}],
        [{"name": "x", "type": "choice"}],
        [{"name": "x", "type": "int", "dfault": 1}],
        [{"name": "X", "type": "int"}],
    ],
)
def test_malformed_schemas_are_caught(bad):
    with pytest.raises(ValueError):
        P.check_schema(bad)


def test_controller_reads_the_literal_without_running_the_tool(tmp_path):
    tool = tmp_path / "t.py"
    tool.write_text(
        "raise SystemExit('must not run')\n"
        "PARAMS = [{'name': 'port', 'type': 'port', 'multiple': True}]\n"
    )
    assert load_params(tool)[0]["name"] == "port"
    assert tool_argv(tool, {"port": ["8080"]}) == ("--port", "8080")
    with pytest.raises(UsageError, match="--port: '99999' is not a port number"):
        tool_argv(tool, {"port": ["99999"]})
