"""Node sets: expand ``web[01-03]`` into names, fold names back, split literal hosts.

Host lists of hundreds of machines must stay short on the command line and in
messages, so both directions live here, as pure string functions without I/O.
Two range syntaxes exist: ``[01-03,05]`` (ours, ClusterShell's) and ``[01:03]``,
``[1:9:2]``, ``[a:c]`` (Ansible's, accepted only where Ansible inventories are read).
"""

from __future__ import annotations

import ipaddress
import re
import string
from collections.abc import Callable, Iterable
from itertools import product
from typing import NamedTuple

MAX_NAMES = 100_000

_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_NUMBER_ITEM = re.compile(r"(\d+)(?:-(\d+))?")
_LETTER_ITEM = re.compile(r"([A-Za-z])(?:-([A-Za-z]))?")
_ANSIBLE_BODY = re.compile(r"([A-Za-z]|\d*):([A-Za-z]|\d+)(?::(\d+))?")
_DIGITS = re.compile(r"(\d+)")
_BRACKETED_V6 = re.compile(r"\[([^\[\]]+)\](?::([^:]*))?")


class PatternError(ValueError):
    """A malformed range, literal host or port; ``str()`` is one line."""


class Choices(NamedTuple):
    """One bracket's values, kept lazy so a size check can run before expanding."""

    values: range
    render: Callable[[int], str]


class Literal(NamedTuple):
    """The parts of a host written out as ``user@address:port``."""

    user: str | None
    address: str
    port: int | None


def split_terms(expr: str) -> list[str]:
    """Split on commas and whitespace outside brackets: ``web[01,03] lb1`` is two terms."""
    terms: list[str] = []
    current: list[str] = []
    depth = 0
    for char in expr:
        if char == "[":
            depth += 1
        elif char == "]":
            depth -= 1
            if depth < 0:
                raise PatternError(f"unbalanced ']' in {expr!r}")
        if depth == 0 and (char == "," or char.isspace()):
            if current:
                terms.append("".join(current))
            current = []
            continue
        current.append(char)
    if depth:
        raise PatternError(f"unbalanced '[' in {expr!r}")
    if current:
        terms.append("".join(current))
    return terms


def expand(pattern: str) -> list[str]:
    """Expand ``rack[1-3]-node[01-08,10]`` (cartesian, padding taken from the lower bound)."""
    return _expand(pattern, _dash_body)


def expand_ansible(pattern: str) -> list[str]:
    """Expand Ansible host ranges: ``web[01:50]``, ``db-[a:c]``, ``n[1:10:2]``."""
    return _expand(pattern, _ansible_body)


def _expand(pattern: str, parse_body: Callable[[str, str], list[Choices]]) -> list[str]:
    pieces: list[list[Choices] | str] = []
    pos = 0
    for match in _BRACKETS.finditer(pattern):
        pieces.append(pattern[pos : match.start()])
        pieces.append(parse_body(match.group(1), pattern))
        pos = match.end()
    pieces.append(pattern[pos:])
    if any(isinstance(p, str) and ("[" in p or "]" in p) for p in pieces):
        raise PatternError(f"bad range {pattern!r}: unbalanced or nested brackets")
    total = 1
    for piece in pieces:
        if not isinstance(piece, str):
            total *= sum(len(c.values) for c in piece)
    if total > MAX_NAMES:
        raise PatternError(f"range {pattern!r} expands to {total} names (limit {MAX_NAMES})")
    axes = [[p] if isinstance(p, str) else _materialise(p) for p in pieces]
    return ["".join(parts) for parts in product(*axes)]


def _materialise(choices: list[Choices]) -> list[str]:
    return [c.render(value) for c in choices for value in c.values]


def _padded(bound: str) -> Callable[[int], str]:
    width = len(bound) if len(bound) > 1 and bound.startswith("0") else 0
    return lambda value: str(value).zfill(width)


def _letter(index: int) -> str:
    return string.ascii_letters[index]


def _dash_body(body: str, pattern: str) -> list[Choices]:
    """``01-03,05,a-c``: numbers, number ranges, letter ranges, separated by commas."""
    choices = []
    for item in body.split(","):
        item = item.strip()
        if match := _NUMBER_ITEM.fullmatch(item):
            low, high = match.group(1), match.group(2) or match.group(1)
            values = range(int(low), int(high) + 1)
            render = _padded(low)
        elif match := _LETTER_ITEM.fullmatch(item):
            low, high = match.group(1), match.group(2) or match.group(1)
            values = range(string.ascii_letters.index(low), string.ascii_letters.index(high) + 1)
            render = _letter
        else:
            raise PatternError(f"bad range {pattern!r}: cannot read {item!r}")
        if not values:
            raise PatternError(f"bad range {pattern!r}: {low} is after {high}")
        choices.append(Choices(values, render))
    return choices


def _ansible_body(body: str, pattern: str) -> list[Choices]:
    """``begin:end[:step]`` as Ansible reads it (empty begin means 0)."""
    match = _ANSIBLE_BODY.fullmatch(body.strip())
    if not match:
        raise PatternError(f"bad range {pattern!r}: expected [begin:end] or [begin:end:step]")
    low, high, step_text = match.group(1) or "0", match.group(2), match.group(3)
    step = int(step_text or 1)
    if step < 1:
        raise PatternError(f"bad range {pattern!r}: step must be at least 1")
    if low.isdigit() != high.isdigit():
        raise PatternError(f"bad range {pattern!r}: {low} and {high} are not the same kind")
    if low.isdigit():
        if low.startswith("0") and len(low) > 1 and len(low) != len(high):
            raise PatternError(f"bad range {pattern!r}: padded bounds must have equal length")
        values = range(int(low), int(high) + 1, step)
        render = _padded(low)
    else:
        start, stop = string.ascii_letters.index(low), string.ascii_letters.index(high)
        values = range(start, stop + 1, step)
        render = _letter
    if not values:
        raise PatternError(f"bad range {pattern!r}: {low} is after {high}")
    return [Choices(values, render)]


def parse_port(text: str, context: str) -> int:
    """A TCP port from text, or a one-line error naming where it came from."""
    if not text.isdigit():
        raise PatternError(f"bad port {text!r} in {context!r}")
    port = int(text)
    if not 1 <= port <= 65535:
        raise PatternError(f"port {port} out of range 1-65535 in {context!r}")
    return port


def parse_literal(text: str) -> Literal | None:
    """Split ``user@address:port``, ``[v6]:port`` or a bare IP; None for a plain name.

    Text with range brackets (other than around an IPv6 address) is not a literal
    yet: it must be expanded first, so ``ops@198.18.1.[1-3]`` gives three literals.
    """
    user, at, rest = text.rpartition("@")
    if at and not user:
        raise PatternError(f"empty user name in {text!r}")
    if at and not rest:
        raise PatternError(f"empty address in {text!r}")
    bracketed = _BRACKETED_V6.fullmatch(rest)
    if bracketed and _is_ip(bracketed.group(1), version=6):
        port_text = bracketed.group(2)
        port = None if port_text is None else parse_port(port_text, text)
        return Literal(user or None, bracketed.group(1), port)
    if "[" in rest or "]" in rest:
        return None
    if _is_ip(rest):
        return Literal(user or None, rest, None)
    if rest.count(":") == 1:
        address, _, port_text = rest.partition(":")
        if not address:
            raise PatternError(f"empty address in {text!r}")
        return Literal(user or None, address, parse_port(port_text, text))
    if ":" in rest:
        raise PatternError(
            f"cannot read {text!r}: write an IPv6 address with a port as [addr]:port"
        )
    if at:
        return Literal(user, rest, None)
    return None


def _is_ip(text: str, version: int | None = None) -> bool:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    return version is None or address.version == version


def compress_names(names: Iterable[str]) -> str:
    """Fold names into node-set form: ``web01,web02,web03,web05,lb1`` -> ``web[01-03,05],lb1``.

    Every numeric field may fold (``rack[1-3]-node[1-8]``); ``expand`` of each
    comma-separated part gives the original names back.
    """
    unique = list(dict.fromkeys(names))
    split = {name: _DIGITS.split(name) for name in unique if not _unfoldable(name)}
    first_keys = {_shape(parts) for parts in split.values()}
    shapes: dict[tuple, list[tuple[int, ...]]] = {}
    order: list[tuple | str] = []
    for name in unique:
        parts = split.get(name)
        if parts is None or len(parts) == 1:
            order.append(name)
            continue
        key = _widen(parts, _shape(parts), first_keys)
        if key not in shapes:
            shapes[key] = []
            order.append(key)
        shapes[key].append(tuple(int(d) for d in parts[1::2]))
    out: list[str] = []
    for item in order:
        if isinstance(item, str):
            out.append(item)
            continue
        texts, widths = item
        for ranges in _fold(shapes[item], widths):
            out.append(_render(texts, ranges))
    return ",".join(out)


def _unfoldable(name: str) -> bool:
    return any(char in name for char in "[],")


def _shape(parts: list[str]) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Texts between numbers, and each number's padded width (0: not padded)."""
    digits = parts[1::2]
    widths = tuple(len(d) if len(d) > 1 and d.startswith("0") else 0 for d in digits)
    return tuple(parts[0::2]), widths


def _widen(parts: list[str], key: tuple, known: set) -> tuple:
    """Let ``web10`` join ``web01``..``web09``: an unpadded number of the right length fits."""
    texts, widths = key
    digits = parts[1::2]
    for index, width in enumerate(widths):
        if width == 0 and len(digits[index]) > 1:
            candidate = (*widths[:index], len(digits[index]), *widths[index + 1 :])
            if (texts, candidate) in known:
                widths = candidate
    return texts, widths


def _fold(values: list[tuple[int, ...]], widths: tuple[int, ...]) -> list[tuple[str, ...]]:
    """Fold the last field per prefix, then fold prefixes that share the same last range."""
    if len(widths) == 1:
        return [(_rangeset({v[0] for v in values}, widths[0]),)]
    by_prefix: dict[tuple[int, ...], set[int]] = {}
    for value in values:
        by_prefix.setdefault(value[:-1], set()).add(value[-1])
    by_range: dict[str, list[tuple[int, ...]]] = {}
    for prefix in sorted(by_prefix):
        by_range.setdefault(_rangeset(by_prefix[prefix], widths[-1]), []).append(prefix)
    return [
        (*folded, last)
        for last, prefixes in by_range.items()
        for folded in _fold(prefixes, widths[:-1])
    ]


def _rangeset(values: set[int], width: int) -> str:
    ordered = sorted(values)
    runs: list[str] = []
    start = prev = ordered[0]
    for value in [*ordered[1:], None]:
        if value is not None and value == prev + 1:
            prev = value
            continue
        low, high = str(start).zfill(width), str(prev).zfill(width)
        runs.append(low if start == prev else f"{low}-{high}")
        if value is not None:
            start = prev = value
    return ",".join(runs)


def _render(texts: tuple[str, ...], ranges: tuple[str, ...]) -> str:
    out = [texts[0]]
    for text, rng in zip(texts[1:], ranges, strict=True):
        out.append(f"[{rng}]" if "-" in rng or "," in rng else rng)
        out.append(text)
    return "".join(out)
