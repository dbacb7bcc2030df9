"""Kernel addresses -> "symbol+0xoff" through /proc/kallsyms. Python 3.6.

Names a drop's location (the caller of kfree_skb). Read once, on first use or by `load`
(trace drop reads it while it sets up): the file has a hundred thousand lines or more,
about 0.2 s of CPU to read and sort.
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

    def load(self) -> int:
        """Read the table (once); returns how many text symbols it has (0: hidden or
        unreadable, so nothing can be named)."""
        if self.addrs is None:
            self._read()
        return len(self.addrs)

    def _read(self) -> None:
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
        self.load()
        i = bisect.bisect_right(self.addrs, addr) - 1
        text = "%s+0x%x" % (self.names[i], addr - self.addrs[i]) if i >= 0 else None
        self.cache[addr] = text
        return text
