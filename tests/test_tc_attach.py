"""How every packet tool attaches its TC programs (scripts/bpf/core/tc.py ``attach_links``):
which hooks, the fall back from refused tcx links to clsact, and what is reported missing.

The kernel parts (tcx links, clsact filters, their removal) are exercised for real by each
tool's own tests; this one drives the choices through stand-in hooks, since a kernel that
refuses tcx is not at hand here.
"""

from __future__ import annotations

import errno

from tests.bpfstate import load_core

tc = load_core("tc")


class Hooks:
    """A stand-in for TcxLinks/TcHooks: records attaches, refuses where told."""

    def __init__(self, kind: str, refuse: dict[int, int] | None = None, notes=()):
        self.kind = kind
        self.refuse = refuse or {}
        self.attached: list[tuple[int, dict]] = []
        self.notes = list(notes)

    def attach(self, ifindex: int, progs: dict) -> None:
        if ifindex in self.refuse:
            raise OSError(self.refuse[ifindex], "refused")
        self.attached.append((ifindex, progs))


LINKS = [(2, "eth0", 14), (3, "wg0", 0), (4, "eth1", 14), (5, "can0", None)]


def attach(hooks, fallback, why=None):
    loads: list[str] = []
    kept: list = []
    missing: list[dict] = []

    def load(name: str) -> str:
        loads.append(name)
        return "prog:" + name

    record = tc.attach_links(hooks, why, LINKS, load, fallback, missing, kept.append)
    return record, loads, kept, missing


def test_every_link_gets_both_programs_of_its_variant_loaded_once():
    hooks = Hooks("tcx-link")
    record, loads, kept, missing = attach(hooks, fallback=None)
    assert record == {"kind": "tcx-link", "interfaces": ["eth0", "wg0", "eth1"]}
    assert sorted(loads) == sorted(tc.TC_VARIANTS[14] + tc.TC_VARIANTS[0])
    eth0, wg0, eth1 = (progs for _, progs in hooks.attached)
    assert eth0 == eth1 == {"ingress": "prog:ebd_tc_ingress", "egress": "prog:ebd_tc_egress"}
    assert wg0 == {"ingress": "prog:ebd_tc_in_l3", "egress": "prog:ebd_tc_out_l3"}
    assert missing == [{"probe": "tc:can0", "why": "unsupported link type"}] and not kept


def test_tcx_refused_at_the_first_link_moves_every_link_to_clsact():
    refusing = Hooks("tcx-link", refuse={2: errno.EOPNOTSUPP})
    clsact = Hooks("tc-clsact")
    record, _, kept, missing = attach(refusing, fallback=lambda: clsact)
    assert kept == [clsact]  # handed over before anything is attached through it
    assert [i for i, _ in clsact.attached] == [2, 3, 4] and not refusing.attached
    assert record["kind"] == "tc-clsact" and record["interfaces"] == ["eth0", "wg0", "eth1"]
    assert record["why"].startswith("tcx refused (")
    assert missing[0]["probe"] == "tcx"


def test_no_fallback_after_a_link_is_attached_or_when_tcx_was_asked_for():
    later = Hooks("tcx-link", refuse={3: errno.EINVAL})
    record, _, kept, missing = attach(later, fallback=lambda: Hooks("tc-clsact"))
    assert record["interfaces"] == ["eth0", "eth1"] and not kept
    assert {"probe": "tc:wg0", "why": "[Errno 22] refused"} in missing
    first = Hooks("tcx-link", refuse={2: errno.EOPNOTSUPP})
    record, _, kept, missing = attach(first, fallback=None)  # --tc-mode tcx
    assert record["interfaces"] == ["wg0", "eth1"] and not kept
    assert missing[0]["probe"] == "tc:eth0"


def test_other_errors_and_earlier_filters_are_reported_per_link():
    hooks = Hooks("tc-clsact", refuse={4: errno.EBUSY}, notes=[("ingress", 100)])
    record, _, _, missing = attach(hooks, fallback=None, why="--tc-mode clsact")
    assert record == {"kind": "tc-clsact", "interfaces": ["eth0", "wg0"],
                      "why": "--tc-mode clsact"}  # fmt: skip
    assert missing[0] == {
        "probe": "tc:eth0:ingress",
        "why": "runs after existing filter prio 100; packets it takes are not seen",
    }
    assert {"probe": "tc:eth1", "why": "[Errno 16] refused"} in missing


def test_tcx_is_chosen_on_this_kernel_and_clsact_when_asked():
    hooks, why = tc.pick_hooks("auto", lambda: Hooks("tc-clsact"))
    assert hooks.kind == "tcx-link" and why is None  # Linux 6.6+ here
    hooks, why = tc.pick_hooks("clsact", lambda: Hooks("tc-clsact"))
    assert hooks.kind == "tc-clsact" and why == "--tc-mode clsact"


class Tool:
    """A packet tool's attributes that attach_tool uses."""

    class BPF:
        SCHED_CLS = 3

    def __init__(self):
        self.bpf = self
        self.plan = {"missing": []}
        self.attach: dict = {}
        self.tc = None
        self.loaded: list[tuple[str, int]] = []

    def load_func(self, name: str, kind: int) -> str:
        self.loaded.append((name, kind))
        return "prog:" + name


def test_a_tool_holds_its_hooks_and_reports_hooks_it_cannot_have():
    tool, hooks = Tool(), Hooks("tc-clsact")
    tc.attach_tool(tool, LINKS[:1], "clsact", lambda: hooks)
    assert tool.tc is hooks and [i for i, _ in hooks.attached] == [2]
    assert tool.attach["tc"] == {"kind": "tc-clsact", "interfaces": ["eth0"],
                                 "why": "--tc-mode clsact"}  # fmt: skip
    assert tool.loaded == [("ebd_tc_ingress", 3), ("ebd_tc_egress", 3)]

    def no_pyroute2():
        raise tc.SetupError("pyroute2 is not installed")

    tool = Tool()
    tc.attach_tool(tool, LINKS, "clsact", no_pyroute2)
    assert tool.plan["missing"] == [{"probe": "tc", "why": "pyroute2 is not installed"}]
    assert tool.tc is None and "tc" not in tool.attach


def test_only_the_kinds_of_the_watched_links_get_packet_programs_compiled():
    """Each entry point is a copy of the tool's on_packet for clang and the verifier: a
    host with Ethernet devices only compiles the Ethernet pair."""
    assert tc.link_kinds(None) is None
    assert tc.link_kinds([(2, "eth0", 14), (4, "eth1", 14), (5, "can0", None)]) == [14]
    assert tc.link_kinds(LINKS) == [0, 14]
    names = {l2: set(pair) for l2, pair in tc.TC_VARIANTS.items()}

    def defined(code: str) -> set[str]:
        return {n for pair in names.values() for n in pair if f"int {n}(" in code}

    assert defined(tc.c_tc_entries([14])) == names[14]
    assert "on_packet(skb, 1, 14)" in tc.c_tc_entries([14])
    assert (
        defined(tc.c_tc_entries(None)) == defined(tc.c_tc_entries([0, 14])) == names[0] | names[14]
    )
    assert tc.c_tc_entries([]) == ""


def test_watched_links_name_every_interface_and_refuse_unknown_ones():
    ifnames, links = tc.watched_links(None)
    assert sorted(ifnames) == sorted(i for i, _, _ in links)
    assert "lo" not in ifnames.values()
    try:
        tc.watched_links(["no-such-if0"])
    except tc.SetupError as exc:
        assert str(exc) == "no such interface: no-such-if0"
    else:
        raise AssertionError("an unknown interface was accepted")
