"""Kernel addresses -> "symbol+0xoff" through /proc/kallsyms. Python 3.6.

Used where a kernel has no drop reason: the drop's location (the caller of kfree_skb) is
what names it. Read once, lazily: the file has a few hundred thousand lines.
"""

import bisect

KALLSYMS = "/proc/kallsyms"
TEXT_TYPES = set("tTwW")


class Symbols:
    """A sorted table of text symbols; unreadable or hidden (all zero) means no names."""

    def __init__(self, path: str = KALLSYMS) -> None:
        self.path = path
        self.addrs = None
        self.names = None
        self.cache = {}

    def _load(self) -> None:
        pairs = []
        try:
            with open(self.path) as f:
                for line in f:
                    parts = line.split()
                    if len(parts) < 3 or parts[1] not in TEXT_TYPES:
                        continue
                    addr = int(parts[0], 16)
                    if addr:
                        pairs.append((addr, parts[2]))
        except (OSError, ValueError):
            pairs = []
        pairs.sort()
        self.addrs = [a for a, _ in pairs]
        self.names = [n for _, n in pairs]

    def resolve(self, addr: int):
        """ "name+0xoff" for a kernel text address, None when it cannot be named."""
        if not addr:
            return None
        if addr in self.cache:
            return self.cache[addr]
        if self.addrs is None:
            self._load()
        i = bisect.bisect_right(self.addrs, addr) - 1
        text = "%s+0x%x" % (self.names[i], addr - self.addrs[i]) if i >= 0 else None
        self.cache[addr] = text
        return text
