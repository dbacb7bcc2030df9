"""Inventory files -> ``Host`` records, and ``--hosts`` expressions -> host lists.

Two formats are read: the native one (``defaults``/``hosts``/``groups``, strict, every
mistake reported with its line) and Ansible YAML inventories as they are, because
fleets that need diagnosing usually have one already. Reading is pure (``parse_inventory``,
in ``ebpfdiag.inventory_yaml``); only ``find_inventory``/``load_inventory`` touch the file
system. ``load_inventory`` keeps each parse, by content, under the user's cache directory:
PyYAML alone is a fifth of the controller's start-up, and the inventory rarely changes
between two commands.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ebpfdiag import __version__
from ebpfdiag.errors import HostExpressionError, InventoryError
from ebpfdiag.hostexpr import (
    Literal,
    PatternError,
    compress_names,
    expand,
    parse_literal,
    split_terms,
)

__all__ = [
    "ENV_VAR",
    "Host",
    "Inventory",
    "Labels",
    "compress_names",
    "find_inventory",
    "load_inventory",
    "parse_inventory",
    "resolve_hosts",
    "resolve_jump",
]

ENV_VAR = "EBPFDIAG_INVENTORY"
INVENTORY_NAME = "inventory.yaml"


class Labels(Mapping[str, str]):
    """A read-only, hashable mapping, so that a frozen ``Host`` stays hashable."""

    def __init__(self, items: Mapping[str, str] | None = None):
        self._items = dict(items or {})

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return f"Labels({self._items!r})"


@dataclass(frozen=True)
class Host:
    """One machine to run scripts on, with everything needed to reach it."""

    name: str
    address: str
    port: int | None = None
    user: str | None = None
    identity_file: str | None = None
    sudo: bool = True
    python: str = "python3"
    connect_timeout: float = 10.0
    jump: str | None = None
    known_hosts: str | None = None
    labels: Mapping[str, str] = field(default_factory=Labels)
    groups: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.labels, Labels):
            object.__setattr__(self, "labels", Labels(self.labels))
        if not isinstance(self.groups, tuple):
            object.__setattr__(self, "groups", tuple(self.groups))

    def to_json(self) -> dict:
        """Plain data for ``--json`` output; an inventory holds no secrets to hide."""
        data = dataclasses.asdict(self)
        data["labels"] = dict(self.labels)
        data["groups"] = list(self.groups)
        return data


@dataclass
class Inventory:
    """Hosts in file order, groups flattened to host names, defaults for literal hosts."""

    path: Path | None
    hosts: dict[str, Host]
    groups: dict[str, list[str]]
    defaults: dict[str, Any] = field(default_factory=dict)
    format: str = "native"


# --- discovery ---------------------------------------------------------------------------


def find_inventory(explicit: str | None) -> Path | None:
    """-i/--inventory, then $EBPFDIAG_INVENTORY, ./inventory.yaml, the user config dir."""
    if explicit:
        return _must_exist(Path(explicit).expanduser(), "no such inventory file")
    from_env = os.environ.get(ENV_VAR)
    if from_env:
        return _must_exist(Path(from_env).expanduser(), f"no such inventory file (from ${ENV_VAR})")
    config_home = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    for candidate in (Path(INVENTORY_NAME), Path(config_home) / "ebpfdiag" / INVENTORY_NAME):
        if candidate.is_file():
            return candidate
    return None


def _must_exist(path: Path, message: str) -> Path:
    if not path.is_file():
        raise InventoryError(message, str(path))
    return path


def load_inventory(explicit: str | None = None) -> Inventory:
    """Find and parse the inventory; an empty one when none exists (literal hosts still work)."""
    path = find_inventory(explicit)
    if path is None:
        return Inventory(path=None, hosts={}, groups={})
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InventoryError(f"cannot read: {exc}", str(path)) from None
    kept = _parsed_file(text)
    inv = _read_parsed(kept, text, path) if kept is not None else None
    if inv is None:
        inv = parse_inventory(text, path)
        if kept is not None:
            _keep_parsed(kept, text, inv)
    return inv


#: Parses kept (least recently written dropped first).
PARSED_KEPT = 32


def _stamp() -> str:
    """What a parse depends on besides the text: this code, and HOME (``~`` in paths is
    expanded while parsing)."""
    here = Path(__file__)
    code = [os.stat(f) for f in (here, here.with_name("inventory_yaml.py"))]
    stamps = " ".join(f"{c.st_size}:{c.st_mtime_ns}" for c in code)
    return f"{__version__} {stamps} {os.environ.get('HOME', '')}"


def _parsed_file(text: str) -> Path | None:
    """Where the parse of ``text`` is kept; the file holds the text and the stamp it was
    parsed with, compared in full when read (the name is only a checksum)."""
    import zlib

    base = os.environ.get("XDG_CACHE_HOME")
    try:
        base = base or str(Path.home() / ".cache")
    except RuntimeError:  # no home directory
        return None
    name = f"{zlib.crc32(text.encode()):08x}-{len(text)}.json"
    return Path(base) / "ebpfdiag" / "inventory" / name


def _read_parsed(kept: Path, text: str, path: Path) -> Inventory | None:
    import json

    try:
        data = json.loads(kept.read_text(encoding="utf-8"))
        if data["text"] != text or data["stamp"] != _stamp():
            return None
        hosts = {h["name"]: Host(**h) for h in data["hosts"]}
        defaults = dict(data["defaults"])
        if "labels" in defaults:
            defaults["labels"] = Labels(defaults["labels"])
        return Inventory(path, hosts, data["groups"], defaults, data["format"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _keep_parsed(kept: Path, text: str, inv: Inventory) -> None:
    """Best effort: a parse that cannot be kept is parsed again next time."""
    import json

    defaults = dict(inv.defaults)
    if "labels" in defaults:
        defaults["labels"] = dict(defaults["labels"])
    try:
        hosts = [h.to_json() for h in inv.hosts.values()]
        data = {"text": text, "stamp": _stamp(), "groups": inv.groups, "defaults": defaults,
                "format": inv.format, "hosts": hosts}  # fmt: skip
        kept.parent.mkdir(parents=True, exist_ok=True)
        tmp = kept.with_name(f".{kept.name}.{os.getpid()}")
        tmp.write_text(json.dumps(data), encoding="utf-8")
        os.replace(tmp, kept)
        others = sorted(kept.parent.glob("*.json"), key=lambda p: p.stat().st_mtime_ns)
        for old in others[:-PARSED_KEPT]:
            old.unlink(missing_ok=True)
    except (OSError, TypeError, ValueError):
        return


def parse_inventory(text: str, path: Path | None) -> Inventory:
    """Parse native or Ansible YAML text; every error carries the offending line."""
    from ebpfdiag.inventory_yaml import parse_inventory as parse

    return parse(text, path)


def _did_you_mean(word: str, candidates: list[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, candidates, n=3)
    return f" (did you mean: {', '.join(sorted(close))}?)" if close else ""


# --- host expressions --------------------------------------------------------------------


def resolve_hosts(inv: Inventory, expr: str) -> list[Host]:
    """Evaluate ``lb,web[01-20],!web07,ops@198.18.0.9:2222`` left to right, de-duplicated."""
    try:
        terms = split_terms(expr)
    except PatternError as exc:
        raise HostExpressionError(str(exc)) from None
    selected: dict[str, Host] = {}
    if terms and all(term.startswith("!") for term in terms):
        selected = dict(inv.hosts)
    for term in terms:
        if term.startswith("!"):
            if term == "!":
                raise HostExpressionError(f"empty exclusion in {expr!r}")
            for host in _term_hosts(inv, term[1:]):
                selected.pop(host.name, None)
        else:
            for host in _term_hosts(inv, term):
                selected.setdefault(host.name, host)
    if not selected:
        raise HostExpressionError(f"no hosts selected by {expr!r}")
    return list(selected.values())


def _term_hosts(inv: Inventory, term: str) -> list[Host]:
    if term.startswith("@"):
        group = term[1:]
        if group in inv.groups:
            return [inv.hosts[name] for name in inv.groups[group]]
        if group == "all":
            return list(inv.hosts.values())
        hint = _did_you_mean(group, list(inv.groups))
        raise HostExpressionError(f"unknown group '{group}'{hint}")
    try:
        found = _name_hosts(inv, term)
        if found is not None:
            return found
        if "[" in term:
            out: list[Host] = []
            for name in expand(term):
                hosts = _name_hosts(inv, name)
                if hosts is None:
                    raise _unknown(inv, name)
                out.extend(hosts)
            return out
    except PatternError as exc:
        raise HostExpressionError(str(exc)) from None
    raise _unknown(inv, term)


def _name_hosts(inv: Inventory, name: str) -> list[Host] | None:
    """A host, a group, ``all`` or a literal host; None when the name means nothing."""
    if name in inv.hosts:
        return [inv.hosts[name]]
    if name in inv.groups:
        return [inv.hosts[member] for member in inv.groups[name]]
    if name == "all":
        return list(inv.hosts.values())
    literal = parse_literal(name)
    return None if literal is None else [_literal_host(inv, name, literal)]


def _literal_host(inv: Inventory, text: str, literal: Literal) -> Host:
    """``user@lb1`` reuses inventory host lb1's settings; any other address gets the defaults."""
    base = inv.hosts.get(literal.address)
    if base is not None:
        return dataclasses.replace(
            base, name=text, user=literal.user or base.user, port=literal.port or base.port
        )
    settings = dict(inv.defaults)
    if literal.user:
        settings["user"] = literal.user
    if literal.port:
        settings["port"] = literal.port
    return Host(name=text, address=literal.address, **settings)


def _unknown(inv: Inventory, name: str) -> HostExpressionError:
    hint = _did_you_mean(name, [*inv.hosts, *inv.groups])
    if not hint and not inv.hosts:
        hint = " (no inventory loaded: write user@address or address:port)"
    return HostExpressionError(f"unknown host or group '{name}'{hint}")


def resolve_jump(inv: Inventory, host: Host) -> Host | None:
    """The host to tunnel through: an inventory host by name, or ``user@address:port``."""
    if host.jump is None:
        return None
    if host.jump in inv.hosts:
        return inv.hosts[host.jump]
    try:
        literal = parse_literal(host.jump) or Literal(None, host.jump, None)
    except PatternError as exc:
        path = str(inv.path) if inv.path else None
        raise InventoryError(f"host '{host.name}': bad jump: {exc}", path) from None
    settings = {k: v for k, v in inv.defaults.items() if k != "jump"}
    if literal.user:
        settings["user"] = literal.user
    if literal.port:
        settings["port"] = literal.port
    return Host(name=host.jump, address=literal.address, **settings)
