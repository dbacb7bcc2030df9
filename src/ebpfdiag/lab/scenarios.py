"""Reproducible TCP failures through the lab's load balancer, with their expected origin.

Each scenario uses its own fixed VIP port, starts a small server on every server host if
it needs one, runs one client request from ``client`` to the VIP, and reports what the
client saw. ``SCENARIOS`` is data on purpose: tracer tests compare their verdicts with
``Scenario.expected`` (which host sent the reset, as what, for which kernel reason).
"""

import contextlib
import errno
import json
import re
import select
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ebpfdiag.errors import LabError, UsageError
from ebpfdiag.lab.netns import kill_pids, ns_exec_argv, run, socket_in

if TYPE_CHECKING:
    from ebpfdiag.lab.topology import LabState

PEERS = Path(__file__).with_name("peers.py")
NFT_TABLE = "ebpfdiag_lab"
RULE_COMMENT = "ebpfdiag-scenario"  # marks the rules a scenario adds for itself on lb
TCP_REPAIR = 19  # linux/tcp.h: a socket closed in repair mode sends neither FIN nor RST


@dataclass(frozen=True)
class ResetOrigin:
    """Where the reset comes from: host role, ``tcp-stack`` or ``firewall``, kernel reason."""

    host: str  # a role: "server" (any host of group servers) or "lb"
    kind: str  # "tcp-stack" (tcp_send_reset fires) or "firewall" (nftables reject)
    reason: str | None  # sk_rst_reason name on tcp:tcp_send_reset, None for the firewall
    state: str | None  # socket state on tcp:tcp_send_reset (None: no socket, shown UNKNOWN)


@dataclass(frozen=True)
class Scenario:
    name: str
    port: int  # VIP port the client connects to
    summary: str
    forwarded: bool  # True: the LB DNATs the port to the servers; False: the LB answers
    server_mode: str | None  # "echo" / "abort" helper on each server, None: no listener
    client_error: str | None  # what the client's socket call fails with (errno name)
    client_phase: str  # where the client sees it: connect / recv / done
    expected: ResetOrigin | None
    backend_port: int | None = None  # the servers' port when the LB rewrites the VIP port
    masquerade: str = "keep-port"  # or "fully-random": the LB picks a new source port
    min_servers: int = 1
    # Set for a flow the LB moves between servers mid-connection: {host, from, to}, where
    # from/to are the first and second server; what a tracer's verdict should report.
    moves: dict[str, str] | None = None

    @property
    def server_port(self) -> int:
        """The port the servers listen on (or not) behind the LB."""
        return self.backend_port or self.port


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            name="healthy",
            port=8080,
            summary="request and response through the LB, closed with FIN; no reset",
            forwarded=True,
            server_mode="echo",
            client_error=None,
            client_phase="done",
            expected=None,
        ),
        Scenario(
            name="rst-no-listener",
            port=8081,
            summary="the LB forwards the SYN to a server port with no listener; "
            "the server kernel answers RST",
            forwarded=True,
            server_mode=None,
            client_error="ECONNREFUSED",
            client_phase="connect",
            expected=ResetOrigin(host="server", kind="tcp-stack", reason="NO_SOCKET", state=None),
        ),
        Scenario(
            name="rst-abort",
            port=8082,
            summary="the server application accepts, reads the request, then closes "
            "with SO_LINGER 0 (abort)",
            forwarded=True,
            server_mode="abort",
            client_error="ECONNRESET",
            client_phase="recv",
            expected=ResetOrigin(
                host="server", kind="tcp-stack", reason="TCP_STATE", state="TCP_CLOSE"
            ),
        ),
        Scenario(
            name="rst-lb-reject",
            port=8083,
            summary="the LB's own nftables rule answers the SYN with "
            "'reject with tcp reset'; no server is involved",
            forwarded=False,
            server_mode=None,
            client_error="ECONNREFUSED",
            client_phase="connect",
            expected=ResetOrigin(host="lb", kind="firewall", reason=None, state=None),
        ),
        Scenario(
            name="rst-lb-failover",
            port=8084,
            summary="an established connection pinned to server1 is re-NATed to server2 "
            "after its conntrack entry is deleted on the LB; server2's listener answers "
            "the client's next data with RST (needs --servers 2)",
            forwarded=True,
            server_mode="hold",
            client_error="ECONNRESET",
            client_phase="recv",
            expected=ResetOrigin(
                host="server", kind="tcp-stack", reason="TCP_FLAGS", state="TCP_LISTEN"
            ),
            min_servers=2,
            moves={"host": "lb", "from": "server1", "to": "server2"},
        ),
        Scenario(
            name="rst-no-listener-portmap",
            port=8085,
            summary="as rst-no-listener, but the LB maps VIP port 8085 to server port 9085 "
            "and masquerades with fully random source ports",
            forwarded=True,
            server_mode=None,
            client_error="ECONNREFUSED",
            client_phase="connect",
            expected=ResetOrigin(host="server", kind="tcp-stack", reason="NO_SOCKET", state=None),
            backend_port=9085,
            masquerade="fully-random",
        ),
    )
}


# -- Drop scenarios: packets die on a known host, for the reason Linux 6.18 gives ----------
# Each gets its own port; the LB's shared DNAT forwards it to the servers (forwarded=True)
# unless the scenario's own rules, marked with RULE_COMMENT and removed afterwards, say
# otherwise. DROP_EXPECTED names where the packets die and what the kernel says there.

DROP_CHAIN = "scenario_filter"  # a filter chain of lb's table, made and removed per run


@dataclass(frozen=True)
class DropOrigin:
    """Where a drop scenario's packets die and how the kernel shows it on Linux 6.18."""

    host: str  # role: "lb" or "server"
    reason: str | None  # skb:kfree_skb reason there; None: no packet is freed with a reason
    counters: tuple[str, ...] = ()  # /proc/net/netstat|snmp counters that grow on that host
    client_retrans: bool = False  # the client retransmits its SYN (tcp_retransmit_skb)


DROP_SCENARIOS = (
    Scenario(
        name="drop-lb-firewall",
        port=8090,
        summary="an nftables rule on the LB drops the client's SYNs to the VIP port; the LB "
        "kernel frees them with reason NETFILTER_DROP and the client's connect times out",
        forwarded=True,
        server_mode="echo",
        client_error="ETIMEDOUT",
        client_phase="connect",
        expected=None,
    ),
    Scenario(
        name="drop-server-backlog",
        port=8091,
        summary="the server application listens (backlog 1) and never accepts; once its "
        "accept queue is full the server kernel refuses further SYNs without a drop reason "
        "(consumed), counting ListenOverflows and ListenDrops; the client retransmits its "
        "SYNs and times out",
        forwarded=True,
        server_mode="no-accept",
        client_error="ETIMEDOUT",
        client_phase="connect",
        expected=None,
    ),
    Scenario(
        name="drop-lb-noroute",
        port=8092,
        summary="the LB's NAT sends the VIP port to a backend address it has no route for; "
        "the LB kernel frees the SYN with reason IP_INNOROUTES and answers ICMP network "
        "unreachable",
        forwarded=True,
        server_mode=None,
        client_error="ENETUNREACH",
        client_phase="connect",
        expected=None,
    ),
    Scenario(
        name="drop-lb-invalid",
        port=8093,
        summary="an established connection through the LB gets one segment far outside its "
        "window; the LB's conntrack finds it invalid and its 'ct state invalid drop' rule "
        "frees it with reason NETFILTER_DROP; the connection itself goes on",
        forwarded=True,
        server_mode="echo",
        client_error=None,
        client_phase="done",
        expected=None,
    ),
)
DROP_EXPECTED: dict[str, DropOrigin] = {
    "drop-lb-firewall": DropOrigin(host="lb", reason="NETFILTER_DROP"),
    "drop-server-backlog": DropOrigin(
        host="server",
        reason=None,
        counters=("ListenOverflows", "ListenDrops"),
        client_retrans=True,
    ),  # fmt: skip
    "drop-lb-noroute": DropOrigin(host="lb", reason="IP_INNOROUTES", counters=("InNoRoutes",)),
    "drop-lb-invalid": DropOrigin(host="lb", reason="NETFILTER_DROP"),
}
SCENARIOS.update((s.name, s) for s in DROP_SCENARIOS)
NOROUTE_HOST = 254  # the last address of the VIP's /24: on no interface, in no route of lb


def _noroute_backend(lab: "LabState") -> str:
    vip = lab.vip.rsplit(".", 1)[0]
    return f"{vip}.{NOROUTE_HOST}"


def _add_filter_rule(ns: str, rule: str) -> None:
    """Add ``rule`` to the scenario's own filter chain on lb (prerouting, after conntrack
    and DNAT), made here if needed; marked as the scenario's."""
    _nft(ns, "add", "chain", "ip", NFT_TABLE, DROP_CHAIN, "{", "type", "filter", "hook",
         "prerouting", "priority", "filter", ";", "policy", "accept", ";", "}")  # fmt: skip
    _nft(ns, "add", "rule", "ip", NFT_TABLE, DROP_CHAIN, *rule.split(),
         "comment", f'"{RULE_COMMENT}"')  # fmt: skip


def _drop_filter_chain(ns: str) -> None:
    """Remove the scenario's filter chain with its rules (also one a killed run left)."""
    if f"chain {DROP_CHAIN} " in _nft(ns, "list", "table", "ip", NFT_TABLE):
        _nft(ns, "flush", "chain", "ip", NFT_TABLE, DROP_CHAIN)
        _nft(ns, "delete", "chain", "ip", NFT_TABLE, DROP_CHAIN)


def _run_drop(spec: Scenario, lab: "LabState", timeout: float) -> "ScenarioResult":
    """A drop scenario: the LB rules it needs, the server helpers, one client run."""
    lb = lab.hosts["lb"].netns
    helpers: dict[str, subprocess.Popen] = {}
    events: list[dict[str, Any]] = []
    client_args: list[str] = []
    _drop_filter_chain(lb)
    _drop_scenario_rules(lb)
    try:
        if spec.name == "drop-lb-firewall":
            _add_filter_rule(lb, f"tcp dport {spec.port} tcp flags syn drop")
        elif spec.name == "drop-lb-invalid":
            _add_filter_rule(lb, f"tcp dport {spec.port} ct state invalid drop")
            client_args = ["--out-of-window"]
        elif spec.name == "drop-lb-noroute":
            _add_scenario_rule(
                lb, f"ip daddr {lab.vip} tcp dport {spec.port} dnat to {_noroute_backend(lab)}"
            )
        elif spec.name == "drop-server-backlog":
            client_args = ["--many", "5"]
        if spec.server_mode:
            for server in lab.servers:
                helpers[server] = _start_server(lab.hosts[server].netns, spec)
            for server, proc in helpers.items():
                events += [dict(e, host=server) for e in _read_until_listening(server, proc)]
        seen = _run_client(lab, spec, timeout, client_args)
    finally:
        for server, proc in helpers.items():
            events += [dict(e, host=server) for e in _stop(proc)]
        _drop_filter_chain(lb)
        _drop_scenario_rules(lb)
    result = _result(spec, lab, seen)
    result.server_events = events
    result.reproduced = result.error == spec.client_error and result.phase == spec.client_phase
    return result


@dataclass
class ScenarioResult:
    """What the client saw, plus which server (if any) took the connection."""

    scenario: str
    error: str | None
    errno: int | None
    phase: str
    elapsed_ms: float
    client_address: str
    client_port: int
    vip: str
    vip_port: int
    server_host: str | None = None
    server_address: str | None = None
    server_port: int | None = None
    received: str = ""
    expected_error: str | None = None
    reproduced: bool = False
    server_events: list[dict[str, Any]] = field(default_factory=list)
    # The LB's conntrack entries of the client's port after the request (forwarded
    # scenarios): {"state", "original": {src, dst, sport, dport}, "reply": {...}}.
    lb_conntrack: list[dict[str, Any]] = field(default_factory=list)
    # rst-lb-failover: {"host": "lb", "from": S1, "to": S2} once lb's conntrack shows the
    # flow on the second server; None otherwise.
    moved: dict[str, str] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line such as ``ECONNRESET after 12 ms (recv) ...``."""
        seen = f"{self.error} after {self.elapsed_ms:.1f} ms ({self.phase})"
        if self.error is None:
            seen = f"response {self.received.strip()!r} after {self.elapsed_ms:.1f} ms, no error"
        via = f"{self.client_address}:{self.client_port} -> {self.vip}:{self.vip_port}"
        if self.server_host:
            via += f" -> {self.server_host} {self.server_address}:{self.server_port}"
        if self.moved:
            via += f", moved by {self.moved['host']} to {self.moved['to']}"
        verdict = "reproduced" if self.reproduced else "NOT reproduced"
        return f"{self.scenario}: {seen}; {via}; {verdict}"


def scenario(name: str) -> Scenario:
    try:
        return SCENARIOS[name]
    except KeyError:
        known = ", ".join(SCENARIOS)
        raise UsageError(f"unknown scenario {name!r}; known: {known}") from None


def run_scenario(name: str, lab: "LabState", *, timeout: float = 3.0) -> ScenarioResult:
    """Run one scenario against a running lab; server helpers are gone when it returns."""
    spec = scenario(name)
    if len(lab.servers) < spec.min_servers:
        raise UsageError(
            f"scenario {name} needs a lab with {spec.min_servers} servers, this one has "
            f"{len(lab.servers)}; fix: ebpfdiag lab down && ebpfdiag lab up "
            f"--servers {spec.min_servers}"
        )
    if spec.moves:
        return _run_failover(spec, lab, timeout)
    if isinstance(spec, LoadScenario):
        return _run_load(spec, lab, timeout)
    if spec.name in DROP_EXPECTED:
        return _run_drop(spec, lab, timeout)
    helpers: dict[str, subprocess.Popen] = {}
    events: list[dict[str, Any]] = []
    watch = NatWatch(lab, spec.port) if spec.forwarded else None
    try:
        if spec.server_mode:
            for server in lab.servers:
                helpers[server] = _start_server(lab.hosts[server].netns, spec)
            for server, proc in helpers.items():
                events += [dict(e, host=server) for e in _read_until_listening(server, proc)]
        if watch:
            watch.start()
        seen = _run_client(lab, spec, timeout)
    finally:
        for server, proc in helpers.items():
            events += [dict(e, host=server) for e in _stop(proc)]
        nat = watch.stop() if watch else []
    result = _result(spec, lab, seen)
    result.server_events = events
    accepted = [e for e in events if e.get("event") == "accepted"]
    if accepted:
        result.server_host = accepted[0]["host"]
        result.server_address, result.server_port = accepted[0]["local"]
    result.lb_conntrack = [e for e in nat if e["original"]["sport"] == result.client_port]
    if not accepted and result.lb_conntrack:  # no server accepted: the LB's NAT says where
        reply = result.lb_conntrack[0]["reply"]
        by_address = {lab.hosts[name].data_address: name for name in lab.servers}
        result.server_host = by_address.get(reply["src"])
        result.server_address, result.server_port = reply["src"], reply["sport"]
    result.reproduced = result.error == spec.client_error and result.phase == spec.client_phase
    return result


def _result(spec: Scenario, lab: "LabState", seen: dict[str, Any]) -> ScenarioResult:
    return ScenarioResult(
        scenario=spec.name,
        error=seen["error"],
        errno=seen["errno"],
        phase=seen["phase"],
        elapsed_ms=seen["elapsed_ms"],
        client_address=seen["client_address"],
        client_port=seen["client_port"],
        vip=lab.vip,
        vip_port=spec.port,
        received=seen["received"],
        expected_error=spec.client_error,
    )


def _start_server(ns: str, spec: Scenario) -> subprocess.Popen:
    argv = [sys.executable, str(PEERS), "server", "--port", str(spec.port)]
    argv += ["--mode", str(spec.server_mode)]
    return subprocess.Popen(
        ns_exec_argv(ns, argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _read_until_listening(host: str, proc: subprocess.Popen, wait: float = 5.0) -> list[dict]:
    """Block until the helper reports it listens, so the client never races its bind."""
    assert proc.stdout is not None
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.1)
        if ready:
            line = proc.stdout.readline()
            if not line:
                break
            event = json.loads(line)
            if event.get("event") == "listening":
                return [event]
    proc.kill()
    _, err = proc.communicate()
    raise LabError(f"scenario server on {host} did not start: {err.strip() or 'timeout'}")


def _stop(proc: subprocess.Popen) -> list[dict]:
    proc.terminate()
    try:
        out, _ = proc.communicate(timeout=3)
    except subprocess.TimeoutExpired:
        kill_pids([proc.pid])
        out, _ = proc.communicate()
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def _run_client(
    lab: "LabState", spec: Scenario, timeout: float, extra: list[str] | None = None
) -> dict[str, Any]:
    argv = [sys.executable, str(PEERS), "client", "--address", lab.vip]
    argv += ["--bind", str(lab.hosts["client"].data_address)]
    argv += ["--port", str(spec.port), "--timeout", str(timeout), *(extra or [])]
    proc = subprocess.run(
        ns_exec_argv(lab.hosts["client"].netns, argv),
        capture_output=True,
        text=True,
        timeout=timeout + 10,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise LabError(f"scenario client failed: {proc.stderr.strip() or proc.returncode}")
    return json.loads(proc.stdout.splitlines()[-1])


def _run_failover(spec: Scenario, lab: "LabState", timeout: float) -> ScenarioResult:
    """rst-lb-failover, stepped by hand: every socket lives in this process.

    The LB's DNAT for this one client port is a rule of the scenario's own: first to the
    first server; after a request and its response it points at the second server and the
    flow's conntrack entry is deleted, so the client's next segment is NATed afresh
    (nf_conntrack_tcp_loose picks it up mid-stream) and reaches a server that never saw
    the handshake. The first server's socket is closed in repair mode afterwards, so the
    scenario causes exactly one reset.
    """
    first, second = lab.servers[0], lab.servers[1]
    client, lb = lab.hosts["client"], lab.hosts["lb"]
    address = {name: str(lab.hosts[name].data_address) for name in (first, second)}
    events: list[dict[str, Any]] = []
    sockets: list[socket.socket] = []
    held: socket.socket | None = None
    watch = NatWatch(lab, spec.port)
    _drop_scenario_rules(lb.netns)
    try:
        watch.start()
        listeners = {}
        for name in (first, second):
            listener = socket_in(lab.hosts[name].netns)
            sockets.append(listener)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(("0.0.0.0", spec.server_port))
            listener.listen(4)
            listener.settimeout(timeout)
            listeners[name] = listener
            events.append({"event": "listening", "port": spec.server_port, "host": name})
        sock = socket_in(client.netns)
        sockets.append(sock)
        sock.settimeout(timeout)
        sock.bind((str(client.data_address), 0))
        client_port = sock.getsockname()[1]
        match = (
            f"ip saddr {client.data_address} tcp sport {client_port} "
            f"ip daddr {lab.vip} tcp dport {spec.port}"
        )
        _add_scenario_rule(lb.netns, f"{match} dnat to {address[first]}")
        try:
            sock.connect((lab.vip, spec.port))
            held, peer = listeners[first].accept()
            events.append(
                {"event": "accepted", "peer": list(peer), "host": first,
                 "local": list(held.getsockname())}
            )  # fmt: skip
            held.settimeout(timeout)
            sock.sendall(b"hello\n")
            held.sendall(b"ok " + held.recv(4096))
            received = b""
            while not received.endswith(b"\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    break
                received += chunk
        except OSError as exc:
            raise LabError(f"{spec.name}: the connection to {first} failed: {exc}") from None
        time.sleep(0.2)  # the client's ACK reaches the first server: it has nothing to resend
        _drop_scenario_rules(lb.netns)
        _add_scenario_rule(lb.netns, f"{match} dnat to {address[second]}")
        _delete_conntrack(lb.netns, str(client.data_address), client_port)
        seen = _send_after_failover(sock)
    finally:
        nat = watch.stop()
        _drop_scenario_rules(lb.netns)
        if held is not None:
            with contextlib.suppress(OSError):
                held.setsockopt(socket.IPPROTO_TCP, TCP_REPAIR, 1)
            held.close()
        for item in sockets:
            item.close()
    seen.update(
        client_address=str(client.data_address),
        client_port=client_port,
        received=received.decode("utf-8", "replace"),
    )
    result = _result(spec, lab, seen)
    result.server_events = events
    result.server_host, result.server_address = first, address[first]
    result.server_port = spec.server_port
    result.lb_conntrack = [e for e in nat if e["original"]["sport"] == client_port]
    if any(e["reply"]["src"] == address[second] for e in result.lb_conntrack):
        result.moved = {"host": "lb", "from": first, "to": second}
    result.reproduced = (
        result.error == spec.client_error
        and result.phase == spec.client_phase
        and result.moved is not None
    )
    return result


def _send_after_failover(sock: socket.socket) -> dict[str, Any]:
    """Send on the moved connection and wait for the answer, as the application sees it."""
    phase, error, err_no = "send", None, None
    start = time.monotonic()
    try:
        sock.sendall(b"again\n")
        phase = "recv"
        while sock.recv(4096):
            pass
    except TimeoutError:
        error, err_no = "ETIMEDOUT", errno.ETIMEDOUT
    except OSError as exc:
        err_no = exc.errno
        error = errno.errorcode.get(exc.errno or 0, str(exc))
    return {
        "error": error,
        "errno": err_no,
        "phase": phase if error else "done",
        "elapsed_ms": round((time.monotonic() - start) * 1000.0, 3),
    }


def _nft(ns: str, *argv: str) -> str:
    return run(ns_exec_argv(ns, ["nft", *argv]))


def _add_scenario_rule(ns: str, rule: str) -> None:
    """Insert ``rule`` first in the LB's prerouting (NAT) chain, marked as the scenario's."""
    _nft(ns, "insert", "rule", "ip", NFT_TABLE, "prerouting", *rule.split(),
         "comment", f'"{RULE_COMMENT}"')  # fmt: skip


def _drop_scenario_rules(ns: str) -> None:
    """Remove every rule a scenario added (also those a killed run left behind)."""
    listing = _nft(ns, "-a", "list", "chain", "ip", NFT_TABLE, "prerouting")
    for handle in re.findall(rf'comment "{RULE_COMMENT}" # handle (\d+)', listing):
        _nft(ns, "delete", "rule", "ip", NFT_TABLE, "prerouting", "handle", handle)


def _delete_conntrack(ns: str, source: str, port: int) -> None:
    argv = ["conntrack", "-D", "-p", "tcp", "--orig-src", source, "--orig-port-src", str(port)]
    proc = subprocess.run(ns_exec_argv(ns, argv), capture_output=True, text=True)
    if not re.search(r"\b[1-9]\d* flow entries have been deleted", proc.stderr):
        raise LabError(f"conntrack on lb deleted no entry for port {port}: {proc.stderr.strip()}")


class NatWatch:
    """The LB's conntrack NEW events for one VIP port, i.e. what its NAT made of each flow.

    Entries of connections refused or reset before a reply are deleted at once, so
    ``conntrack -L`` afterwards finds nothing: the events are the record. A marker entry
    (client port 1, then 2) is inserted and deleted on start and on stop: seeing the first
    proves the listener is subscribed before the client runs, seeing the second that every
    earlier event has been read before the listener is stopped.
    """

    def __init__(self, lab: "LabState", port: int) -> None:
        self.ns = lab.hosts["lb"].netns
        self.vip = lab.vip
        self.port = port
        self.client = str(lab.hosts["client"].data_address)
        self.proc: subprocess.Popen | None = None
        self.lines: list[str] = []

    def _marker(self, action: str, sport: int) -> list[str]:
        argv = ["conntrack", action, "-p", "tcp", "-s", self.client, "-d", self.vip,
                "--sport", str(sport), "--dport", str(self.port)]  # fmt: skip
        if action == "-I":
            argv += ["-r", self.vip, "-q", self.client, "--reply-port-src", str(self.port),
                     "--reply-port-dst", str(sport), "--state", "SYN_SENT", "-t", "5"]  # fmt: skip
        return ns_exec_argv(self.ns, argv)

    def _sync(self, sport: int, wait: float = 5.0) -> bool:
        """Insert a marker entry and read events until it shows; False if it never does."""
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + wait
        try:
            while time.monotonic() < deadline:
                run(self._marker("-I", sport), check=False)
                while select.select([self.proc.stdout], [], [], 0.2)[0]:
                    line = self.proc.stdout.readline().decode()  # unbuffered: select is exact
                    if not line:
                        return False
                    if f"sport={sport} " in line:
                        return True
                    self.lines.append(line)
                run(self._marker("-D", sport), check=False)
            return False
        finally:
            run(self._marker("-D", sport), check=False)

    def start(self) -> None:
        argv = ["conntrack", "-E", "-e", "NEW", "-p", "tcp", "--orig-dst", self.vip,
                "--dport", str(self.port)]  # fmt: skip
        self.proc = subprocess.Popen(
            ns_exec_argv(self.ns, argv),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            bufsize=0,
        )
        if not self._sync(1):
            self.stop()
            raise LabError("conntrack -E on lb showed no events")

    def stop(self) -> list[dict[str, Any]]:
        """End the listener; the NEW entries it saw (markers excluded), parsed."""
        if self.proc is None:
            return []
        synced = self._sync(2)
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=3)
        except subprocess.TimeoutExpired:
            kill_pids([self.proc.pid])
            out, _ = self.proc.communicate()
        self.proc = None
        if not synced:
            raise LabError("conntrack -E on lb stopped showing events")
        lines = self.lines + out.decode().splitlines()
        entries = [parse_conntrack(line.replace("[NEW]", "").strip()) for line in lines
                   if line.strip().startswith("[NEW] tcp ")]  # fmt: skip
        return [e for e in entries if e["original"].get("sport") not in (1, 2)]


def parse_conntrack(line: str) -> dict[str, Any]:
    """One ``conntrack -L`` line: the first src/dst/sport/dport are the original
    direction, the second the reply (what NAT made of it)."""
    fields = line.split()
    tuples: list[dict[str, Any]] = [{}, {}]
    for token in fields[3:]:
        key, _, value = token.partition("=")
        if key in ("src", "dst", "sport", "dport"):
            side = tuples[0] if key not in tuples[0] else tuples[1]
            side[key] = int(value) if key.endswith("port") else value
    return {"state": fields[3], "original": tuples[0], "reply": tuples[1]}


def describe() -> list[dict[str, Any]]:
    """``lab scenario --list`` as data."""
    return [asdict(s) for s in SCENARIOS.values()]


# -- Latency scenarios: many request/response rounds; delay from the server application
# (this kernel has no netem), loss from lb's nftables.

LOSS_CHAIN = "scenario_loss"  # lb's forward-hook chain of lossy scenarios (scenario's own)
LOSS_SET = "scenario_dropped"  # flow . seq of each data segment it dropped once


@dataclass(frozen=True)
class LoadScenario(Scenario):
    """Request/response rounds on several connections at once (``peers.py`` delay mode)."""

    connections: int = 3
    exchanges: int = 10  # rounds per connection
    delay_ms: float = 0.0  # how long the server application waits before each answer
    drops: int = 0  # lb drops this many client data segments once each (the first ones)


@dataclass
class LoadResult(ScenarioResult):
    """What a latency tracer's tests compare with: the injected delay, the rounds as the
    client timed them, and the segments lb dropped."""

    delay_ms: float = 0.0
    exchanges: int = 0  # rounds completed over all connections
    # per connection: client_port, exchanges, rtt_ms (each round, send to whole answer), error
    connections: list[dict[str, Any]] = field(default_factory=list)
    # each segment lb dropped, as its forward hook saw it (after DNAT, before masquerade):
    # {saddr, sport, daddr, dport, seq}
    dropped: list[dict[str, Any]] = field(default_factory=list)
    retransmissions: int = 0  # client namespace TcpRetransSegs during the run
    loss_probes: int = 0  # client namespace TcpExtTCPLossProbes during the run

    def summary(self) -> str:
        rtts = [t for c in self.connections for t in c["rtt_ms"]]
        seen = f"{self.error} ({self.phase}) after {self.exchanges} rounds"
        if self.error is None:
            seen = f"{self.exchanges} rounds on {len(self.connections)} connections"
        if rtts:
            seen += f", round {min(rtts):.1f}-{max(rtts):.1f} ms"
        seen += f", {len(self.dropped)} dropped by lb, {self.retransmissions} retransmitted"
        via = f"{self.client_address} -> {self.vip}:{self.vip_port}"
        verdict = "reproduced" if self.reproduced else "NOT reproduced"
        return f"{self.scenario}: {seen}; {via}; {verdict}"


SCENARIOS.update(
    (s.name, s)
    for s in (
        LoadScenario(
            name="slow-server",
            port=8110,
            summary="the server application answers each request 20 ms late (3 connections "
            "x 10 rounds); a tracer finds ~20 ms between a request reaching the server and "
            "its answer leaving it, the network legs near zero",
            forwarded=True,
            server_mode="delay",
            client_error=None,
            client_phase="done",
            expected=None,
            delay_ms=20.0,
        ),
        LoadScenario(
            name="lossy-lb",
            port=8111,
            summary="lb's nftables drops the first 3 client data segments once each "
            "(forward hook); the client retransmits them; a tracer finds each one leaving "
            "client and reaching lb but not leaving lb, then its retransmission passing",
            forwarded=True,
            server_mode="delay",
            client_error=None,
            client_phase="done",
            expected=None,
            drops=3,
        ),
        LoadScenario(
            name="healthy-load",
            port=8112,
            summary="8 connections x 50 request/response rounds, no delay, no loss; "
            "a tracer finds no retransmission and sub-millisecond legs",
            forwarded=True,
            server_mode="delay",
            client_error=None,
            client_phase="done",
            expected=None,
            connections=8,
            exchanges=50,
        ),
    )
)


def _run_load(spec: LoadScenario, lab: "LabState", timeout: float) -> LoadResult:
    """Start the delaying servers, add lb's drop rule if the scenario loses packets, run
    the client's rounds; counters of the client namespace say what TCP retransmitted."""
    client, lb = lab.hosts["client"], lab.hosts["lb"]
    helpers: dict[str, subprocess.Popen] = {}
    events: list[dict[str, Any]] = []
    dropped: list[dict[str, Any]] = []
    watch = NatWatch(lab, spec.port)
    _remove_loss(lb.netns)
    before = tcp_counters(client.netns)
    try:
        for server in lab.servers:
            argv = [sys.executable, str(PEERS), "server", "--port", str(spec.port),
                    "--mode", "delay", "--delay-ms", str(spec.delay_ms)]  # fmt: skip
            helpers[server] = subprocess.Popen(
                ns_exec_argv(lab.hosts[server].netns, argv),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        for server, proc in helpers.items():
            events += [dict(e, host=server) for e in _read_until_listening(server, proc)]
        if spec.drops:
            _add_loss(lb.netns, spec, str(client.data_address))
        watch.start()
        argv = [sys.executable, str(PEERS), "client", "--address", lab.vip,
                "--bind", str(client.data_address), "--port", str(spec.port),
                "--timeout", str(timeout), "--connections", str(spec.connections),
                "--exchanges", str(spec.exchanges)]  # fmt: skip
        proc = subprocess.run(ns_exec_argv(client.netns, argv), capture_output=True, text=True,
                              timeout=timeout * spec.exchanges + 30)  # fmt: skip
        if proc.returncode != 0 or not proc.stdout.strip():
            raise LabError(f"scenario client failed: {proc.stderr.strip() or proc.returncode}")
        seen = json.loads(proc.stdout.splitlines()[-1])
        if spec.drops:
            dropped = _dropped(lb.netns, spec.server_port)
    finally:
        for server, proc in helpers.items():
            events += [dict(e, host=server) for e in _stop(proc)]
        _remove_loss(lb.netns)
        nat = watch.stop()
    after = tcp_counters(client.netns)
    connections = seen.pop("connections")
    result = LoadResult(
        **_result(spec, lab, seen).to_dict(),
        delay_ms=spec.delay_ms,
        exchanges=sum(c["exchanges"] for c in connections),
        connections=connections,
        dropped=dropped,
        retransmissions=after["TcpRetransSegs"] - before["TcpRetransSegs"],
        loss_probes=after["TcpExtTCPLossProbes"] - before["TcpExtTCPLossProbes"],
    )
    result.server_events = events
    result.lb_conntrack = [e for e in nat if e["original"]["sport"] == result.client_port]
    accepted = [e for e in events if e.get("event") == "accepted"]
    if accepted:
        result.server_host = accepted[0]["host"]
        result.server_address, result.server_port = accepted[0]["local"]
    rtts = [t for c in connections for t in c["rtt_ms"]]
    result.reproduced = (
        result.error is None
        and result.exchanges == spec.connections * spec.exchanges
        and min(rtts, default=0.0) >= spec.delay_ms
        and (len(dropped) == spec.drops and result.retransmissions >= spec.drops
             if spec.drops else result.retransmissions == 0)
    )  # fmt: skip
    return result


def _add_loss(ns: str, spec: LoadScenario, client: str) -> None:
    """lb's forward hook drops each of the client's first ``spec.drops`` data segments
    once: the dynamic set (bounded to that many) remembers flow and seq, so the
    retransmission of a remembered segment passes, and a full set drops nothing more."""
    key = "ip saddr . tcp sport . ip daddr . tcp sequence"  # nft 1.0.6 takes 4 parts at most
    mark = f'comment "{RULE_COMMENT}"'
    rule = (
        f"ip saddr {client} tcp dport {spec.server_port} tcp flags & (fin | syn | rst | psh) "
        f"== psh {key} != @{LOSS_SET} add @{LOSS_SET} {{ {key} }} counter drop {mark}"
    )
    commands = f"""
add set ip {NFT_TABLE} {LOSS_SET} {{ typeof {key}; size {spec.drops}; flags dynamic; {mark}; }}
add chain ip {NFT_TABLE} {LOSS_CHAIN} {{ type filter hook forward priority filter; {mark}; }}
add rule ip {NFT_TABLE} {LOSS_CHAIN} {rule}
"""
    run(ns_exec_argv(ns, ["nft", "-f", "-"]), input=commands)


def _remove_loss(ns: str) -> None:
    """Remove the lossy scenario's chain and set (also those a killed run left behind)."""
    listing = _nft(ns, "list", "table", "ip", NFT_TABLE)
    if f"chain {LOSS_CHAIN} " in listing:
        _nft(ns, "delete", "chain", "ip", NFT_TABLE, LOSS_CHAIN)
    if f"set {LOSS_SET} " in listing:
        _nft(ns, "delete", "set", "ip", NFT_TABLE, LOSS_SET)


def _dropped(ns: str, dport: int) -> list[dict[str, Any]]:
    """The set's elements: each dropped segment's flow and seq (the rule's one ``dport``)."""
    data = json.loads(_nft(ns, "-j", "list", "set", "ip", NFT_TABLE, LOSS_SET))
    out = []
    for entry in data["nftables"]:
        for elem in (entry.get("set") or {}).get("elem", []):
            saddr, sport, daddr, seq = elem["concat"]
            out.append({"saddr": saddr, "sport": sport, "daddr": daddr, "dport": dport,
                        "seq": seq})  # fmt: skip
    return out


def tcp_counters(ns: str) -> dict[str, int]:
    """The namespace's TCP counters (``/proc/net/snmp`` and ``netstat``, as ``nstat``
    names them: ``TcpRetransSegs``, ``TcpExtTCPLossProbes``, ...)."""
    text = run(ns_exec_argv(ns, ["cat", "/proc/net/snmp", "/proc/net/netstat"]))
    lines = text.splitlines()
    out: dict[str, int] = {}
    for names, values in zip(lines[::2], lines[1::2], strict=True):
        group, _, names = names.partition(":")
        for name, value in zip(names.split(), values.split(":", 1)[1].split(), strict=True):
            out[group + name] = int(value)
    return out
