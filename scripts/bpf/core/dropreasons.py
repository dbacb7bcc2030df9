"""Drop reason names of the running kernel, for every tool that counts drops.

The numbering of enum skb_drop_reason moves between kernels (a reason added in the middle
renumbers the rest), so names are read on the host: from the skb:kfree_skb format's
__print_symbolic table, completed by the BTF enum, never from a table here. Kernels
without the reason field (before 5.17) name a drop by its location instead: the caller of
kfree_skb, through /proc/kallsyms. Python 3.6.
"""

from core.tracepoints import field_map

REASON_PREFIX = "SKB_DROP_REASON_"


def short_reason(name: str) -> str:
    """BTF enumerator -> the name the tracepoint prints (SKB_DROP_REASON_X -> X)."""
    return name[len(REASON_PREFIX) :] if name.startswith(REASON_PREFIX) else name


def reason_table(fmt, btf_enum) -> dict:
    """Where this kernel's reason names come from, and which numbers are not drops.

    Returns {"source": "format" | "btf" | "none", "names": {num: name}, "has_field",
    "first_drop": the number of NOT_SPECIFIED (every enumerator before it, such as
    SKB_NOT_DROPPED_YET and SKB_CONSUMED, marks a packet that was not dropped),
    "consumed": the number of SKB_CONSUMED or None}. The print format is the tracepoint's
    own table; BTF fills in what it leaves out (6.18 prints from NOT_SPECIFIED on).
    """
    has_field = fmt is not None and "reason" in field_map(fmt)
    table = {"source": "none", "names": {}, "has_field": has_field, "first_drop": 0}
    table["consumed"] = None
    if not has_field:
        return table
    printed = dict(fmt["symbols"].get("reason", {}))
    from_btf = {}
    for num, name in (btf_enum or {}).items():
        if name.startswith(REASON_PREFIX) or name in ("SKB_CONSUMED", "SKB_NOT_DROPPED_YET"):
            if name.startswith(REASON_PREFIX + "SUBSYS_") or name == REASON_PREFIX + "MAX":
                continue
            from_btf[num] = short_reason(name)
    names = dict(from_btf)
    names.update(printed)
    names = dict((n, v) for n, v in names.items() if v != "MAX")
    if printed:
        table["source"] = "format"
    elif from_btf:
        table["source"] = "btf"
    table["names"] = names
    by_name = dict((v, n) for n, v in names.items())
    table["first_drop"] = by_name.get("NOT_SPECIFIED", 0)
    for consumed in ("SKB_CONSUMED", "CONSUMED"):
        if consumed in by_name:
            table["consumed"] = by_name[consumed]
    return table


def reason_count(table: dict) -> int:
    """Drop reasons named (the non-drop markers before NOT_SPECIFIED left out)."""
    return len([n for n in table["names"] if n >= table["first_drop"]])


def location_label(symbols, addr: int) -> str:
    """A drop location as a bounded label: the function's name (its offset left out, so one
    function is one label), or "unknown" when kallsyms cannot name it."""
    named = symbols.resolve(addr) if addr else None
    return named.split("+", 1)[0] if named else "unknown"
