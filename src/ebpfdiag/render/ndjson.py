"""NDJSON on stdout: one compact JSON object per line, every record with a ``type``.

Every record starts with the schema version, ``{"v":2,...``: ``write`` adds it, and
producers that splice pre-encoded objects (run-script's pass-through) start their lines
with ``RECORD_HEAD`` so that no line is decoded or copied again here.

Writes are batched and flushed when the producer is idle, so a fast stream costs few
syscalls while a slow one still appears line by line. A closed pipe (``| head``) is not an
error: the writer remembers it and the command stops its hosts cleanly.
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


class NDJSONWriter:
    def __init__(self, stream=None, on_closed: Callable[[], None] | None = None):
        self.stream = stream or sys.stdout
        self.on_closed = on_closed
        self.closed = False
        self._pending: list[str] = []
        self._scheduled = False

    def write(self, record: dict) -> None:
        """One record (never empty: it has a ``type``), with the schema version first."""
        if "v" in record:  # a record read back from a file keeps one version: this one
            record = {k: v for k, v in record.items() if k != "v"}
        self.write_many([RECORD_HEAD + _dumps(record)[1:]])

    def write_many(self, lines: list[str]) -> None:
        """Lines that are already JSON objects starting with ``RECORD_HEAD``, in order
        (one call per batch)."""
        if self.closed or not lines:
            return
        self._pending.extend(lines)
        if len(self._pending) >= 1024:
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
        self._scheduled = False
        if self.closed or not self._pending:
            return
        data = "\n".join(self._pending) + "\n"
        self._pending.clear()
        try:
            self.stream.write(data)
            self.stream.flush()
        except BrokenPipeError:
            self.closed = True
            if self.on_closed is not None:
                self.on_closed()
