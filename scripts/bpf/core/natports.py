"""This host's DNAT port rewrites, read from nftables: which TCP destination port P the
host sends on as port Q. A tracer filtering on P needs Q too, or it loses the flow past
the rewrite. Python 3.6, stdlib only; never fails: no nft, no rules, or output it cannot
read all mean "no mappings".
"""

import json
import os
import subprocess

NFT_PATHS = ("/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft")
NFT_TIMEOUT_S = 3.0


def discover_nat_ports():
    """[[P, Q], ...] from ``nft -j list ruleset`` (sorted), [] when there is none."""
    return start_nat_ports()()


def start_nat_ports():
    """Start ``nft -j list ruleset`` and return a function that waits for it and gives
    what discover_nat_ports gives: a tool starts it first and collects it after its
    compile, so nft runs meanwhile."""
    nft = next((p for p in NFT_PATHS if os.access(p, os.X_OK)), None)
    if nft is None:
        return list
    try:
        proc = subprocess.Popen(
            [nft, "-j", "list", "ruleset"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL
        )
    except OSError:
        return list

    def collect():
        try:
            out, _ = proc.communicate(timeout=NFT_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            return []
        if proc.returncode != 0:
            return []
        try:
            return nat_ports_from_ruleset(json.loads(out.decode("utf-8", "replace")))
        except ValueError:
            return []

    return collect


def nat_ports_from_ruleset(doc):
    """The port rewrites of an ``nft -j list ruleset`` document.

    A rule counts when it matches ``tcp dport`` on one port, an anonymous set or a named
    set, and its ``dnat`` (or ``redirect``) gives a port; or when its ``dnat`` takes the
    port (alone, or with the address) from a map keyed by ``tcp dport``. Rules that keep
    the port, other protocols and shapes not understood are left out.
    """
    try:
        objects = doc["nftables"]
    except (KeyError, TypeError):
        return []
    named_sets = {}
    rules = []
    for obj in objects if isinstance(objects, list) else ():
        if not isinstance(obj, dict):
            continue
        if isinstance(obj.get("set"), dict):
            s = obj["set"]
            named_sets[(s.get("family"), s.get("table"), s.get("name"))] = s.get("elem") or []
        elif isinstance(obj.get("rule"), dict):
            rules.append(obj["rule"])
    pairs = set()
    for rule in rules:
        sets = {
            name: elems
            for (family, table, name), elems in named_sets.items()
            if (family, table) == (rule.get("family"), rule.get("table"))
        }
        pairs.update(_rule_pairs(rule.get("expr"), sets))
    return [[p, q] for p, q in sorted(pairs) if p != q]


def _rule_pairs(exprs, sets):
    if not isinstance(exprs, list):
        return []
    matched = []
    pairs = []
    for expr in exprs:
        if not isinstance(expr, dict):
            continue
        match = expr.get("match")
        if isinstance(match, dict) and _is_tcp_dport(match.get("left")):
            if match.get("op", "==") in ("==", "in"):
                matched.extend(_ports_of(match.get("right"), sets))
            continue
        stmt = expr.get("dnat") or expr.get("redirect")
        if not isinstance(stmt, dict):
            continue
        port = stmt.get("port")
        if _is_port(port):
            pairs.extend((p, port) for p in matched)
        elif isinstance(port, dict):
            pairs.extend(_map_pairs(port.get("map"), None))
        addr = stmt.get("addr")
        if isinstance(addr, dict):
            pairs.extend(_map_pairs(addr.get("map"), 1))
    return pairs


def _is_tcp_dport(left):
    payload = left.get("payload") if isinstance(left, dict) else None
    return isinstance(payload, dict) and (payload.get("protocol"), payload.get("field")) == (
        "tcp",
        "dport",
    )


def _is_port(value):
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value < 65536


def _ports_of(right, sets):
    """The single ports of a match's right side: a port, a set, or @named set."""
    if _is_port(right):
        return [right]
    if isinstance(right, str) and right.startswith("@"):
        right = {"set": sets.get(right[1:], [])}
    if isinstance(right, dict) and isinstance(right.get("set"), list):
        return [p for p in right["set"] if _is_port(p)]
    return []


def _map_pairs(mapping, concat_index):
    """(P, Q) of a map keyed by tcp dport; the value is Q, or a concat whose item
    ``concat_index`` is Q (``addr . port``)."""
    if not isinstance(mapping, dict) or not _is_tcp_dport(mapping.get("key")):
        return []
    data = mapping.get("data")
    elems = data.get("set") if isinstance(data, dict) else None
    pairs = []
    for elem in elems if isinstance(elems, list) else ():
        if not isinstance(elem, list) or len(elem) != 2 or not _is_port(elem[0]):
            continue
        value = elem[1]
        if concat_index is not None:
            items = value.get("concat") if isinstance(value, dict) else None
            value = items[concat_index] if isinstance(items, list) and len(items) > 1 else None
        if _is_port(value):
            pairs.append((elem[0], value))
    return pairs
