"""run-script's JSON sink: objects pass through structured, everything else as text lines."""

from __future__ import annotations

import io
import json

from ebpfdiag.cli.run_script import JSONSink
from ebpfdiag.render.ndjson import NDJSONWriter


def sink_output(lines: list[tuple[str, bytes]]) -> list[dict]:
    buf = io.StringIO()
    writer = NDJSONWriter(buf)
    sink = JSONSink(writer)
    for stream, line in lines:
        sink.lines('web"01', stream, [line])
    writer.flush()
    return [json.loads(x) for x in buf.getvalue().splitlines()]


def test_objects_pass_through_and_other_lines_stay_text():
    out = sink_output(
        [
            ("stdout", b'{"type":"packet","seq":1,"nested":{"a":[1,2]}}'),
            ("stdout", b'{"spaced": "yes"}  '),
            ("stdout", b'{"a":1} trailing'),
            ("stdout", b"[1,2,3]"),
            ("stdout", b'plain "quoted" \\ text \xc3\xa9'),
            ("stderr", b'{"type":"not-a-record"}'),
            ("stdout", b"{broken"),
        ]
    )
    assert [o["type"] for o in out] == ["record", "record", "line", "line", "line", "line", "line"]
    assert all(o["host"] == 'web"01' and isinstance(o["ts"], int) for o in out)
    assert out[0]["record"] == {"type": "packet", "seq": 1, "nested": {"a": [1, 2]}}
    assert out[1]["record"] == {"spaced": "yes"}
    assert out[2]["text"] == '{"a":1} trailing'
    assert out[4]["text"] == 'plain "quoted" \\ text é'
    assert out[5]["stream"] == "stderr"


def test_a_batch_keeps_order_and_shares_its_arrival_time():
    buf = io.StringIO()
    writer = NDJSONWriter(buf)
    JSONSink(writer).lines("h1", "stdout", [b'{"n":1}', b"two", b'{"n":3}'])
    writer.flush()
    out = [json.loads(x) for x in buf.getvalue().splitlines()]
    assert [o.get("record", o.get("text")) for o in out] == [{"n": 1}, "two", {"n": 3}]
    assert len({o["ts"] for o in out}) == 1


def test_every_record_starts_with_the_schema_version():
    buf = io.StringIO()
    writer = NDJSONWriter(buf)
    JSONSink(writer).lines("h1", "stdout", [b'{"n":1}', b"two"])
    writer.write({"type": "summary", "hosts": 1})
    writer.write({"v": 1, "type": "host", "host": "h1"})  # read back from an old file
    writer.flush()
    lines = buf.getvalue().splitlines()
    assert all(line.startswith('{"v":2,"type":') for line in lines), lines
    assert [json.loads(x)["v"] for x in lines] == [2, 2, 2, 2]
    assert lines[3].count('"v"') == 1


def test_bytes_and_text_keep_their_order_on_a_binary_stream():
    """Batches go to the binary buffer under stdout; what was written as text before them
    (a plain line from elsewhere, a record) is flushed first."""
    raw = io.BytesIO()
    stream = io.TextIOWrapper(raw, encoding="utf-8", write_through=False)
    writer = NDJSONWriter(stream)
    writer.write({"type": "a"})
    writer.flush()
    stream.write('{"v":2,"type":"text"}\n')  # still in the text layer's buffer
    JSONSink(writer).lines("h1", "stdout", [b'{"n":1}', "é".encode()])
    writer.write({"type": "z", "t": "é"})
    writer.flush()
    out = [json.loads(x) for x in raw.getvalue().decode().splitlines()]
    assert [o["type"] for o in out] == ["a", "text", "record", "line", "z"]
    assert out[3]["text"] == "é" and out[4]["t"] == "é"


def test_a_lone_surrogate_in_a_record_is_replaced_not_fatal():
    raw = io.BytesIO()
    writer = NDJSONWriter(io.TextIOWrapper(raw, encoding="utf-8"))
    writer.write({"type": "x", "s": "a\ud800b"})
    writer.flush()
    assert json.loads(raw.getvalue().decode()) == {"v": 2, "type": "x", "s": "a?b"}
