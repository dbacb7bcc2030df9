"""A trace's packet sightings as a pcapng file, for Wireshark/tshark.

The hosts report headers, not bytes: each ``packet`` record becomes an Enhanced Packet
Block whose IPv4/IPv6 and TCP headers are rebuilt from its fields (addresses, ports, seq,
ack, flags, window, IP ID, TTL). The captured length is the headers alone; the original
length adds the payload the host counted, so Wireshark follows sequence numbers as if the
payload had been cut by a snap length. The TCP checksum is left 0 (the payload is unknown);
IPv4 packets carry DF, as Linux TCP sends them.

One Interface Description Block per ``host:interface`` (named so; its description names
the host, the interface and the TC hook the host attached), ns timestamps
(``if_tsresol`` 9) taken from the controller-aligned ``ts`` of each record, so packets of
all hosts share one time axis. Each packet's comment says which host saw it, in which
direction (the hook), and why the tool reported it.

The format is small and stable (IETF draft-ietf-opsawg-pcapng), so it is written with
``struct`` here rather than through a library.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ebpfdiag import __version__

#: LINKTYPE_RAW: the packet starts with its IPv4 or IPv6 header (the version nibble says which)
LINKTYPE_RAW = 101

_SHB, _IDB, _EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_END, _OPT_COMMENT = 0, 1
_SHB_USERAPPL = 4
_IF_NAME, _IF_DESCRIPTION, _IF_TSRESOL = 2, 3, 9
_TCP_HEADER = 20
_IP_DF = 0x4000


@dataclass
class PcapStats:
    """What went into the file: packets per ``host:interface`` and what was left out."""

    packets: dict[str, int] = field(default_factory=dict)
    #: packet records of a host whose clock was never sampled: no aligned ``ts`` to place them
    unaligned: int = 0
    #: packet records whose fields make no header (a host's malformed output)
    malformed: int = 0

    @property
    def written(self) -> int:
        return sum(self.packets.values())


def write_pcap(
    path: Path | str, events: Iterable[Mapping], hosts: Mapping[str, Mapping | None]
) -> PcapStats:
    """Write every ``packet`` record of ``events`` (with ``host`` and aligned ``ts``) to
    ``path`` in time order; ``hosts`` maps each host name to its ``hello`` (or None), whose
    ``interfaces`` get an interface block even when they saw nothing and whose TC attach
    kind goes into each interface's description. Raises OSError when ``path`` cannot be
    written."""
    packets = [e for e in events if e.get("type") == "packet" and e.get("host")]
    stats = PcapStats(unaligned=sum(1 for e in packets if not isinstance(e.get("ts"), int)))
    packets = sorted((e for e in packets if isinstance(e.get("ts"), int)), key=lambda e: e["ts"])
    interfaces: dict[tuple[str, str], int] = {}
    blocks = [_section()]

    def interface(host: str, ifname: str) -> int:
        key = (host, ifname)
        if key not in interfaces:
            interfaces[key] = len(interfaces)
            stats.packets[f"{host}:{ifname}"] = 0
            blocks.append(_interface(host, ifname, hosts.get(host)))
        return interfaces[key]

    for host, hello in hosts.items():
        for ifname in (hello or {}).get("interfaces") or []:
            interface(host, str(ifname))
    for rec in packets:
        try:
            headers = packet_headers(rec)
            original = len(headers) + int(rec["len"])
        except (KeyError, TypeError, ValueError, struct.error):
            stats.malformed += 1
            continue
        ifname = str(rec.get("ifname") or rec.get("ifindex"))
        index = interface(rec["host"], ifname)
        comment = f"host={rec['host']} hook={rec.get('dir', '?')} why={rec.get('why', '?')}"
        if "clock_error_ns" in rec:
            comment += f" clock_error_ns={rec['clock_error_ns']}"
        blocks.append(_packet(index, rec["ts"], headers, original, comment))
        stats.packets[f"{rec['host']}:{ifname}"] += 1
    Path(path).write_bytes(b"".join(blocks))
    return stats


def packet_headers(rec: Mapping) -> bytes:
    """The IPv4 or IPv6 header and the 20-byte TCP header of one sighting."""
    tcp = struct.pack(
        "!HHIIBBHHH",
        rec["sport"],
        rec["dport"],
        rec["seq"] & 0xFFFFFFFF,
        rec["ack"] & 0xFFFFFFFF,
        (_TCP_HEADER // 4) << 4,
        rec["flags"] & 0xFF,
        rec.get("win", 0) & 0xFFFF,
        0,  # checksum: the payload is not known
        0,
    )
    src, dst = ipaddress.ip_address(rec["saddr"]), ipaddress.ip_address(rec["daddr"])
    ttl = rec.get("ttl") or 64
    if src.version == 6:
        first = (6 << 28).to_bytes(4, "big")
        ip = first + struct.pack("!HBB", _TCP_HEADER + rec["len"], 6, ttl)
        return ip + src.packed + dst.packed + tcp
    total = 20 + _TCP_HEADER + rec["len"]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, total & 0xFFFF, (rec.get("ipid") or 0) & 0xFFFF,
                     _IP_DF, ttl, 6, 0, src.packed, dst.packed)  # fmt: skip
    checksum = _checksum(ip)
    return ip[:10] + struct.pack("!H", checksum) + ip[12:] + tcp


def _checksum(data: bytes) -> int:
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def _options(*opts: bytes) -> bytes:
    return b"".join(opts) + _option(_OPT_END, b"")


def _block(kind: int, body: bytes) -> bytes:
    body += b"\0" * (-len(body) % 4)
    length = len(body) + 12
    return struct.pack("<II", kind, length) + body + struct.pack("<I", length)


def _section() -> bytes:
    head = struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1)  # v1.0, section length unknown
    return _block(_SHB, head + _options(_option(_SHB_USERAPPL, f"ebpfdiag {__version__}".encode())))


def _interface(host: str, ifname: str, hello: Mapping | None) -> bytes:
    tc = ((hello or {}).get("attach") or {}).get("tc") or {}
    description = f"host {host}, interface {ifname}, hook {tc.get('kind') or 'unknown'}"
    opts = _options(
        _option(_IF_NAME, f"{host}:{ifname}".encode()),
        _option(_IF_DESCRIPTION, description.encode()),
        _option(_IF_TSRESOL, bytes([9])),
    )
    return _block(_IDB, struct.pack("<HHI", LINKTYPE_RAW, 0, 0) + opts)


def _packet(interface: int, ts: int, data: bytes, original: int, comment: str) -> bytes:
    head = struct.pack("<IIIII", interface, ts >> 32, ts & 0xFFFFFFFF, len(data), original)
    padded = data + b"\0" * (-len(data) % 4)
    return _block(_EPB, head + padded + _options(_option(_OPT_COMMENT, comment.encode())))


def save_pcap(
    path: Path,
    events: Iterable[Mapping],
    hosts: Mapping[str, Mapping | None],
    error: Callable[[str], None],
) -> bool:
    """``--pcap``: write the file; a failure or packets left out are told through ``error``
    (one line each). False when the file could not be written."""
    try:
        stats = write_pcap(path, events, hosts)
    except OSError as exc:
        error(f"cannot write {path}: {exc.strerror}")
        return False
    if stats.unaligned:
        error(f"{path}: {stats.unaligned} packets left out (their host's clock was never sampled)")
    if stats.malformed:
        error(f"{path}: {stats.malformed} packets left out (malformed records)")
    return True
