"""Script output lines -> JSON: the controller's per-chunk fast paths.

A busy host sends hundreds of lines per SSH packet. Everything here works on a whole chunk
of lines with one C call where it can (msgspec), because a Python-level step per line is
what dominates the controller's CPU on a fast stream.
"""

from __future__ import annotations

import operator

import msgspec

from ebpfdiag.render.ndjson import RECORD_HEAD

_decode_one = msgspec.json.Decoder().decode
#: Decodes only flat objects: every value a string, an int, a boolean or null.
_decode_flat = msgspec.json.Decoder(dict[str, str | int | bool | None]).decode
_check_one = msgspec.json.Decoder(msgspec.Raw).decode
_check_many = msgspec.json.Decoder(list[msgspec.Raw]).decode
_dumps = msgspec.json.Encoder().encode


def decode_object(line: bytes | str) -> dict | None:
    """The JSON object a line holds, or None when it is not exactly one object."""
    try:
        obj = _decode_one(line)
    except ValueError:  # msgspec.DecodeError, or invalid UTF-8 in a string
        return None
    return obj if type(obj) is dict else None


def decode_objects(lines: list[bytes]) -> list[dict | None]:
    """``decode_object`` for each line of a chunk: the decoder mapped over it in C when
    every line is an object (the usual case on a busy stream), else line by line."""
    try:
        objs = list(map(_decode_one, lines))
    except ValueError:
        return [decode_object(line) for line in lines]
    if set(map(type, objs)) <= {dict}:
        return objs
    return [obj if type(obj) is dict else None for obj in objs]


def decode_flat_objects(lines: list[bytes]) -> tuple[list[dict | None], bool]:
    """``decode_objects``, and whether every line is a flat object (each value a string, an
    int, a boolean or null: what ``NDJSONWriter.write_flat`` takes unchecked). A typed
    decoder says so while it decodes, as fast as the plain one; a chunk with anything
    else is decoded again by ``decode_objects``."""
    try:
        return list(map(_decode_flat, lines)), True
    except ValueError:  # msgspec.ValidationError or DecodeError, or invalid UTF-8
        return decode_objects(lines), False


def is_object(line: bytes) -> bool:
    """Whether a line is exactly one JSON object (blanks after it allowed), without decoding."""
    if line[:1] != b"{":
        return False
    try:
        _check_one(line)
    except msgspec.DecodeError:
        return False
    return True


def all_objects(lines: list[bytes]) -> bool:
    """Whether every line of a chunk is exactly one JSON object: one validating pass in C.

    Joined with commas inside brackets, the lines form an array; when its values are as
    many as the lines and each is as long as its line, every value is exactly its line
    (the only bytes left over are the commas between them). Each starting with ``{`` makes
    every value an object.
    """
    if not lines or not _starts_all(lines, b"{"):
        return False
    try:
        values = _check_many(b"[" + b",".join(lines) + b"]")
    except msgspec.DecodeError:
        return False
    return list(map(len, values)) == list(map(len, lines))


_first_byte = operator.itemgetter(0)


def _starts_all(lines: list[bytes], prefix: bytes) -> bool:
    """Every line starts with ``prefix`` (one byte): the first bytes gathered in C."""
    try:
        return set(map(_first_byte, lines)) == {prefix[0]}
    except IndexError:  # an empty line
        return False


def json_lines(host: str, ts: int, stream: str, lines: list[bytes]) -> bytes:
    """One batch of a host's output as NDJSON records, in order, each ending in a newline.

    A line that is one JSON object becomes ``{"v":2,"type":"record","host","ts","record":{...}}``
    with the object spliced in as the host printed it (valid JSON is not re-encoded); any
    other line, and everything on stderr, becomes ``{"type":"line",...,"text":"..."}``.
    The batch shares ``ts`` (its lines arrived together). When every line is an object in
    valid UTF-8 (a busy script's usual chunk), the whole batch is one join of bytes in C:
    no Python object per record.
    """
    host_json = _dumps(host)
    head = b'%s"type":"record","host":%s,"ts":%d,"record":' % (_HEAD, host_json, ts)
    if stream == "stdout" and all_objects(lines):
        body = (b"}\n" + head).join(lines)
        if body.isascii() or _is_utf8(body):
            return head + body + b"}\n"
    text_head = b'%s"type":"line","host":%s,"ts":%d,"stream":"%s","text":' % (
        _HEAD,
        host_json,
        ts,
        stream.encode(),
    )
    out = []
    for line in lines:
        text = line.decode(errors="replace")
        if stream == "stdout" and is_object(line):
            out.append(head + text.rstrip().encode() + b"}\n")
        else:
            out.append(text_head + _dumps(text) + b"}\n")
    return b"".join(out)


_HEAD = RECORD_HEAD.encode()


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True
