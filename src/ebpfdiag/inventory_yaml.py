"""Inventory YAML -> ``Inventory``: the native format (``defaults``/``hosts``/``groups``,
strict, every mistake reported with its line) and Ansible YAML inventories as they are.

Pure (text in, records out), and imported only when a file has to be parsed: PyYAML alone
is a fifth of the controller's start-up, which an unchanged inventory does without
(``ebpfdiag.inventory.load_inventory`` keeps each parse).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from ebpfdiag.errors import InventoryError
from ebpfdiag.hostexpr import PatternError, expand, expand_ansible
from ebpfdiag.inventory import Host, Inventory, Labels, _did_you_mean


def _compose(text: str) -> Node | None:
    """libyaml's parser when PyYAML has it (a tenth of the pure-Python one's time on a
    1,000-host inventory); on an error, the pure-Python one for its clearer message."""
    fast = getattr(yaml, "CSafeLoader", None)
    if fast is not None:
        try:
            return yaml.compose(text, Loader=fast)
        except yaml.YAMLError:
            pass
    return yaml.compose(text, Loader=yaml.SafeLoader)


def parse_inventory(text: str, path: Path | None) -> Inventory:
    """Parse native or Ansible YAML text; every error carries the offending line."""
    reader = _Reader(path)
    try:
        root = _compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        problem = f"{context}: {problem}" if context else problem
        raise InventoryError(
            f"invalid YAML: {problem}", reader.path, mark.line + 1 if mark else None
        ) from None
    if root is None or _is_null(root):
        return Inventory(path=path, hosts={}, groups={})
    if not isinstance(root, MappingNode):
        raise reader.error(root, "the inventory must be a mapping")
    if _looks_like_ansible(root):
        return _AnsibleParser(reader).parse(root)
    return _NativeParser(reader).parse(root)


def _looks_like_ansible(root: MappingNode) -> bool:
    """``all:`` at the top, or only group bodies made of hosts/children/vars."""
    keys = [k.value for k, _ in root.value if isinstance(k, ScalarNode)]
    if "all" in keys:
        return True
    if set(keys) <= _NATIVE_TOP:
        return False
    return all(
        _is_null(v)
        or (
            isinstance(v, MappingNode)
            and all(
                isinstance(k, ScalarNode) and k.value in _ANSIBLE_GROUP_KEYS for k, _ in v.value
            )
        )
        for _, v in root.value
    )


# --- YAML node access --------------------------------------------------------------------


def _is_null(node: Node) -> bool:
    return node.tag == "tag:yaml.org,2002:null"


class _Reader:
    """Walks the composed node graph so every value keeps its line number."""

    def __init__(self, path: Path | None):
        self.path = str(path) if path is not None else None
        self._loader = yaml.SafeLoader("")
        self._flattened: set[int] = set()

    def error(self, node: Node | None, message: str) -> InventoryError:
        line = node.start_mark.line + 1 if node is not None else None
        return InventoryError(message, self.path, line)

    def items(self, node: Node, what: str) -> list[tuple[str, Node, Node]]:
        """(key text, key node, value node) of a mapping; null counts as empty."""
        if _is_null(node):
            return []
        if not isinstance(node, MappingNode) or node.tag != "tag:yaml.org,2002:map":
            raise self.error(node, f"{what} must be a mapping")
        if id(node) not in self._flattened:
            self._flattened.add(id(node))
            seen: dict[str, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.name(key_node, what)
                if key in seen:
                    line = seen[key]
                    raise self.error(key_node, f"duplicate key '{key}' (first at line {line})")
                seen[key] = key_node.start_mark.line + 1
            try:
                self._loader.flatten_mapping(node)  # `<<: *anchor` merges; own keys come last
            except yaml.YAMLError as exc:
                raise self.error(node, f"{what}: {getattr(exc, 'problem', exc)}") from None
        out: dict[str, tuple[str, Node, Node]] = {}
        for key_node, value_node in node.value:
            key = self.name(key_node, what)
            out[key] = (key, key_node, value_node)
        return list(out.values())

    def sequence(self, node: Node, what: str) -> list[Node]:
        if _is_null(node):
            return []
        if not isinstance(node, SequenceNode) or node.tag != "tag:yaml.org,2002:seq":
            raise self.error(node, f"{what} must be a list")
        return list(node.value)

    def name(self, node: Node, what: str) -> str:
        """The text of a name as written (so ``yes`` or ``1e3`` stay names, not bool/float)."""
        if not isinstance(node, ScalarNode) or not node.value:
            raise self.error(node, f"{what}: expected a plain name")
        return node.value

    def value(self, node: Node) -> Any:
        try:
            return self._loader.construct_object(node, deep=True)
        except yaml.YAMLError as exc:
            raise self.error(node, f"cannot read value: {getattr(exc, 'problem', exc)}") from None


# --- typed settings shared by both formats -----------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _as_text(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a non-empty string, got {_type_name(value)} {value!r}")
    return value


def _as_path(value: Any) -> str:
    return os.path.expanduser(_as_text(value))


def _as_port(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ValueError(f"expected a port number 1-65535, got {value!r}")
    return value


def _as_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _as_timeout(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ValueError(f"expected a positive number of seconds, got {value!r}")
    return float(value)


def _as_label(value: Any) -> str:
    if value is None:
        raise ValueError("expected a value, got null")
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=str)
    return str(value)


_SETTINGS: dict[str, Callable[[Any], Any]] = {
    "port": _as_port,
    "user": _as_text,
    "identity_file": _as_path,
    "sudo": _as_bool,
    "python": _as_text,
    "connect_timeout": _as_timeout,
    "jump": _as_text,
    "known_hosts": _as_path,
}


# --- native format -----------------------------------------------------------------------

_NATIVE_TOP = {"defaults", "hosts", "groups"}
_HOST_KEYS = {"address", "labels", *_SETTINGS}
_DEFAULT_KEYS = {"labels", *_SETTINGS}
_NATIVE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")


@dataclass
class _Entry:
    """What one host entry said, before defaults and groups are applied."""

    settings: dict[str, Any]
    labels: dict[str, str]
    line_of: dict[str, Node]


class _NativeParser:
    def __init__(self, reader: _Reader):
        self.r = reader

    def parse(self, root: MappingNode) -> Inventory:
        sections = {}
        for key, key_node, value_node in self.r.items(root, "the inventory"):
            if key not in _NATIVE_TOP:
                raise self.r.error(key_node, _unknown_key(key, _NATIVE_TOP, "at the top level"))
            sections[key] = value_node
        null = ScalarNode("tag:yaml.org,2002:null", "")
        defaults = self._entry(sections.get("defaults", null), _DEFAULT_KEYS, "defaults")
        hosts, jumps = self._hosts(sections.get("hosts", null), defaults)
        groups = self._groups(sections.get("groups", null), hosts)
        _check_jumps(self.r, hosts, jumps)
        member_of: dict[str, list[str]] = {}
        for group, members in groups.items():
            for member in members:
                member_of.setdefault(member, []).append(group)
        hosts = {
            n: dataclasses.replace(h, groups=tuple(member_of.get(n, ()))) for n, h in hosts.items()
        }
        return Inventory(
            path=Path(self.r.path) if self.r.path else None,
            hosts=hosts,
            groups=groups,
            defaults={
                **{k: v for k, v in defaults.settings.items() if v is not None},
                "labels": Labels(defaults.labels),
            },
        )

    def _entry(self, node: Node, allowed: set[str], what: str) -> _Entry:
        entry = _Entry({}, {}, {})
        for key, key_node, value_node in self.r.items(node, what):
            if key not in allowed:
                raise self.r.error(key_node, _unknown_key(key, allowed, f"in {what}"))
            entry.line_of[key] = value_node
            if key == "labels":
                for label, _, label_node in self.r.items(value_node, f"labels of {what}"):
                    entry.labels[label] = self._convert(_as_label, label_node, f"label {label}")
            elif key == "address":
                entry.settings[key] = self._convert(_as_text, value_node, key)
            elif _is_null(value_node):
                entry.settings[key] = None  # null: back to the built-in default
            else:
                entry.settings[key] = self._convert(_SETTINGS[key], value_node, key)
        return entry

    def _convert(self, convert: Callable[[Any], Any], node: Node, key: str) -> Any:
        if isinstance(node, MappingNode | SequenceNode):
            raise self.r.error(node, f"{key}: expected a single value, got a {node.id}")
        try:
            return convert(self.r.value(node))
        except ValueError as exc:
            raise self.r.error(node, f"{key}: {exc}") from None

    def _hosts(self, node: Node, defaults: _Entry) -> tuple[dict[str, Host], dict[str, Node]]:
        hosts: dict[str, Host] = {}
        first_line: dict[str, int] = {}
        jump_nodes: dict[str, Node] = {}
        for pattern, key_node, value_node in self.r.items(node, "hosts"):
            names = self._expand(pattern, key_node)
            entry = self._entry(value_node, _HOST_KEYS, f"host {pattern}")
            addresses = self._addresses(names, entry)
            explicit_jump = "jump" in entry.line_of
            merged = {**defaults.settings, **entry.settings}
            merged.pop("address", None)
            settings = {k: v for k, v in merged.items() if v is not None}
            labels = {**defaults.labels, **entry.labels}
            for name, address in zip(names, addresses, strict=True):
                if name in hosts:
                    raise self.r.error(
                        key_node, f"duplicate host '{name}' (first at line {first_line[name]})"
                    )
                first_line[name] = key_node.start_mark.line + 1
                own = dict(settings)
                if own.get("jump") == name:
                    if explicit_jump:
                        raise self.r.error(
                            entry.line_of["jump"], f"host '{name}' jumps through itself"
                        )
                    del own["jump"]
                if "jump" in own:
                    jump_nodes[name] = entry.line_of.get("jump") or defaults.line_of["jump"]
                hosts[name] = Host(name=name, address=address, labels=labels, **own)
        return hosts, jump_nodes

    def _expand(self, pattern: str, node: Node) -> list[str]:
        try:
            names = expand(pattern)
        except PatternError as exc:
            raise self.r.error(node, str(exc)) from None
        for name in names:
            if not _NATIVE_NAME.fullmatch(name):
                raise self.r.error(
                    node, f"bad name '{name}': use letters, digits, '.', '-' and '_'"
                )
        return names

    def _addresses(self, names: list[str], entry: _Entry) -> list[str]:
        """One address per name: the name itself, or a range expanded in step with the names."""
        if "address" not in entry.settings:
            return names
        node = entry.line_of["address"]
        try:
            addresses = expand(entry.settings["address"])
        except PatternError as exc:
            raise self.r.error(node, f"address: {exc}") from None
        if len(addresses) != len(names):
            raise self.r.error(
                node,
                f"address: {len(addresses)} address(es) for {len(names)} host name(s); "
                "a host range needs an address range of the same length",
            )
        return addresses

    def _groups(self, node: Node, hosts: dict[str, Host]) -> dict[str, list[str]]:
        members: dict[str, list[tuple[str, Node]]] = {}
        for group, key_node, value_node in self.r.items(node, "groups"):
            if not _NATIVE_NAME.fullmatch(group):
                raise self.r.error(key_node, f"bad group name '{group}'")
            if group in hosts:
                raise self.r.error(key_node, f"group '{group}' has the same name as a host")
            members[group] = []
            for item in self.r.sequence(value_node, f"group {group}"):
                for name in self._expand(self.r.name(item, f"group {group}"), item):
                    members[group].append((name, item))
        for group, refs in members.items():
            for name, item in refs:
                if name not in hosts and name not in members:
                    hint = _did_you_mean(name, [*hosts, *members])
                    raise self.r.error(
                        item, f"group '{group}': unknown host or group '{name}'{hint}"
                    )
        return _flatten(self.r, members, set(hosts))


def _unknown_key(key: str, allowed: set[str], where: str) -> str:
    return f"unknown key '{key}' {where}{_did_you_mean(key, sorted(allowed))}"


def _flatten(
    reader: _Reader, members: dict[str, list[tuple[str, Node]]], hosts: set[str]
) -> dict[str, list[str]]:
    """Replace groups of groups by their hosts, in order of first appearance; reject cycles."""
    done: dict[str, list[str]] = {}

    def visit(group: str, stack: list[str]) -> list[str]:
        if group in done:
            return done[group]
        out: list[str] = []
        for name, node in members[group]:
            if name in hosts:
                out.append(name)
            elif name in stack:
                cycle = " -> ".join([*stack[stack.index(name) :], name])
                raise reader.error(node, f"group cycle: {cycle}")
            else:
                out.extend(visit(name, [*stack, name]))
        done[group] = list(dict.fromkeys(out))
        return done[group]

    return {group: visit(group, [group]) for group in members}


def _check_jumps(reader: _Reader, hosts: dict[str, Host], nodes: dict[str, Node]) -> None:
    """A chain of jump hosts that comes back to itself can never connect."""
    for start in nodes:
        chain = [start]
        current = hosts[start].jump
        while current in hosts:
            if current in chain:
                cycle = " -> ".join([*chain[chain.index(current) :], current])
                raise reader.error(nodes[start], f"jump cycle: {cycle}")
            chain.append(current)
            current = hosts[current].jump


# --- Ansible YAML inventories ------------------------------------------------------------

_ANSIBLE_GROUP_KEYS = {"hosts", "children", "vars"}
_ANSIBLE_NAME = re.compile(r"[^\s,\[\]!@][^\s,\[\]]*")
_HOST_PORT = re.compile(r"(.+?):(\d+)")
_SECRET = re.compile(r"pass|secret|token|key|vault", re.IGNORECASE)


def _ansible_bool(value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("yes", "true", "on", "1", "y"):
        return True
    if isinstance(value, str) and value.strip().lower() in ("no", "false", "off", "0", "n"):
        return False
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    return _as_bool(value)


def _ansible_port(value: Any) -> int:
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return _as_port(value)


def _ansible_timeout(value: Any) -> float:
    if isinstance(value, str) and re.fullmatch(r"\d+(\.\d*)?", value.strip()):
        value = float(value)
    return _as_timeout(value)


def _ansible_text(value: Any) -> str:
    return _as_text(str(value) if isinstance(value, int | float) else value)


# Ansible variable -> Host field, with the coercion Ansible itself applies.
_ANSIBLE_VARS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "ansible_host": ("address", _ansible_text),
    "ansible_ssh_host": ("address", _ansible_text),
    "ansible_port": ("port", _ansible_port),
    "ansible_ssh_port": ("port", _ansible_port),
    "ansible_user": ("user", _ansible_text),
    "ansible_ssh_user": ("user", _ansible_text),
    "ansible_ssh_private_key_file": ("identity_file", _as_path),
    "ansible_private_key_file": ("identity_file", _as_path),
    "ansible_python_interpreter": ("python", _ansible_text),
    "ansible_become": ("sudo", _ansible_bool),
    "ansible_ssh_timeout": ("connect_timeout", _ansible_timeout),
}


@dataclass
class _Group:
    hosts: list[str] = field(default_factory=list)
    children: list[tuple[str, Node]] = field(default_factory=list)
    parents: set[str] = field(default_factory=set)
    vars: dict[str, Node] = field(default_factory=dict)


class _AnsibleParser:
    """Reads an Ansible YAML inventory the way Ansible does, keeping only what SSH needs."""

    def __init__(self, reader: _Reader):
        self.r = reader
        self.groups: dict[str, _Group] = {"all": _Group(), "ungrouped": _Group()}
        self.host_vars: dict[str, dict[str, Node]] = {}
        self.walking: set[int] = set()

    def parse(self, root: MappingNode) -> Inventory:
        for name, key_node, body in self.r.items(root, "the inventory"):
            self._group(name, key_node, body)
            if name != "all":
                self._link("all", name, key_node)
        for name, group in self.groups.items():
            if name != "all" and not group.parents:
                self._link("all", name, None)
        members = _flatten(
            self.r,
            {g: [(h, None) for h in grp.hosts] + grp.children for g, grp in self.groups.items()},
            set(self.host_vars),
        )
        members["all"] = list(self.host_vars)
        grouped = {h for g, hs in members.items() if g not in ("all", "ungrouped") for h in hs}
        members["ungrouped"] = list(
            dict.fromkeys(members["ungrouped"] + [h for h in self.host_vars if h not in grouped])
        )
        depth = self._depths()
        hosts = {}
        for name in self.host_vars:
            in_groups = [g for g in self.groups if name in members[g]]
            layers = [self.groups[g].vars for g in sorted(in_groups, key=lambda g: (depth[g], g))]
            hosts[name] = self._host(name, [*layers, self.host_vars[name]], tuple(in_groups))
        defaults, labels = self._settings(self.groups["all"].vars)
        defaults.pop("address", None)
        return Inventory(
            path=Path(self.r.path) if self.r.path else None,
            hosts=hosts,
            groups=members,
            defaults={**defaults, "labels": Labels(labels)},
            format="ansible",
        )

    def _link(self, parent: str, child: str, node: Node | None) -> None:
        self.groups[child].parents.add(parent)
        if child not in [c for c, _ in self.groups[parent].children]:
            self.groups[parent].children.append((child, node))

    def _group(self, name: str, key_node: Node, body: Node) -> None:
        if not _ANSIBLE_NAME.fullmatch(name):
            raise self.r.error(key_node, f"bad group name '{name}'")
        if id(body) in self.walking:
            raise self.r.error(key_node, f"group '{name}' contains itself")
        self.walking.add(id(body))
        group = self.groups.setdefault(name, _Group())
        for key, k_node, value in self.r.items(body, f"group {name}"):
            if key == "hosts":
                for pattern, h_node, h_vars in self.r.items(value, f"hosts of {name}"):
                    for host in self._hostnames(pattern, h_node, h_vars):
                        if host not in group.hosts:
                            group.hosts.append(host)
            elif key == "children":
                for child, c_node, c_body in self.r.items(value, f"children of {name}"):
                    self._group(child, c_node, c_body)
                    self._link(name, child, c_node)
            elif key == "vars":
                for var, _, v_node in self.r.items(value, f"vars of {name}"):
                    group.vars[var] = v_node
            else:
                raise self.r.error(
                    k_node, _unknown_key(key, _ANSIBLE_GROUP_KEYS, f"in group {name}")
                )
        self.walking.discard(id(body))

    def _hostnames(self, pattern: str, node: Node, host_vars: Node) -> list[str]:
        """Expand ``web[01:03]`` / ``db:2222`` and record each host's own vars."""
        port_node = None
        match = _HOST_PORT.fullmatch(pattern)
        if match and ":" not in re.sub(r"\[[^\]]*\]", "", match.group(1)):
            pattern, port_node = match.group(1), ScalarNode("tag:yaml.org,2002:int", match.group(2))
            port_node.start_mark = node.start_mark
        try:
            names = expand_ansible(pattern)
        except PatternError as exc:
            raise self.r.error(node, str(exc)) from None
        own = {var: v_node for var, _, v_node in self.r.items(host_vars, f"vars of {pattern}")}
        if port_node is not None:
            own.setdefault("ansible_port", port_node)
        for name in names:
            if not _ANSIBLE_NAME.fullmatch(name):
                raise self.r.error(node, f"bad host name '{name}'")
            self.host_vars.setdefault(name, {}).update(own)
        return names

    def _depths(self) -> dict[str, int]:
        """Ansible applies group vars from shallow to deep, so children override parents."""
        depth: dict[str, int] = {}

        def of(group: str) -> int:
            if group not in depth:
                parents = self.groups[group].parents
                depth[group] = 1 + max((of(p) for p in parents), default=-1)
            return depth[group]

        for group in self.groups:
            of(group)
        return depth

    def _settings(self, *layers: dict[str, Node]) -> tuple[dict[str, Any], dict[str, str]]:
        """Map ``ansible_*`` connection vars to Host fields; keep the rest as labels."""
        settings: dict[str, Any] = {}
        labels: dict[str, str] = {}
        for layer in layers:
            for var, node in layer.items():
                if var in _ANSIBLE_VARS:
                    key, convert = _ANSIBLE_VARS[var]
                    value = self._mapped(var, node, convert)
                    if value is None:
                        settings.pop(key, None)
                    else:
                        settings[key] = value
                elif not _SECRET.search(var) and node.tag.startswith("tag:yaml.org,2002:"):
                    value = self.r.value(node)
                    if value is None:
                        labels.pop(var, None)
                    else:
                        with contextlib.suppress(ValueError):  # e.g. a self-referencing value
                            labels[var] = _as_label(value)
        return settings, labels

    def _mapped(self, var: str, node: Node, convert: Callable[[Any], Any]) -> Any:
        value = self.r.value(node)
        if value is None:
            return None
        if isinstance(value, str) and "{{" in value:
            raise self.r.error(node, f"{var}: templated values cannot be evaluated here")
        if var == "ansible_python_interpreter" and str(value).startswith("auto"):
            return None
        try:
            return convert(value)
        except ValueError as exc:
            raise self.r.error(node, f"{var}: {exc}") from None

    def _host(self, name: str, layers: list[dict[str, Node]], groups: tuple[str, ...]) -> Host:
        settings, labels = self._settings(*layers)
        address = settings.pop("address", name)
        return Host(name=name, address=address, labels=labels, groups=groups, **settings)
