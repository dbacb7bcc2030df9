"""NDJSON on stdout: one compact JSON object per line, every record with a ``type``.

Every record starts with the schema version, ``{"v":2,...``: ``write`` adds it, and
producers that splice pre-encoded objects (run-script's pass-through) hand over bytes whose
lines start with ``RECORD_HEAD``, so that no line is decoded or copied again here.

Writes are batched and flushed when the producer is idle, as bytes to the binary stream
under stdout: a fast stream costs few syscalls and no re-encoding, while a slow one still
appears line by line. A closed pipe (``| head``) is not an error: the writer remembers it
and the command stops its hosts cleanly.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode

#: Version of the record shapes in docs/json.md; raised when a field changes meaning.
SCHEMA_VERSION = 2
#: How every record line starts: the opening brace and the version.
RECORD_HEAD = f'{{"v":{SCHEMA_VERSION},'
#: Pending output written at once even while the producer is still busy.
FLUSH_BYTES = 1 << 20


class NDJSONWriter:
    def __init__(self, stream=None, on_closed: Callable[[], None] | None = None):
        self.stream = stream or sys.stdout
        self.on_closed = on_closed
        self.closed = False
        self._pending: list[bytes] = []
        self._size = 0
        self._scheduled = False

    def write(self, record: dict) -> None:
        """One record (never empty: it has a ``type``), with the schema version first."""
        if "v" in record:  # a record read back from a file keeps one version: this one
            record = {k: v for k, v in record.items() if k != "v"}
        # a lone surrogate (from a decoded escape) would not encode: replaced, not fatal
        self.write_bytes((RECORD_HEAD + _dumps(record)[1:] + "\n").encode(errors="replace"))

    def write_bytes(self, data: bytes) -> None:
        """Records already encoded: UTF-8 JSON objects starting with ``RECORD_HEAD``, each
        ending in a newline, in order (one call per batch; the bytes are written as they
        are)."""
        if self.closed or not data:
            return
        self._pending.append(data)
        self._size += len(data)
        if self._size >= FLUSH_BYTES:
            self.flush()
        elif not self._scheduled:
            # No event loop can run before asyncio is imported: commands that never start
            # one (hosts, show) do not pay for importing it.
            aio = sys.modules.get("asyncio")
            if aio is None:
                self.flush()
                return
            try:
                aio.get_running_loop().call_soon(self.flush)
                self._scheduled = True
            except RuntimeError:
                self.flush()

    def flush(self) -> None:
        """Write what is pending: as bytes to the stream's binary buffer when it has one
        (after flushing its text layer, so that order is kept), else decoded. Pieces go
        one by one, not joined: a chunk-sized write costs one syscall, while a joined copy
        of many would be a fresh allocation to fault in."""
        self._scheduled = False
        if self.closed or not self._pending:
            return
        pending = self._pending
        self._pending = []
        self._size = 0
        try:
            binary = getattr(self.stream, "buffer", None)
            if binary is None:
                self.stream.write(b"".join(pending).decode())
                self.stream.flush()
            else:
                self.stream.flush()
                for data in pending:
                    binary.write(data)
                binary.flush()
        except BrokenPipeError:
            self.closed = True
            if self.on_closed is not None:
                self.on_closed()
