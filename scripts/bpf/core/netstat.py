"""Drop counters the kernel keeps per network namespace (/proc/net/netstat, /proc/net/snmp).

Some drops are never freed with a reason: a SYN refused because the accept queue is full is
consumed, and only ListenOverflows/ListenDrops say so. /proc/net follows the reading
process's namespace, so these are the host's own. Python 3.6.
"""

NETSTAT_FILES = ("/proc/net/netstat", "/proc/net/snmp")
WATCHED = (
    ("TcpExt", "ListenOverflows"),
    ("TcpExt", "ListenDrops"),
    ("TcpExt", "TCPBacklogDrop"),
    ("TcpExt", "TCPReqQFullDrop"),
    ("TcpExt", "TCPRcvQDrop"),
    ("TcpExt", "TCPZeroWindowDrop"),
    ("TcpExt", "TCPOFODrop"),
    ("TcpExt", "TCPMinTTLDrop"),
    ("TcpExt", "PAWSEstab"),  # LINUX_MIB_PAWSESTABREJECTED
    ("TcpExt", "TCPSynRetrans"),
    ("Tcp", "RetransSegs"),
    ("Tcp", "InErrs"),
    ("Tcp", "AttemptFails"),
    ("Ip", "InDiscards"),
    ("IpExt", "InNoRoutes"),
    ("Ip", "OutNoRoutes"),
)


def parse_counters(text: str) -> dict:
    """{(group, name): value} from the header/value line pairs of netstat or snmp."""
    found = {}
    header = None
    for line in text.splitlines():
        group, _, rest = line.partition(":")
        words = rest.split()
        if header is not None and header[0] == group:
            for i, name in enumerate(header[1][: len(words)]):
                try:
                    found[(group, name)] = int(words[i])
                except ValueError:
                    continue
            header = None
        else:
            header = (group, words)
    return found


def read_counters(paths=NETSTAT_FILES) -> dict:
    """{name: value} of the watched counters this host has (missing files are skipped)."""
    found = {}
    for path in paths:
        try:
            with open(path) as f:
                found.update(parse_counters(f.read()))
        except OSError:
            continue
    return dict((name, found[(group, name)]) for group, name in WATCHED if (group, name) in found)


class NetstatDelta:
    """Deltas of the watched counters since the start of the run."""

    def __init__(self, paths=NETSTAT_FILES) -> None:
        self.paths = paths
        self.start = read_counters(paths)
        self.last = dict((k, 0) for k in self.start)  # report only once one moves

    def names(self) -> list:
        return sorted(self.start)

    def delta(self) -> dict:
        now = read_counters(self.paths)
        return dict((k, now[k] - self.start[k]) for k in sorted(self.start) if k in now)

    def changed(self):
        """The delta when it differs from the last one returned, else None."""
        delta = self.delta()
        if delta == self.last:
            return None
        self.last = delta
        return delta
