"""Folded run-script output: hosts that printed the same thing share one block.

At a thousand hosts nobody reads one line per host; what a reader wants is how many
distinct answers there are and which hosts gave each (ClusterShell's ``clush -b``).
A host's whole stdout is one answer; its stderr is folded the same way on its own, so
stdout stays data. Failures fold by their message once the host's own name and address
are taken out of it, so hosts that failed for the same reason land in one line.
Everything here is pure: the CLI feeds lines and results in and prints what comes out.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ebpfdiag.hostexpr import compress_names

#: Above this many hosts run-script folds by default (``--no-fold`` lists every line):
#: 16 prefixed streams still read as a list, beyond that identical lines drown the rest.
FOLD_ABOVE = 16

#: what a host's own name or address becomes where a message needs it to stay readable
HOST_PLACEHOLDER = "<host>"

#: a word that may be a host (a run of name characters, or ``[address]``, and a port),
#: with the little word that introduces it when there is one: "on web07", "by ops@addr:22"
_CANDIDATE = re.compile(
    r"(?P<lead>\s+(?:on|by|from|for|to|at)\s+(?:[\w.-]+@)?)?"
    r"(?:\[(?P<bracketed>[^\]\s]+)\]|(?P<word><host>|[\w.-]*\w))(?::\d+)?"
)
_PLAIN = re.compile(r"[\w.-]*\w")


@dataclass(frozen=True)
class Block:
    """One distinct output and the hosts (in run order) that printed exactly it."""

    hosts: tuple[str, ...]
    lines: tuple[str, ...]

    @property
    def nodeset(self) -> str:
        return compress_names(self.hosts)


@dataclass(frozen=True)
class FailureGroup:
    """Hosts that failed with the same message (their own names taken out)."""

    hosts: tuple[str, ...]
    message: str

    @property
    def nodeset(self) -> str:
        return compress_names(self.hosts)


class OutputFolder:
    """Collects each host's lines until the end of the run, then groups equal outputs.

    Equal lines from different hosts are stored once (interned), so a thousand hosts
    printing the same report cost one copy of it plus a reference per line and host.
    """

    def __init__(self, names: Iterable[str]):
        self.order = {name: i for i, name in enumerate(names)}
        self._lines: dict[str, dict[str, list[bytes]]] = {"stdout": {}, "stderr": {}}
        self._intern: dict[bytes, bytes] = {}

    def add(self, host: str, stream: str, lines: list[bytes]) -> None:
        kept = self._lines[stream].setdefault(host, [])
        intern = self._intern.setdefault
        kept.extend(intern(line, line) for line in lines)

    def blocks(self, stream: str) -> list[Block]:
        """Distinct outputs on ``stream``, most hosts first (then run order)."""
        groups: dict[tuple[bytes, ...], list[str]] = {}
        for host, lines in self._lines[stream].items():
            if lines:
                groups.setdefault(tuple(lines), []).append(host)
        return sorted(
            (
                Block(
                    tuple(sorted(hosts, key=self._rank)),
                    tuple(line.decode(errors="replace") for line in lines),
                )
                for lines, hosts in groups.items()
            ),
            key=lambda b: (-len(b.hosts), self._rank(b.hosts[0])),
        )

    def silent(self, hosts: Iterable[str]) -> list[str]:
        """Of ``hosts``, those that printed nothing on stdout."""
        printed = self._lines["stdout"]
        return [h for h in hosts if not printed.get(h)]

    def _rank(self, host: str) -> int:
        return self.order.get(host, len(self.order))


def normalise_error(message: str, aliases: Iterable[str]) -> str:
    """``message`` without the host's own name/address (``aliases``), so equal causes
    compare equal: "sudo needs a password on web07; use ..." -> "sudo needs a password;
    use ...". Where the name is not an adjunct (``ssh-keygen -R 198.18.0.7``) it becomes
    ``<host>``. A port after an alias (``198.18.0.7:22``, ``[::1]:2222``) goes with it.
    The messages themselves are left as the transport wrote them.

    One precompiled pattern for every host: a thousand failures must not compile a
    thousand patterns."""
    own = {a for a in aliases if a}
    for odd in sorted((a for a in own if not _PLAIN.fullmatch(a)), key=len, reverse=True):
        message = message.replace(odd, HOST_PLACEHOLDER)  # user@addr:port, bare IPv6
    own.add(HOST_PLACEHOLDER)

    def swap(match: re.Match) -> str:
        if (match.group("bracketed") or match.group("word")) not in own:
            return match.group(0)
        return "" if match.group("lead") else HOST_PLACEHOLDER

    return _CANDIDATE.sub(swap, message)


def fold_failures(
    failures: Iterable[tuple[str, str]], aliases: Mapping[str, Iterable[str]] | None = None
) -> list[FailureGroup]:
    """``(host, message)`` pairs -> one group per normalised message, most hosts first.
    ``aliases`` gives each host's other spellings (address, address:port)."""
    aliases = aliases or {}
    return group_failures(
        (host, normalise_error(message, (host, *aliases.get(host, ()))))
        for host, message in failures
    )


def group_failures(failures: Iterable[tuple[str, str]]) -> list[FailureGroup]:
    """Already normalised ``(host, message)`` pairs -> groups, most hosts first (then the
    order the first host of each came in)."""
    groups: dict[str, list[str]] = {}
    for host, message in failures:
        groups.setdefault(message, []).append(host)
    ranked = sorted(enumerate(groups.items()), key=lambda item: (-len(item[1][1]), item[0]))
    return [FailureGroup(tuple(hosts), message) for _, (message, hosts) in ranked]


def hosts_phrase(count: int) -> str:
    return f"{count} host{'' if count == 1 else 's'}"


def render_block(block: Block) -> list[str]:
    """ClusterShell's gathered form: a rule, the host set and its size, a rule, the lines."""
    rule = "-" * 15
    return [rule, f"{block.nodeset} ({len(block.hosts)})", rule, *block.lines]


def failure_line(group: FailureGroup) -> str:
    """``37 hosts: sudo needs a password; use ...: web[001-037]``"""
    return f"{hosts_phrase(len(group.hosts))}: {group.message}: {group.nodeset}"
