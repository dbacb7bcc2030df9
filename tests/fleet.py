"""N plain sshd hosts on one layer-2 segment, for fan-out tests and benchmarks.

Each host is a network namespace with a veth into a root-namespace bridge, its own
address, host key and sshd. A bridge takes at most 1,023 ports, so a large fleet spreads
its hosts over several bridges joined to the first by veth links (one segment, one
subnet, one gateway), and raises the kernel's neighbour-table thresholds while it is up
(every host and the gateway hold an entry each, in one table shared by all namespaces):
the values it found are put back by ``down()``. The fleet writes a client key, a
known_hosts file and a native inventory, so the controller (or OpenSSH) can reach every
host with strict host key checking. Everything is named ``{prefix}-...`` and recorded in a
state file, so two fleets with different prefixes coexist and ``down`` removes exactly
what ``up`` made.
"""

import contextlib
import ipaddress
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ebpfdiag.errors import LabError, UsageError
from ebpfdiag.lab import netns, sshd, state, users

RUN_ROOT = Path("/run/ebpfdiag")
PYTHON = "/usr/bin/python3"
FIRST_HOST_OFFSET = 10
CLIENT_FILES = ("id_ed25519", "id_ed25519.pub", "known_hosts", "inventory.yaml")
#: hosts per bridge: under the kernel's 1,023 ports, with room for the links between bridges
HOSTS_PER_BRIDGE = 1000
#: the neighbour-table thresholds (one table for every namespace), raised for a big fleet
NEIGH_SYSCTLS = ("gc_thresh1", "gc_thresh2", "gc_thresh3")
NEIGH_DIR = Path("/proc/sys/net/ipv4/neigh/default")


@dataclass
class FleetHost:
    """One fleet host as the controller sees it."""

    name: str
    netns: str
    address: str
    port: int
    user: str


class Fleet:
    """A set of sshd hosts in namespaces; use as a context manager or call up()/down()."""

    def __init__(
        self,
        prefix: str,
        count: int,
        *,
        subnet: str = "198.19.0.0/24",
        user: str = "ebpfdiag-test",
        workdir: Path | None = None,
        password_sudo_hosts: Iterable[str] = (),
        no_sshd_hosts: Iterable[str] = (),
        max_startups: str = "200:30:400",
        max_sessions: int = 64,
        hosts_per_bridge: int = HOSTS_PER_BRIDGE,
    ) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9]*", prefix):
            raise UsageError(f"fleet prefix {prefix!r}: use lower-case letters and digits")
        if count < 1:
            raise UsageError("a fleet needs at least one host")
        self.prefix = prefix
        self.network = ipaddress.ip_network(subnet)
        if not self.network.subnet_of(ipaddress.ip_network("198.18.0.0/15")):
            raise UsageError(f"fleet subnet {subnet} is outside the lab range 198.18.0.0/15")
        if FIRST_HOST_OFFSET + count >= self.network.num_addresses - 1:
            raise UsageError(f"{count} hosts do not fit in {subnet}")
        width = max(2, len(str(count)))
        names = [f"h{i + 1:0{width}d}" for i in range(count)]
        if len(f"{prefix}-{names[-1]}") > 15:
            raise UsageError(f"fleet prefix {prefix!r} is too long for interface names")
        self.user = user
        self.password_user = f"{user}pw"
        self.password_sudo_hosts = set(password_sudo_hosts)
        self.no_sshd_hosts = set(no_sshd_hosts)
        unknown = (self.password_sudo_hosts | self.no_sshd_hosts) - set(names)
        if unknown:
            raise UsageError(f"not fleet hosts: {', '.join(sorted(unknown))}")
        self.max_startups = max_startups
        self.max_sessions = max_sessions
        self.rundir = RUN_ROOT / f"fleet-{prefix}"
        self.workdir = Path(workdir) if workdir else self.rundir / "client"
        self.client_key = self.workdir / "id_ed25519"
        self.known_hosts = self.workdir / "known_hosts"
        self.inventory = self.workdir / "inventory.yaml"
        self.bridge = f"{prefix}-br"
        if not 1 <= hosts_per_bridge <= HOSTS_PER_BRIDGE:
            raise UsageError(f"hosts per bridge: 1 to {HOSTS_PER_BRIDGE}")
        self.hosts_per_bridge = hosts_per_bridge
        #: the first bridge holds the gateway address; the others hang off it
        self.bridges = [self.bridge] + [
            f"{prefix}-br{k}" for k in range(1, -(-count // hosts_per_bridge))
        ]
        self.gateway = str(self.network[1])
        self.sudo_password: str | None = None
        self.hosts = [
            FleetHost(
                name=name,
                netns=f"{prefix}-{name}",
                address=str(self.network[FIRST_HOST_OFFSET + i]),
                port=22,
                user=self.password_user if name in self.password_sudo_hosts else user,
            )
            for i, name in enumerate(names)
        ]
        self._by_name = {h.name: h for h in self.hosts}

    # -- public API -------------------------------------------------------------------

    def up(self) -> "Fleet":
        """Create (or complete) the fleet; safe to call again on a running fleet."""
        self._state_path.parent.mkdir(parents=True, exist_ok=True)
        self.rundir.chmod(0o755)
        record = state.load(self._state_path)
        record.update(self._describe())
        record.setdefault("workdir_created", not self.workdir.exists())
        state.save(self._state_path, record)
        self._check_subnet_free()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._acquire_users()
        sshd.generate_key(self.client_key, f"ebpfdiag-fleet-{self.prefix}")
        keys = self.rundir / "authorized_keys"
        shutil.copyfile(self.client_key.with_suffix(".pub"), keys)
        sshd.check_readable(keys)
        self._raise_neighbour_limits(record)
        netns.bridge_add(self.bridge, f"{self.gateway}/{self.network.prefixlen}")
        for k, extra in enumerate(self.bridges[1:], start=1):
            _bridge_joined(extra, self.bridge, f"{self.prefix}-bl{k}")
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(self._host_up, self.hosts))
        deadline = time.monotonic() + 20
        for host in self._sshd_hosts():
            sshd.wait_ready(host.address, host.port, *self._pid_and_config(host), deadline)
        self._write_client_files()
        return self

    def down(self) -> None:
        """Remove namespaces, links, sshd processes, users, sudoers files and files; idempotent."""
        record = state.load(self._state_path)
        namespaces = {h.netns for h in self.hosts} | set(record.get("netns", []))
        namespaces |= {n for n in netns.netns_list() if n.startswith(f"{self.prefix}-")}
        with ThreadPoolExecutor(max_workers=16) as pool:
            list(pool.map(netns.netns_delete, sorted(namespaces)))
        netns.kill_pids(netns.pids_with_arg(str(self.rundir) + "/"))
        for link in netns.link_names():
            if link.startswith(f"{self.prefix}-"):
                netns.link_delete(link)
        owner = self._owner
        for user in {self.user, self.password_user, *record.get("users", [])}:
            users.release(user, owner)
        for user in users.owned_by(owner):
            users.release(user, owner)
        workdir = Path(record.get("workdir", self.workdir))
        for name in CLIENT_FILES:
            (workdir / name).unlink(missing_ok=True)
        if record.get("workdir_created", True) and workdir.exists() and not any(workdir.iterdir()):
            workdir.rmdir()
        _restore_neighbour_limits(record.get("neigh", {}), self._others_need())
        shutil.rmtree(self.rundir, ignore_errors=True)
        _rmdir_if_empty(RUN_ROOT)

    def __enter__(self) -> "Fleet":
        try:
            return self.up()
        except BaseException:
            self.down()
            raise

    def __exit__(self, *exc: object) -> None:
        self.down()

    def host(self, name: str) -> FleetHost:
        try:
            return self._by_name[name]
        except KeyError:
            raise UsageError(f"no fleet host {name!r}") from None

    def ns_run(self, host: str, argv: list[str], **kw: Any) -> subprocess.CompletedProcess:
        """Run ``argv`` inside the host's namespace (``subprocess.run`` keywords apply)."""
        return subprocess.run(netns.ns_exec_argv(self.host(host).netns, argv), **kw)

    def sshd_pid(self, host: str) -> int | None:
        return sshd.read_pid(*self._pid_and_config(self.host(host)))

    def cpu_seconds(self, settle: float = 5.0) -> float:
        """CPU the fleet's hosts have used so far: every listening sshd with the sessions,
        sudo and remote python it reaped (``/proc/PID/stat`` utime+stime+cutime+cstime).
        Waits up to ``settle`` seconds for sessions still closing, so that a difference
        across a run holds the whole run."""
        pids = [p for p in (self.sshd_pid(h.name) for h in self._sshd_hosts()) if p]
        deadline = time.monotonic() + settle
        while any(_children(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        return sum(_cpu_ticks(p) for p in pids) / CLOCK_TICKS

    # -- internals ----------------------------------------------------------------------

    @property
    def _state_path(self) -> Path:
        return self.rundir / "state.json"

    @property
    def _owner(self) -> str:
        return f"fleet-{self.prefix}"

    def _describe(self) -> dict[str, Any]:
        return {
            "kind": "fleet",
            "prefix": self.prefix,
            "subnet": str(self.network),
            "bridge": self.bridge,
            "netns": [h.netns for h in self.hosts],
            "users": sorted({h.user for h in self.hosts}),
            "workdir": str(self.workdir),
        }

    def _check_subnet_free(self) -> None:
        """Refuse a subnet that another interface already uses: routes would collide."""
        out = netns.run(["ip", "-o", "-4", "addr", "show"])
        for line in out.split("\n"):
            fields = line.split()
            if len(fields) < 4 or fields[1] == self.bridge:
                continue
            other = ipaddress.ip_interface(fields[3]).network
            if other.overlaps(self.network):
                raise LabError(f"subnet {self.network} overlaps {other} on {fields[1]}")

    def _acquire_users(self) -> None:
        needed = {h.user for h in self.hosts}
        if self.user in needed:
            users.acquire(self.user, self._owner)
        if self.password_user in needed:
            self.sudo_password = users.acquire(self.password_user, self._owner, password_sudo=True)

    def _sshd_hosts(self) -> list[FleetHost]:
        return [h for h in self.hosts if h.name not in self.no_sshd_hosts]

    def _hostdir(self, host: FleetHost) -> Path:
        return self.rundir / "hosts" / host.name

    def _pid_and_config(self, host: FleetHost) -> tuple[Path, Path]:
        hostdir = self._hostdir(host)
        return hostdir / "sshd.pid", hostdir / "sshd_config"

    def _raise_neighbour_limits(self, record: dict[str, Any]) -> None:
        """Room in the (single, all-namespace) neighbour table for two entries per host
        (the host's for the gateway, the gateway's for the host) next to what others use;
        the values found are recorded first, for ``down()``."""
        need = self._neighbour_need()
        record["neigh_need"] = need
        current = {name: int((NEIGH_DIR / name).read_text()) for name in NEIGH_SYSCTLS}
        if current["gc_thresh3"] >= need:
            return
        wanted = {"gc_thresh1": current["gc_thresh1"], "gc_thresh2": need, "gc_thresh3": 2 * need}
        record["neigh"] = {"found": current, "set": wanted}
        state.save(self._state_path, record)
        for name in ("gc_thresh3", "gc_thresh2"):
            (NEIGH_DIR / name).write_text(f"{wanted[name]}\n")

    def _neighbour_need(self) -> int:
        return 2 * len(self.hosts) + 256

    def _others_need(self) -> int:
        """The largest neighbour-table need of the other fleets still up."""
        needs = [0]
        for path in RUN_ROOT.glob("fleet-*/state.json"):
            if path != self._state_path:
                needs.append(int(state.load(path).get("neigh_need", 0)))
        return max(needs)

    def _bridge_of(self, host: FleetHost) -> str:
        return self.bridges[self.hosts.index(host) // self.hosts_per_bridge]

    def _host_up(self, host: FleetHost) -> None:
        netns.netns_add(host.netns)
        cidr = f"{host.address}/{self.network.prefixlen}"
        netns.veth_into_netns(host.netns, host.netns, "eth0", cidr, bridge=self._bridge_of(host))
        netns.route_replace(host.netns, "default", self.gateway)
        hostdir = self._hostdir(host)
        hostdir.mkdir(parents=True, exist_ok=True)
        hostdir.chmod(0o755)
        host_key = sshd.generate_key(hostdir / "ssh_host_ed25519_key", f"{host.name}-hostkey")
        if host.name in self.no_sshd_hosts:
            return
        pid_file, config = self._pid_and_config(host)
        sshd.write_config(
            config,
            port=host.port,
            host_key=host_key,
            pid_file=pid_file,
            authorized_keys=self.rundir / "authorized_keys",
            users=[host.user],
            max_startups=self.max_startups,
            max_sessions=self.max_sessions,
        )
        sshd.start(host.netns, config, pid_file, hostdir / "sshd.log")

    def _write_client_files(self) -> None:
        lines = [
            sshd.known_hosts_line(h.address, h.port, self._hostdir(h) / "ssh_host_ed25519_key")
            for h in self.hosts
        ]
        self.known_hosts.write_text("\n".join(lines) + "\n")
        inventory: dict[str, Any] = {
            "defaults": {
                "user": self.user,
                "identity_file": str(self.client_key),
                "known_hosts": str(self.known_hosts),
                "sudo": True,
                "python": PYTHON,
                "connect_timeout": 5,
            },
            "hosts": {},
            "groups": {"fleet": [h.name for h in self.hosts]},
        }
        for h in self.hosts:
            entry: dict[str, Any] = {"address": h.address, "port": h.port}
            if h.user != self.user:
                entry["user"] = h.user
            inventory["hosts"][h.name] = entry
        header = f"# ebpfdiag test fleet {self.prefix}: written by Fleet.up(), removed by down()\n"
        self.inventory.write_text(header + yaml.safe_dump(inventory, sort_keys=False))


def _bridge_joined(name: str, main: str, link: str) -> None:
    """Bridge ``name`` joined to ``main`` by a veth pair ``link``a/``link``b (one segment)."""
    if not netns.link_exists(name):
        netns.run(["ip", "link", "add", "name", name, "type", "bridge"])
    netns.run(["ip", "link", "set", name, "up"])
    if not netns.link_exists(f"{link}a"):
        netns.run(["ip", "link", "add", f"{link}a", "type", "veth", "peer", "name", f"{link}b"])
    for end, bridge in ((f"{link}a", main), (f"{link}b", name)):
        netns.run(["ip", "link", "set", end, "master", bridge])
        netns.run(["ip", "link", "set", end, "up"])


def _restore_neighbour_limits(neigh: dict[str, Any], others_need: int = 0) -> None:
    """Put back the thresholds found by ``up()``, unless someone changed them since or
    another fleet still up needs more than they allow (raised values harm no one)."""
    found, wanted = neigh.get("found", {}), neigh.get("set", {})
    if others_need > found.get("gc_thresh3", 0):
        return
    for name in ("gc_thresh2", "gc_thresh3"):
        if name not in found or name not in wanted:
            continue
        path = NEIGH_DIR / name
        with contextlib.suppress(OSError, ValueError):
            if int(path.read_text()) == wanted[name]:
                path.write_text(f"{found[name]}\n")


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _cpu_ticks(pid: int) -> int:
    """utime + stime + cutime + cstime of ``pid`` (0 once it is gone)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = text.rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15])


def _children(pid: int) -> bool:
    try:
        return any(
            Path(task, "children").read_text().strip()
            for task in Path(f"/proc/{pid}/task").iterdir()
        )
    except OSError:
        return False


def _rmdir_if_empty(path: Path) -> None:
    with contextlib.suppress(OSError):
        path.rmdir()
