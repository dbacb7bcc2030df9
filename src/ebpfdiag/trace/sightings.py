"""Host records -> compact sightings: packets seen at one point, resets seen by one kernel.

A million packet records must fit in memory, so each becomes a ``__slots__`` object with
interned strings. Records that cannot be read are counted, never fatal; records of other
types are ignored, so a whole recorded stream (or the CLI's own NDJSON) can be replayed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

FIN, SYN, RST, PSH, ACK = 1, 2, 4, 8, 16
_FLAG_NAMES = ((1, "FIN"), (2, "SYN"), (4, "RST"), (8, "PSH"), (16, "ACK"), (32, "URG"),
               (64, "ECE"), (128, "CWR"))  # fmt: skip
SEND_RESET = "tcp_send_reset"
RECEIVE_RESET = "tcp_receive_reset"
WILDCARD_ADDRS = frozenset({"0.0.0.0", "::"})
SEQ_SPACE = 1 << 32
DROP = "drop"
"""The ``dir`` of a packet's last sighting: its host's kernel freed it as a drop."""
_DIRS = {"egress": "egress", "ingress": "ingress", DROP: DROP}


def flag_names(flags: int) -> str:
    """TCP flag byte -> "SYN|ACK" (tables show names, JSON keeps the number)."""
    return "|".join(name for bit, name in _FLAG_NAMES if flags & bit) or "-"


def _opt_int(value: Any) -> int | None:
    return None if value is None else int(value)


class Sighting:
    """One packet at one point (host, interface, direction), as that host's clock saw it;
    direction ``drop`` is the point where that host's kernel dropped it.

    ``node`` is the connection view (host, 4-tuple, incarnation) it belongs to and ``occ``
    the occurrence (one transmission across hosts); both are set by later passes. ``pt``
    and ``apt`` are the sampled points of tracers that sample bytes (tcp_latency): the
    lowest chosen point in the payload, the highest one newly acknowledged (else None).
    """

    __slots__ = ("host", "ifname", "dir", "ts_ns", "flags", "seq", "ack", "length", "ipid",
                 "saddr", "sport", "daddr", "dport", "why", "node", "occ", "pt",
                 "apt")  # fmt: skip

    def __init__(self, rec: Mapping[str, Any], host: str, intern: dict[str, str]) -> None:
        # runs once per packet record (a million per trace): no checks that the lookups
        # below do anyway (a bad ``dir`` is a KeyError, counted as malformed); the ints
        # JSON gives are taken as they are, anything else goes through int() (a call costs
        # more than the type test); methods are called in place, which CPython 3.11 does
        # faster than through a bound-method alias
        self.host = host
        ifname = rec["ifname"]
        self.ifname = intern.setdefault(ifname, ifname)
        self.dir = _DIRS[rec["dir"]]
        self.ts_ns = v if type(v := rec["ts_ns"]) is int else int(v)
        self.flags = v if type(v := rec["flags"]) is int else int(v)
        self.seq = (v if type(v := rec["seq"]) is int else int(v)) % SEQ_SPACE
        self.ack = (v if type(v := rec["ack"]) is int else int(v)) % SEQ_SPACE
        self.length = v if type(v := rec["len"]) is int else int(v)
        self.ipid = v if type(v := rec.get("ipid") or 0) is int else int(v)
        saddr, daddr = rec["saddr"], rec["daddr"]
        if type(saddr) is not str or type(daddr) is not str:  # ordered and printed later
            raise TypeError("addresses must be strings")
        self.saddr = intern.setdefault(saddr, saddr)
        self.sport = v if type(v := rec["sport"]) is int else int(v)
        self.daddr = intern.setdefault(daddr, daddr)
        self.dport = v if type(v := rec["dport"]) is int else int(v)
        why = rec.get("why")
        self.why = intern.setdefault(why, why) if why else None
        self.node = -1
        self.occ = -1
        v = rec.get("pt")
        self.pt = None if v is None else (v if type(v) is int else int(v)) % SEQ_SPACE
        v = rec.get("apt")
        self.apt = None if v is None else (v if type(v) is int else int(v)) % SEQ_SPACE

    @property
    def tuple(self) -> tuple[str, int, str, int]:
        return (self.saddr, self.sport, self.daddr, self.dport)


_DROP_FIELDS = ("ts_ns", "ts", "flags", "seq", "ack", "len", "ipid", "saddr", "sport", "daddr",
                "dport")  # fmt: skip


def drop_sighting(rec: Mapping[str, Any]) -> dict[str, Any] | None:
    """A drop tracer's ``drop`` record as the packet record of its last sighting (``dir``
    "drop", on the device the kernel freed it from), so the matcher joins it to the same
    packet on other hosts; None when it has no TCP fields to match on."""
    if any(rec.get(key) is None for key in ("seq", "ack", "flags", "sport", "dport")):
        return None
    out = {key: rec.get(key) for key in _DROP_FIELDS}
    out.update(type="packet", host=rec.get("host"), dir=DROP, ifname=rec.get("ifname") or "-")
    return out


class ResetRecord:
    """One tcp_send_reset / tcp_receive_reset record, local side first.

    Version 2 of the remote tracer adds the RST's ``seq``/``ack`` and where the addresses
    came from (``tuple_from``: skb, socket, tracepoint); addresses may be null then. Version
    1 on Linux 6.18 records a listening socket's wildcard addresses (``0.0.0.0:PORT >
    0.0.0.0:0``). ``sighting`` is the RST packet it was tied to, ``node`` its connection.
    """

    __slots__ = ("host", "ts_ns", "probe", "saddr", "sport", "daddr", "dport", "state",
                 "reason", "pid", "comm", "seq", "ack", "tuple_from", "sk_kind", "sighting",
                 "node")  # fmt: skip

    def __init__(self, rec: Mapping[str, Any], host: str) -> None:
        self.host = host
        self.ts_ns = int(rec["ts_ns"])
        self.probe = rec["probe"]
        if self.probe not in (SEND_RESET, RECEIVE_RESET):
            raise ValueError(f"bad probe {self.probe!r}")
        self.saddr = rec.get("saddr")
        self.sport = int(rec.get("sport") or 0)
        self.daddr = rec.get("daddr")
        self.dport = int(rec.get("dport") or 0)
        self.state = rec.get("state")
        self.reason = rec.get("reason")
        self.pid = rec.get("pid")
        self.comm = rec.get("comm")
        self.seq = _opt_int(rec.get("seq"))
        self.ack = _opt_int(rec.get("ack"))
        self.tuple_from = rec.get("tuple_from")
        self.sk_kind = rec.get("sk_kind")
        self.sighting: Sighting | None = None
        self.node = -1

    @property
    def full_tuple(self) -> bool:
        """Both ends known: no null or wildcard address, no port 0 (a listener's view)."""
        return (
            self.saddr not in WILDCARD_ADDRS
            and self.daddr not in WILDCARD_ADDRS
            and self.saddr is not None
            and self.daddr is not None
            and self.sport > 0
            and self.dport > 0
        )

    @property
    def tuple(self) -> tuple[str | None, int, str | None, int]:
        return (self.saddr, self.sport, self.daddr, self.dport)


def send_probe_state(info: Mapping[str, Any] | None) -> str | None:
    """From a host's ``hello`` (or the CLI's ``host`` record): "ok" when tcp_send_reset is
    attached, "missing" when listed as missing, None when nothing says."""
    if not info:
        return None
    missing = {m.get("probe") for m in info.get("missing") or () if isinstance(m, Mapping)}
    if SEND_RESET in missing:
        return "missing"
    if (info.get("attach") or {}).get(SEND_RESET):
        return "ok"
    return None


class Recorded:
    """The first pass over a stream: sightings, reset records and what hosts said.

    Records whose type is in ``keep`` (a question's own evidence, e.g. tcp_latency's
    ``counts`` or ``recv``) are kept as they are in ``kept``, in stream order."""

    def __init__(self, keep: Iterable[str] = ()) -> None:
        self.keep = frozenset(keep)
        self.kept: list[Mapping[str, Any]] = []
        self.sightings: list[Sighting] = []
        self.resets: list[ResetRecord] = []
        self.probes: dict[str, str | None] = {}
        self.lost: dict[tuple[str, str], int] = defaultdict(int)
        self.ts_hints: dict[str, int] = {}
        self.malformed = 0
        self._intern: dict[str, str] = {}
        self._hosts: set[str] = set()

    @property
    def hosts(self) -> set[str]:
        """Hosts with a packet or a reset record."""
        return set(self._hosts)

    def add(self, rec: Mapping[str, Any]) -> None:
        kind = rec.get("type")
        host = rec.get("host")
        if not isinstance(host, str) or not isinstance(kind, str):
            return
        if kind in self.keep:
            self.kept.append(rec)
        if kind not in ("packet", "reset", "hello", "host", "lost"):
            return
        host = self._intern.setdefault(host, host)
        try:
            if kind == "packet":
                s = Sighting(rec, host, self._intern)
                self.sightings.append(s)
                self._hosts.add(host)
                if host not in self.ts_hints:
                    self._hint(rec, host, s.ts_ns)
            elif kind == "reset":
                r = ResetRecord(rec, host)
                self.resets.append(r)
                self._hosts.add(host)
                self._hint(rec, host, r.ts_ns)
            elif kind in ("hello", "host"):
                self.hello(host, rec)
            else:
                self.lost[(host, str(rec.get("source")))] += int(rec.get("count") or 0)
        except (KeyError, TypeError, ValueError):
            self.malformed += 1

    def hello(self, host: str, info: Mapping[str, Any]) -> None:
        state = send_probe_state(info)
        if state is not None or host not in self.probes:
            self.probes[host] = state

    def _hint(self, rec: Mapping[str, Any], host: str, ts_ns: int) -> None:
        """The controller's ``ts`` is only a stand-in clock for hosts without estimates; a
        record that arrived before any estimate carries ``ts: null`` and is kept as is."""
        ts = rec.get("ts")
        if host not in self.ts_hints and isinstance(ts, int):
            self.ts_hints[host] = ts - ts_ns


def collect(
    events: Iterable[Mapping[str, Any]],
    hellos: Mapping[str, Mapping[str, Any]] | None = None,
    keep: Iterable[str] = (),
) -> Recorded:
    """Read a stream once; ``hellos`` are what the session kept of each host's ``hello``,
    ``keep`` the other record types to keep as they are."""
    recorded = Recorded(keep)
    for host, info in (hellos or {}).items():
        recorded.hello(host, info)
    # packets of a host already placed in time go straight to a Sighting (a million per
    # trace); everything else through Recorded.add
    intern, hinted, sightings = recorded._intern, recorded.ts_hints, recorded.sightings
    for rec in events:
        host = rec.get("host")
        if rec.get("type") == "packet" and isinstance(host, str) and host in hinted:
            try:
                sightings.append(Sighting(rec, intern.get(host, host), intern))
            except (KeyError, TypeError, ValueError):
                recorded.malformed += 1
        else:
            recorded.add(rec)
    return recorded
