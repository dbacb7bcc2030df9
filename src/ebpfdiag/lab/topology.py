"""The client -> load balancer -> server lab, built from namespaces, veths and nftables.

Layout (offsets from the lab's base network, 198.18.0.0 by default)::

    root ns: bridge {prefix}-mgmt  .0.1/24  --- mgmt0 of every host (.0.10, .0.11, ...)
    client eth0 .1.10/24 <--> lb to-client .1.1/24
    lb br-servers .2.1/24 (ports to-serverN) <--> serverN eth0 .2.(10+i)/24
    VIP .3.1/32 on lb's lo; nftables on lb: DNAT (numgen across servers) + masquerade

Each host runs its own sshd on its management address, with its own copies of the
runner's paths and of /etc/sudoers.d (``hostfs``). Two users log in: ``ebpfdiag-lab``
(full sudo) and ``diag`` (group ``ebpfdiag``, no sudo rule of its own: what it may run
is what an installed runner allows), each with an inventory of the same hosts.
Everything is named with the lab's prefix and recorded in ``state.json`` in the state
directory before it is made, so ``down`` removes exactly what exists, also after a crash
half way through ``up``.
"""

import contextlib
import ipaddress
import os
import pwd
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ebpfdiag.errors import LabError, UsageError
from ebpfdiag.lab import hostfs, netns, prereqs, sshd, state, users
from ebpfdiag.lab.scenarios import NFT_TABLE, SCENARIOS

DEFAULT_PREFIX = "ebl"
DEFAULT_BASE = "198.18.0.0"
DEFAULT_STATE_DIR = Path("/var/lib/ebpfdiag/lab")
STATE_DIR_ENV = "EBPFDIAG_LAB_DIR"
LAB_USER = "ebpfdiag-lab"
#: A user without sudo rights of its own, in the group a runner is installed for.
DIAG_USER = "diag"
DIAG_GROUP = "ebpfdiag"
INVENTORY_MARKER = "# ebpfdiag-lab: written by 'ebpfdiag lab up'; 'ebpfdiag lab down' removes it"
PYTHON = "/usr/bin/python3"
LAB_RANGE = ipaddress.ip_network("198.18.0.0/15")


@dataclass
class LabHost:
    """One lab host: its namespace, management address and data-plane interfaces."""

    name: str
    role: str
    netns: str
    mgmt_address: str
    mgmt_interface: str = "mgmt0"
    interfaces: dict[str, str] = field(default_factory=dict)  # name -> address/prefix
    port: int = 22

    @property
    def data_address(self) -> str | None:
        """The host's first data-plane address (without prefix length)."""
        for cidr in self.interfaces.values():
            return cidr.split("/")[0]
        return None


@dataclass
class LabState:
    """Everything tests, scenarios and ``lab status`` need to know about a running lab."""

    prefix: str
    state_dir: str
    hosts: dict[str, LabHost]
    vip: str
    ports: dict[str, int]
    user: str
    inventory: str | None
    known_hosts: str
    client_key: str
    servers: list[str]
    mgmt_bridge: str
    #: the same hosts for ``diag`` (None in the state of a lab made before it existed)
    diag_inventory: str | None = None
    diag_user: str = DIAG_USER

    def host(self, name: str) -> LabHost:
        return self.hosts[name]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LabState":
        hosts = {name: LabHost(**h) for name, h in data["hosts"].items()}
        return cls(**{**data, "hosts": hosts})


def default_state_dir() -> Path:
    return Path(os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def invoking_user() -> pwd.struct_passwd:
    """The user behind ``sudo`` (whose config the inventory belongs in), else ourselves."""
    name = os.environ.get("SUDO_USER")
    if os.geteuid() == 0 and name and name != "root":
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(name)
    return pwd.getpwuid(os.geteuid())


def default_inventory_path() -> Path:
    return Path(invoking_user().pw_dir) / ".config" / "ebpfdiag" / "inventory.yaml"


def diag_inventory_path(inventory: Path) -> Path:
    """``inventory.yaml`` -> ``inventory-diag.yaml``, next to it."""
    return inventory.with_name(f"{inventory.stem}-diag{inventory.suffix or '.yaml'}")


def lab_wrote(path: Path) -> bool:
    """True if ``path`` carries the lab's marker comment on its first line."""
    try:
        with path.open() as fh:
            return fh.readline().rstrip("\n") == INVENTORY_MARKER
    except OSError:
        return False


class Lab:
    """Build, inspect and remove the lab. ``up`` and ``down`` are idempotent."""

    def __init__(
        self,
        *,
        state_dir: Path | None = None,
        servers: int | None = None,
        prefix: str = DEFAULT_PREFIX,
        base: str = DEFAULT_BASE,
        inventory_out: Path | None = None,
        link_headers: bool = False,
    ) -> None:
        self.state_dir = Path(state_dir) if state_dir else default_state_dir()
        self.state_path = self.state_dir / "state.json"
        recorded = state.load(self.state_path)
        # A running lab keeps its own shape; the arguments only matter for a new one.
        self.prefix = recorded.get("prefix", prefix)
        self.base = ipaddress.ip_address(recorded.get("base", base))
        self.servers = int(recorded.get("server_count", servers or 1))
        if servers is not None and servers != self.servers:
            raise UsageError(
                f"the lab is up with {self.servers} server(s); run 'ebpfdiag lab down' first"
            )
        if not re.fullmatch(r"[a-z][a-z0-9]{0,3}", self.prefix):
            raise UsageError(f"lab prefix {self.prefix!r}: 1-4 lower-case letters and digits")
        if not 1 <= self.servers <= 50:
            raise UsageError("--servers must be between 1 and 50")
        if ipaddress.ip_network(f"{self.base}/22", strict=False).network_address != self.base:
            raise UsageError(f"lab base {self.base} must start a /22")
        if not ipaddress.ip_network(f"{self.base}/22").subnet_of(LAB_RANGE):
            raise UsageError(f"lab base {self.base} is outside {LAB_RANGE}")
        recorded_inventory = recorded.get("inventory")
        self.inventory_out = inventory_out or (
            Path(recorded_inventory) if recorded_inventory else None
        )
        self.link_headers = link_headers
        self.messages: list[str] = []

    # -- plan -----------------------------------------------------------------------------

    def _net(self, offset: int) -> ipaddress.IPv4Network:
        return ipaddress.ip_network(f"{self.base + offset * 256}/24")

    def plan(self) -> LabState:
        """The lab as it will be (or is): pure, so it can describe a lab that is down."""
        mgmt, client_net, server_net = self._net(0), self._net(1), self._net(2)
        names = ["server"] if self.servers == 1 else [f"server{i + 1}" for i in range(self.servers)]
        hosts: dict[str, LabHost] = {}
        for i, (name, role) in enumerate([("client", "client"), ("lb", "lb")] + [
            (n, "server") for n in names
        ]):  # fmt: skip
            hosts[name] = LabHost(
                name=name,
                role=role,
                netns=f"{self.prefix}-{name}",
                mgmt_address=str(mgmt[10 + i]),
            )
        hosts["client"].interfaces = {"eth0": f"{client_net[10]}/24"}
        hosts["lb"].interfaces = {
            "to-client": f"{client_net[1]}/24",
            "br-servers": f"{server_net[1]}/24",
        }
        for i, name in enumerate(names):
            hosts[name].interfaces = {"eth0": f"{server_net[10 + i]}/24"}
        inventory = self.inventory_out or default_inventory_path()
        return LabState(
            prefix=self.prefix,
            state_dir=str(self.state_dir),
            hosts=hosts,
            vip=str(self._net(3)[1]),
            ports={name: s.port for name, s in SCENARIOS.items()},
            user=LAB_USER,
            inventory=str(inventory),
            known_hosts=str(self.state_dir / "known_hosts"),
            client_key=str(self.state_dir / "id_ed25519"),
            servers=names,
            mgmt_bridge=f"{self.prefix}-mgmt",
            diag_inventory=str(diag_inventory_path(inventory)),
        )

    # -- up -------------------------------------------------------------------------------

    def up(self) -> LabState:
        """Create (or complete) the lab and write inventory and known_hosts."""
        prereqs.check_root()
        prereqs.check_packages()
        lab = self.plan()
        self._refuse_foreign_inventory(Path(lab.inventory))
        self._refuse_foreign_inventory(Path(lab.diag_inventory))
        record = state.load(self.state_path)
        record.update({"prefix": self.prefix, "base": str(self.base), "server_count": self.servers})
        record.setdefault("owner", f"lab-{self.prefix}")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.state_dir.chmod(0o755)
        state.save(self.state_path, record)

        messages, made = prereqs.ensure_headers(self.link_headers)
        self.messages += messages
        if made:
            record["headers"] = made
            state.save(self.state_path, record)
        if not record.get("tracefs_mounted"):
            messages, mounted = prereqs.ensure_tracefs()
            self.messages += messages
            if mounted:
                record["tracefs_mounted"] = True
                state.save(self.state_path, record)

        self._check_networks_free(lab)
        record["users"] = [LAB_USER, DIAG_USER]
        record["mounts"] = True
        state.save(self.state_path, record)
        users.acquire(LAB_USER, record["owner"])
        users.acquire(DIAG_USER, record["owner"], sudo=False, group=DIAG_GROUP)
        hostfs.acquire(record["owner"])

        sshd.generate_key(Path(lab.client_key), f"ebpfdiag-lab-{self.prefix}")
        keys = self.state_dir / "authorized_keys"
        shutil.copyfile(Path(lab.client_key).with_suffix(".pub"), keys)
        sshd.check_readable(keys)

        mgmt_cidr = f"{self._net(0)[1]}/24"
        netns.bridge_add(lab.mgmt_bridge, mgmt_cidr)
        for host in lab.hosts.values():
            netns.netns_add(host.netns)
            netns.veth_into_netns(
                f"{self.prefix}-{host.name}",
                host.netns,
                host.mgmt_interface,
                f"{host.mgmt_address}/24",
                bridge=lab.mgmt_bridge,
            )
        self._data_plane(lab)
        self._load_balancer(lab)
        for host in lab.hosts.values():
            self._start_sshd(host, keys)
        deadline = time.monotonic() + 20
        for host in lab.hosts.values():
            pid_file, config = self._sshd_paths(host)
            sshd.wait_ready(host.mgmt_address, host.port, pid_file, config, deadline)
        self._write_known_hosts(lab)
        record["inventory"] = lab.inventory
        record["diag_inventory"] = lab.diag_inventory
        state.save(self.state_path, record)
        self._write_inventory(lab)
        record["lab"] = lab.to_dict()
        state.save(self.state_path, record)
        return lab

    def _refuse_foreign_inventory(self, path: Path) -> None:
        if path.exists() and not lab_wrote(path):
            raise UsageError(
                f"{path} exists and was not written by the lab; not overwriting it "
                "(choose another file with --inventory-out PATH)"
            )

    def _check_networks_free(self, lab: LabState) -> None:
        """Refuse if the management subnet is already on another root-namespace interface."""
        mgmt = self._net(0)
        for line in netns.run(["ip", "-o", "-4", "addr", "show"]).splitlines():
            fields = line.split()
            if len(fields) < 4 or fields[1] == lab.mgmt_bridge:
                continue
            if ipaddress.ip_interface(fields[3]).network.overlaps(mgmt):
                raise LabError(f"subnet {mgmt} is already used by {fields[1]}")

    def _data_plane(self, lab: LabState) -> None:
        client, lb = lab.hosts["client"], lab.hosts["lb"]
        if not netns.link_exists("eth0", client.netns):
            netns.run(["ip", "-n", lb.netns, "link", "del", "to-client"], check=False)
            netns.run(["ip", "-n", lb.netns, "link", "add", "to-client", "type", "veth",
                       "peer", "name", "eth0", "netns", client.netns])  # fmt: skip
        _address(lb.netns, "to-client", lb.interfaces["to-client"])
        _address(client.netns, "eth0", client.interfaces["eth0"])
        netns.route_replace(client.netns, "default", lb.interfaces["to-client"].split("/")[0])

        if not netns.link_exists("br-servers", lb.netns):
            netns.run(["ip", "-n", lb.netns, "link", "add", "br-servers", "type", "bridge"])
        _address(lb.netns, "br-servers", lb.interfaces["br-servers"])
        gateway = lb.interfaces["br-servers"].split("/")[0]
        for index, name in enumerate(lab.servers, start=1):
            server = lab.hosts[name]
            port = f"to-server{index}" if len(lab.servers) > 1 else "to-server"
            if not netns.link_exists("eth0", server.netns):
                netns.run(["ip", "-n", lb.netns, "link", "del", port], check=False)
                netns.run(["ip", "-n", lb.netns, "link", "add", port, "type", "veth",
                           "peer", "name", "eth0", "netns", server.netns])  # fmt: skip
            netns.run(["ip", "-n", lb.netns, "link", "set", port, "master", "br-servers", "up"])
            _address(server.netns, "eth0", server.interfaces["eth0"])
            netns.route_replace(server.netns, "default", gateway)
        netns.run(["ip", "-n", lb.netns, "addr", "replace", f"{lab.vip}/32", "dev", "lo"])
        netns.run(netns.ns_exec_argv(lb.netns, ["sysctl", "-qw", "net.ipv4.ip_forward=1"]))

    def _load_balancer(self, lab: LabState) -> None:
        """nftables on lb: DNAT across all servers, masquerade, and the reject port.

        Scenarios that rewrite the VIP port get a DNAT rule of their own (and a masquerade
        with random source ports, if they ask for it) ahead of the shared rules; a scenario
        that moves a flow between servers inserts its own DNAT rules while it runs.
        """
        lb = lab.hosts["lb"]
        addresses = [lab.hosts[name].data_address for name in lab.servers]
        if len(addresses) == 1:
            target = addresses[0]
        else:
            pairs = ", ".join(f"{i} : {a}" for i, a in enumerate(addresses))
            target = f"numgen inc mod {len(addresses)} map {{ {pairs} }}"
        forwarded = [s for s in SCENARIOS.values() if s.forwarded and not s.moves]
        shared = sorted(s.port for s in forwarded if not s.backend_port)
        rejected = sorted(s.port for s in SCENARIOS.values() if not s.forwarded)
        dnat = [
            f"ip daddr {lab.vip} tcp dport {s.port} dnat to {target} : {s.backend_port}"
            for s in forwarded
            if s.backend_port
        ]
        dnat.append(f"ip daddr {lab.vip} tcp dport {{ {', '.join(map(str, shared))} }} "
                    f"dnat to {target}")  # fmt: skip
        snat = [
            f'oifname "br-servers" ct original ip daddr {lab.vip} meta l4proto tcp '
            f"ct original proto-dst {s.port} masquerade {s.masquerade}"
            for s in forwarded
            if s.masquerade != "keep-port"
        ]
        snat.append('oifname "br-servers" masquerade')
        nl = "\n        "
        rules = f"""
table ip {NFT_TABLE}
delete table ip {NFT_TABLE}
table ip {NFT_TABLE} {{
    chain input {{
        type filter hook input priority filter; policy accept;
        ip daddr {lab.vip} tcp dport {{ {", ".join(map(str, rejected))} }} reject with tcp reset
    }}
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        {nl.join(dnat)}
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        {nl.join(snat)}
    }}
}}
"""
        netns.run(netns.ns_exec_argv(lb.netns, ["nft", "-f", "-"]), input=rules)

    def _sshd_paths(self, host: LabHost) -> tuple[Path, Path]:
        hostdir = self.state_dir / "hosts" / host.name
        return hostdir / "sshd.pid", hostdir / "sshd_config"

    def _start_sshd(self, host: LabHost, keys: Path) -> None:
        pid_file, config = self._sshd_paths(host)
        hostdir = config.parent
        hostdir.mkdir(parents=True, exist_ok=True)
        host_key = sshd.generate_key(hostdir / "ssh_host_ed25519_key", f"{host.name}-hostkey")
        sshd.write_config(
            config,
            port=host.port,
            host_key=host_key,
            pid_file=pid_file,
            authorized_keys=keys,
            users=[LAB_USER, DIAG_USER],
        )
        mounts = hostfs.prelude(hostfs.prepare(hostdir))
        sshd.start(host.netns, config, pid_file, hostdir / "sshd.log", mounts)

    def _write_known_hosts(self, lab: LabState) -> None:
        lines = []
        for host in lab.hosts.values():
            key = self.state_dir / "hosts" / host.name / "ssh_host_ed25519_key"
            lines.append(sshd.known_hosts_line(host.mgmt_address, host.port, key))
        Path(lab.known_hosts).write_text("\n".join(lines) + "\n")

    def _write_inventory(self, lab: LabState) -> None:
        hosts = {}
        for host in lab.hosts.values():
            hosts[host.name] = {
                "address": host.mgmt_address,
                "port": host.port,
                "labels": {"role": host.role, "netns": host.netns},
            }
        inventory = {
            "defaults": {
                "user": lab.user,
                "identity_file": lab.client_key,
                "known_hosts": lab.known_hosts,
                "sudo": True,
                "python": PYTHON,
                "connect_timeout": 5,
            },
            "hosts": hosts,
            "groups": {"lab": list(lab.hosts), "servers": list(lab.servers)},
        }
        path = Path(lab.inventory)
        diag = Path(lab.diag_inventory or diag_inventory_path(path))
        owner = invoking_user()
        created = _mkdirs(path.parent)
        path.write_text(INVENTORY_MARKER + "\n" + yaml.safe_dump(inventory, sort_keys=False))
        inventory["defaults"]["user"] = lab.diag_user
        diag.write_text(INVENTORY_MARKER + "\n" + yaml.safe_dump(inventory, sort_keys=False))
        # The invoking user (behind sudo) runs the controller: let them read what it needs.
        for item in [path, diag, Path(lab.client_key), Path(lab.known_hosts), *created]:
            os.chown(item, owner.pw_uid, owner.pw_gid)

    # -- down -----------------------------------------------------------------------------

    def down(self) -> list[str]:
        """Remove everything the lab made; returns what was removed. Idempotent."""
        prereqs.check_root()
        record = state.load(self.state_path)
        removed: list[str] = []
        lab = self.plan()
        namespaces = {h.netns for h in lab.hosts.values()}
        namespaces |= {n for n in netns.netns_list() if n.startswith(f"{self.prefix}-")}
        for name in sorted(namespaces):
            if netns.netns_exists(name):
                netns.netns_delete(name)
                removed.append(f"netns {name}")
        netns.kill_pids(netns.pids_with_arg(str(self.state_dir / "hosts") + "/"))
        for link in netns.link_names():
            if link.startswith(f"{self.prefix}-"):
                netns.link_delete(link)
                removed.append(f"link {link}")
        owner = record.get("owner", f"lab-{self.prefix}")
        for user in sorted({*record.get("users", []), *users.owned_by(owner)}):
            existed = users.user_exists(user)
            users.release(user, owner)
            if existed and not users.user_exists(user):
                removed.append(f"user {user}")
        if record.get("mounts"):
            removed += hostfs.release(owner)
        for key in ("inventory", "diag_inventory"):
            inventory = record.get(key)
            if inventory and lab_wrote(Path(inventory)):
                Path(inventory).unlink()
                removed.append(f"file {inventory}")
        removed += prereqs.remove_headers(record.get("headers", {}))
        if record.get("tracefs_mounted"):
            removed += prereqs.unmount_tracefs()
        if self.state_path.exists() or (
            self.state_dir.is_dir() and not any(self.state_dir.iterdir())
        ):
            hostfs.unpin(self.state_dir / "hosts")
            shutil.rmtree(self.state_dir)
            removed.append(f"dir {self.state_dir}")
        return removed

    # -- status ---------------------------------------------------------------------------

    def state(self) -> LabState | None:
        """The running lab's recorded state, or None if the lab is not (fully) up."""
        data = state.load(self.state_path).get("lab")
        return LabState.from_dict(data) if data else None

    def status(self) -> dict[str, Any]:
        """Hosts with addresses and sshd state, and the LB rules, as plain data."""
        record = state.load(self.state_path)
        lab = self.state() or self.plan()
        hosts = []
        for host in lab.hosts.values():
            pid_file, config = self._sshd_paths(host)
            pid = sshd.read_pid(pid_file, config)
            hosts.append(
                {
                    "name": host.name,
                    "role": host.role,
                    "netns": host.netns,
                    "netns_exists": netns.netns_exists(host.netns),
                    "mgmt_address": host.mgmt_address,
                    "interfaces": host.interfaces,
                    "sshd_pid": pid,
                    "sshd": "running" if pid else "stopped",
                }
            )
        lb = lab.hosts["lb"]
        rules = ""
        if netns.netns_exists(lb.netns):
            argv = netns.ns_exec_argv(lb.netns, ["nft", "list", "table", "ip", NFT_TABLE])
            rules = netns.run(argv, check=False)
        return {
            "up": bool(record.get("lab")),
            "state_dir": str(self.state_dir),
            "prefix": lab.prefix,
            "vip": lab.vip,
            "ports": lab.ports,
            "inventory": record.get("inventory"),
            "diag_inventory": record.get("diag_inventory"),
            "known_hosts": lab.known_hosts,
            "client_key": lab.client_key,
            "hosts": hosts,
            "lb_rules": rules,
        }


def _address(ns: str, dev: str, cidr: str) -> None:
    netns.run(["ip", "-n", ns, "addr", "replace", cidr, "dev", dev])
    netns.run(["ip", "-n", ns, "link", "set", dev, "up"])


def _mkdirs(path: Path) -> list[Path]:
    """Create ``path`` and missing parents; return the directories that were created."""
    created = []
    for parent in [*reversed(path.parents), path]:
        if not parent.exists():
            parent.mkdir()
            created.append(parent)
    return created
