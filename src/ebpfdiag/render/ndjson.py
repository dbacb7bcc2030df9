"""NDJSON on stdout: one compact JSON object per line, every record with a ``type``.

Every record starts with the schema version, ``{"v":2,...``: ``write`` adds it (and
``write_flat``, for records known to hold only strings, ints, booleans and nulls), and
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
from collections.abc import Callable, Iterable

import msgspec

_dumps = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
_encode = msgspec.json.Encoder().encode
#: Types msgspec encodes byte for byte as ``_dumps`` does (every string, every int);
#: floats are not (``1e+16`` becomes ``1e16``), nor are containers that may hold them.
_SAME_BYTES = frozenset({str, int, bool, type(None)})

#: Version of the record shapes in docs/json.md; raised when a field changes meaning.
SCHEMA_VERSION = 2
#: How every record line starts: the opening brace and the version.
RECORD_HEAD = f'{{"v":{SCHEMA_VERSION},'
_HEAD = RECORD_HEAD.encode()
_NEXT_HEAD = b"\n" + _HEAD
#: Pending output written at once even while the producer is still busy.
FLUSH_BYTES = 1 << 20


def _without_v(record: dict) -> dict:
    """A record read back from a file keeps one version: the writer's."""
    return {k: v for k, v in record.items() if k != "v"}


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
        if "v" in record:
            record = _without_v(record)
        # A record of strings and ints goes through msgspec, several times faster than
        # json, with the same bytes (``write_flat`` skips this check where it is known).
        if set(map(type, record.values())) <= _SAME_BYTES:
            try:
                "".join(record)  # every key a string (msgspec writes float keys its own way)
                data = _HEAD + _encode(record)[1:] + b"\n"
            except (TypeError, UnicodeEncodeError):  # a key that is not, a lone surrogate
                pass
            else:
                self.write_bytes(data)
                return
        # a lone surrogate (from a decoded escape) would not encode: replaced, not fatal
        self.write_bytes((RECORD_HEAD + _dumps(record)[1:] + "\n").encode(errors="replace"))

    def write_flat(self, records: Iterable[dict]) -> None:
        """``write`` for each of ``records``, known to be flat: string keys, and values
        that are strings, ints, booleans or None (hosts' records decoded by
        ``records.decode_flat_objects``, with the controller's additions), which msgspec
        encodes as json does. Nothing is checked: the busiest streams are all such."""
        records = list(records)
        if not records:
            return
        try:
            # each object's opening brace becomes the head: the objects joined by the head
            bodies = [_encode(_without_v(r) if "v" in r else r)[1:] for r in records]
        except UnicodeEncodeError:  # a lone surrogate: replaced, as ``write`` does
            for record in records:
                self.write(record)
            return
        self.write_bytes(_HEAD + _NEXT_HEAD.join(bodies) + b"\n")

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
