"""Folded run-script output and the fleet-sized live status block (pure, no hosts)."""

from __future__ import annotations

import asyncio
import io

import asyncssh
import pytest
from rich.console import Console

from ebpfdiag.cli.run_script import host_aliases
from ebpfdiag.fanout import HostResult
from ebpfdiag.hostexpr import expand, split_terms
from ebpfdiag.inventory import Host
from ebpfdiag.render.fold import (
    Block,
    OutputFolder,
    failure_line,
    fold_failures,
    normalise_error,
    render_block,
)
from ebpfdiag.render.terminal import FAILURES_SHOWN, SLOWEST_SHOWN, StatusView
from ebpfdiag.transport import _describe, _launch_failure


def names_of(nodeset: str) -> list[str]:
    return [name for term in split_terms(nodeset) for name in expand(term)]


def folded(outputs: dict[str, list[str]], order: list[str] | None = None) -> list[Block]:
    folder = OutputFolder(order or list(outputs))
    for host, lines in outputs.items():
        # in two batches, as the engine delivers them
        encoded = [line.encode() for line in lines]
        folder.add(host, "stdout", encoded[:1])
        folder.add(host, "stdout", encoded[1:])
    return folder.blocks("stdout")


def test_outputs_that_differ_by_one_line_are_two_blocks_largest_first():
    report = ["conns 12", "resets 0", "drops 0"]
    outputs = {f"web{i:03d}": report for i in range(1, 123) if i != 121}
    outputs["web121"] = ["conns 12", "resets 3", "drops 0"]
    outputs["lb1"] = ["conns 12", "resets 0"]  # a prefix of the common output is not equal
    blocks = folded(outputs)
    assert [(b.nodeset, b.lines) for b in blocks] == [
        ("web[001-120,122]", tuple(report)),
        ("web121", ("conns 12", "resets 3", "drops 0")),
        ("lb1", ("conns 12", "resets 0")),
    ]
    assert names_of(blocks[0].nodeset) == list(blocks[0].hosts)


def test_line_order_matters_and_ties_keep_run_order():
    blocks = folded({"b1": ["x", "y"], "a1": ["y", "x"], "a2": ["y", "x"], "b2": ["x", "y"]})
    assert [(b.nodeset, b.lines) for b in blocks] == [
        ("b[1-2]", ("x", "y")),
        ("a[1-2]", ("y", "x")),
    ]


def test_padding_mixed_prefixes_and_names_without_digits():
    same = ["ok"]
    hosts = ["web01", "web02", "web10", "web9", "db-a", "bastion", "rack1-n1", "rack2-n1"]
    hosts += ["10.1.0.7", "10.1.0.8"]
    block = folded(dict.fromkeys(hosts, same))[0]
    assert block.nodeset == "web[01-02,10],web9,db-a,bastion,rack[1-2]-n1,10.1.0.[7-8]"
    assert sorted(names_of(block.nodeset)) == sorted(hosts)


def test_equal_lines_are_stored_once():
    folder = OutputFolder(["h1", "h2"])
    folder.add("h1", "stdout", [b"same line " * 10])
    folder.add("h2", "stdout", [b"same line " * 10])
    assert folder._lines["stdout"]["h1"][0] is folder._lines["stdout"]["h2"][0]


def test_stderr_folds_apart_from_stdout_and_silent_hosts_are_named():
    folder = OutputFolder(["h1", "h2", "h3"])
    for host in ("h1", "h2"):
        folder.add(host, "stdout", [b"data"])
    folder.add("h1", "stderr", [b"warning: old kernel"])
    folder.add("h3", "stderr", [b"warning: old kernel"])
    assert [(b.nodeset, b.lines) for b in folder.blocks("stdout")] == [("h[1-2]", ("data",))]
    assert [(b.nodeset, b.lines) for b in folder.blocks("stderr")] == [
        ("h[1,3]", ("warning: old kernel",))
    ]
    assert folder.silent(["h1", "h2", "h3"]) == ["h3"]


def test_undecodable_bytes_do_not_break_folding():
    folder = OutputFolder(["h1", "h2"])
    folder.add("h1", "stdout", [b"\xff\xfe"])
    folder.add("h2", "stdout", [b"\xff\xfe"])
    assert folder.blocks("stdout") == [Block(("h1", "h2"), ("\ufffd\ufffd",))]


def test_block_rendering_is_clustershell_gathered_form():
    block = Block(("web01", "web02", "web03"), ("a", "b"))
    assert render_block(block) == ["-" * 15, "web[01-03] (3)", "-" * 15, "a", "b"]


def hosts(count: int, prefix: str = "web") -> list[Host]:
    return [Host(f"{prefix}{i:03d}", f"198.18.7.{i}") for i in range(1, count + 1)]


def test_sudo_failures_fold_by_cause_without_the_host_name():
    fleet = hosts(40)
    failures = [
        (h.name, str(_launch_failure(h, 1, ["sudo: a password is required"]))) for h in fleet[:37]
    ]
    failures += [
        (h.name, str(_launch_failure(h, 127, ["sudo: /nope: command not found"])))
        for h in fleet[37:39]
    ]
    failures.append((fleet[39].name, "script exited with 3"))
    aliases = {h.name: host_aliases(h) for h in fleet}
    lines = [failure_line(g) for g in fold_failures(failures, aliases)]
    assert lines == [
        "37 hosts: sudo needs a password; use --ask-sudo-pass or allow NOPASSWD for this "
        "user: web[001-037]",
        "2 hosts: python3 not found: web[038-039]",
        "1 host: script exited with 3: web040",
    ]


CONNECT_ERRORS = [
    ConnectionRefusedError(),
    TimeoutError(),
    OSError(113, "No route to host"),
    asyncssh.PermissionDenied("no"),
    asyncssh.HostKeyNotVerifiable("changed"),
    asyncssh.ProtocolError("bad packet"),
    asyncio.TimeoutError(),
]


@pytest.mark.parametrize("exc", CONNECT_ERRORS, ids=lambda e: type(e).__name__)
def test_every_connection_message_folds_across_hosts(exc, tmp_path):
    a, b = (
        Host(name, address, port=port, user="ops", known_hosts=str(tmp_path / "kh"))
        for name, address, port in (
            ("web001", "198.18.7.1", None),
            ("web120", "198.18.7.120", 2222),
        )
    )
    msg_a, msg_b = str(_describe(a, exc)), str(_describe(b, exc))
    assert msg_a != msg_b  # they do name their host
    norm_a = normalise_error(msg_a, (a.name, *host_aliases(a)))
    norm_b = normalise_error(msg_b, (b.name, *host_aliases(b)))
    assert norm_a == norm_b
    assert "198.18.7" not in norm_a and "web" not in norm_a


NORMALISED = [
    ("connection to web07 lost: Connection reset", "connection lost: Connection reset"),
    ("/bin/python3 on web07 is Python 3.5; need 3.6+", "/bin/python3 is Python 3.5; need 3.6+"),
    ("ops may not sudo on web07", "ops may not sudo"),
    ("sudo on web07 rejected the password", "sudo rejected the password"),
    ("the script did not arrive intact on web07", "the script did not arrive intact"),
    ("could not start the script on web07 (exit 1): x", "could not start the script (exit 1): x"),
    ("connection refused by [198.18.0.7]:2222", "connection refused"),
    ("ssh-keygen -R 198.18.0.7 then retry", "ssh-keygen -R <host> then retry"),
    ("ssh-keygen -R [198.18.0.7]:2222", "ssh-keygen -R <host>"),
    # other hosts' names, and longer names that start with this one, are kept
    ("jump host web070: refused by 198.18.0.70:22", "jump host web070: refused by 198.18.0.70:22"),
    ("timed out after 5s", "timed out after 5s"),
]  # fmt: skip


@pytest.mark.parametrize(("message", "normal"), NORMALISED)
def test_normalise_error(message, normal):
    assert normalise_error(message, ("web07", "198.18.0.7")) == normal


LITERAL = ("ops@198.18.0.9:2222", "198.18.0.9")  # a host given as user@address:port
V6 = ("v6host", "fd00::7")


@pytest.mark.parametrize(
    ("aliases", "message"),
    [
        (LITERAL, "sudo needs a password on ops@198.18.0.9:2222; use"),
        (LITERAL, "connection refused by 198.18.0.9:2222; use"),
        (V6, "connection refused by fd00::7:22; use"),
        (V6, "sudo needs a password on v6host; use"),
    ],
)  # fmt: skip
def test_literal_and_ipv6_hosts_normalise_too(aliases, message):
    assert normalise_error(message, aliases).endswith("; use")
    assert normalise_error(message, aliases) in (
        "connection refused; use",
        "sudo needs a password; use",
    )


def test_failure_groups_keep_the_order_of_first_appearance_on_ties():
    groups = fold_failures([("b", "x on b"), ("a", "y on a"), ("c", "y on c"), ("d", "x on d")])
    assert [(g.message, g.hosts) for g in groups] == [("x", ("b", "d")), ("y", ("a", "c"))]


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def render(view: StatusView) -> list[str]:
    out = Console(file=io.StringIO(), width=200)
    out.print(view._render())
    return out.file.getvalue().splitlines()


def test_fleet_status_is_bounded_and_shows_slowest_and_failures():
    names = [f"web{i:04d}" for i in range(1, 1001)]
    clock = Clock()
    console = Console(file=io.StringIO(), force_terminal=True, width=200, height=60)
    view = StatusView(names, console, aliases={n: (f"10.0.{n[-4:]}",) for n in names}, clock=clock)
    for i, name in enumerate(names):
        clock.now = 100.0 + i / 100
        view.set(name, "connecting")
        view.set(name, "running" if i < 900 else "done")
    for name in names[:30]:  # the first to start are the longest running: make some fail
        view.set(name, "failed")
        view.note_failure(
            HostResult(name, "failed", error=f"connection refused by 10.0.{name[-4:]}:22")
        )
    for i, name in enumerate(names[30:40]):
        view.set(name, "failed")
        view.note_failure(HostResult(name, "failed", error=f"script exited with {i % 7}"))
    clock.now = 120.0
    lines = render(view)
    assert len(lines) <= 2 + SLOWEST_SHOWN + FAILURES_SHOWN
    assert lines[0].split() == ["1000", "hosts", "100", "done,", "40", "failed,", "860", "running"]
    slowest = [line.split() for line in lines[1 : 1 + SLOWEST_SHOWN]]
    assert slowest[0][0] == "slowest"
    assert [row[-4:] for row in slowest] == [
        [f"web{i:04d}", "running", "19.6", "s"] for i in range(41, 46)
    ]
    failed = [line.rstrip() for line in lines[1 + SLOWEST_SHOWN :]]
    assert failed[0].split(None, 1) == ["failed", "30 hosts: connection refused: web[0001-0030]"]
    assert failed[1].strip().startswith("2 hosts: script exited with 0: web[0031,0038]")
    assert failed[-1].strip() == "and 4 hosts failing in 4 other ways"
    view.set("web0041", "failed")  # a failure after a frame is in the next one
    view.note_failure(HostResult("web0041", "failed", error="connection refused by 10.0.0041"))
    assert "31 hosts: connection refused: web[0001-0030,0041]" in render(view)[1 + SLOWEST_SHOWN]


def test_fleet_status_stays_bounded_on_a_narrow_terminal():
    names = [f"web{i:04d}" for i in range(1, 101)]
    view = StatusView(names, Console(file=io.StringIO(), force_terminal=True, width=50))
    for i, name in enumerate(names):
        view.set(name, "failed")
        message = f"could not start the script on {name} (exit 1): {'a long reason ' * 5}{i}"
        view.note_failure(HostResult(name, "failed", error=message))
    out = Console(file=io.StringIO(), width=50)
    out.print(view._render())
    lines = out.file.getvalue().splitlines()
    assert len(lines) == 1 + FAILURES_SHOWN + 1, lines
    assert lines[-1].split() == ["and", "96", "hosts", "failing", "in", "96", "other", "ways"]


def test_small_fleet_keeps_a_line_per_host():
    console = Console(file=io.StringIO(), force_terminal=True, width=80, height=40)
    view = StatusView(["a1", "a2"], console)
    view.set("a1", "running")
    assert [line.split() for line in render(view)] == [
        ["a1", "running"],
        ["a2", "queued"],
        ["2", "hosts", "1", "queued,", "1", "running"],
    ]
