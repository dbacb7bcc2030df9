"""Reproducible TCP failures through the lab's load balancer, with their expected origin.

Each scenario uses its own fixed VIP port, starts a small server on every server host if
it needs one, runs one client request from ``client`` to the VIP, and reports what the
client saw. ``SCENARIOS`` is data on purpose: tracer tests compare their verdicts with
``Scenario.expected`` (which host sent the reset, as what, for which kernel reason).
"""

import json
import select
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ebpfdiag.errors import LabError, UsageError
from ebpfdiag.lab.netns import kill_pids, ns_exec_argv

if TYPE_CHECKING:
    from ebpfdiag.lab.topology import LabState

PEERS = Path(__file__).with_name("peers.py")


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
    )
}


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
    helpers: dict[str, subprocess.Popen] = {}
    events: list[dict[str, Any]] = []
    try:
        if spec.server_mode:
            for server in lab.servers:
                helpers[server] = _start_server(lab.hosts[server].netns, spec)
            for server, proc in helpers.items():
                events += [dict(e, host=server) for e in _read_until_listening(server, proc)]
        seen = _run_client(lab, spec, timeout)
    finally:
        for server, proc in helpers.items():
            events += [dict(e, host=server) for e in _stop(proc)]
    result = ScenarioResult(
        scenario=name,
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
        server_events=events,
    )
    accepted = [e for e in events if e.get("event") == "accepted"]
    if accepted:
        result.server_host = accepted[0]["host"]
        result.server_address, result.server_port = accepted[0]["local"]
    elif spec.forwarded and len(lab.servers) == 1:
        result.server_host = lab.servers[0]
        result.server_address = lab.hosts[lab.servers[0]].data_address
        result.server_port = spec.port
    result.reproduced = result.error == spec.client_error and result.phase == spec.client_phase
    return result


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


def _run_client(lab: "LabState", spec: Scenario, timeout: float) -> dict[str, Any]:
    argv = [sys.executable, str(PEERS), "client", "--address", lab.vip]
    argv += ["--bind", str(lab.hosts["client"].data_address)]
    argv += ["--port", str(spec.port), "--timeout", str(timeout)]
    proc = subprocess.run(
        ns_exec_argv(lab.hosts["client"].netns, argv),
        capture_output=True,
        text=True,
        timeout=timeout + 10,
    )
    if proc.returncode != 0 or not proc.stdout.strip():
        raise LabError(f"scenario client failed: {proc.stderr.strip() or proc.returncode}")
    return json.loads(proc.stdout.splitlines()[-1])


def describe() -> list[dict[str, Any]]:
    """``lab scenario --list`` as data."""
    return [asdict(s) for s in SCENARIOS.values()]
