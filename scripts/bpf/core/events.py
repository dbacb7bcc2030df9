"""Event output: NDJSON records on stdout, and the C that moves events and lost counts
out of the kernel (a ring buffer where the kernel has one, else a perf buffer). Python 3.6.
"""

import ctypes
import json
import threading
import time

from core.lifecycle import Stop

RINGBUF_MIN_KERNEL = (5, 8)


C_BUFFERS_RINGBUF = r"""
BPF_RINGBUF_OUTPUT(pkt_events, %(pages)d);
BPF_RINGBUF_OUTPUT(reset_events, %(pages)d);
"""

C_BUFFERS_PERF = r"""
BPF_PERF_OUTPUT(pkt_events);
BPF_PERF_OUTPUT(reset_events);
"""

C_LOST = r"""
static __always_inline void count_lost(__u32 idx)
{
	__u64 *v = lost.lookup(&idx);
	if (v)
		(*v)++;
}
"""


def c_submit(
    buffer: str, table: str, ctx: str, ptr: str, lost_idx: int, ring_flags: str = "0"
) -> str:
    """The statement that sends one event; ring-buffer failures are counted, not dropped.
    `ring_flags`: ringbuf_output's flags (e.g. BPF_RB_NO_WAKEUP for a reader that polls)."""
    if buffer == "ringbuf":
        return "if (%s.ringbuf_output(%s, sizeof(*%s), %s) != 0)\n\t\tcount_lost(%d);" % (
            table,
            ptr,
            ptr,
            ring_flags,
            lost_idx,
        )
    return "%s.perf_submit(%s, %s, sizeof(*%s));" % (table, ctx, ptr, ptr)


def now_ns(clock: str) -> int:
    fn = getattr(time, clock + "_ns", None)
    if fn:
        return fn()
    return int(getattr(time, clock)() * 1e9)


class Output:
    """NDJSON writer; a closed stdout means the controller is gone (bye reason eof).

    Locked, so a record written from the bootstrap's stdin thread (a control line's
    answer) never interleaves with the main loop's."""

    def __init__(self, stream) -> None:
        self.stream = stream
        self.broken = False
        self.lock = threading.Lock()

    def write(self, record: dict) -> None:
        self.write_text(json.dumps(record, separators=(",", ":")) + "\n")

    def write_text(self, line: str) -> None:
        """A record already in NDJSON form (one line, with its newline)."""
        with self.lock:
            if self.broken:
                raise Stop("eof")
            try:
                self.stream.write(line)
            except (BrokenPipeError, ValueError):
                self.broken = True
                raise Stop("eof") from None

    def flush(self) -> None:
        with self.lock:
            if self.broken:
                return
            try:
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                self.broken = True
                raise Stop("eof") from None


class BufferCallbacks:
    """Ring/perf buffer callbacks for a tool's session (which has `out`, `stop` and
    `perf_lost`, one count per perf buffer). Exceptions cannot cross BCC's C boundary, so
    a Stop raised while handling a record is parked as the stop reason for the main loop."""

    def _guard(self, handler, data, size) -> int:
        if self.out.broken:
            return 0
        self.stop.in_callback = True
        try:
            handler(ctypes.string_at(data, size))
        except Stop as exc:
            self.stop.reason = self.stop.reason or exc.reason
        finally:
            self.stop.in_callback = False
        return 0

    def _ring_cb(self, handler):
        return lambda ctx, data, size: self._guard(handler, data, size)

    def _perf_cb(self, handler):
        return lambda cpu, data, size: self._guard(handler, data, size)

    def _lost_cb(self, idx: int):
        def lost(count):
            self.perf_lost[idx] += count

        return lost
