"""``ebpfdiag trace drop``: help with examples, bad input refused in one line (exit 2) by
the tool's own parameter schema before any host is contacted."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import ebpfdiag.catalog
from ebpfdiag.cli.app import main


@pytest.fixture
def drop_tool() -> Path:
    """The shipped drop tool, whose parameter schema the CLI checks against."""
    return ebpfdiag.catalog.script_path("drop")


@pytest.fixture
def inv(tmp_path) -> Path:
    path = tmp_path / "inventory.yaml"
    path.write_text("hosts:\n  lb: {address: 198.18.200.1}\n  web: {address: 198.18.200.2}\n")
    return path


def run(capsys, *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def one_line_error(code: int, out: str, err: str, *needles: str) -> str:
    assert code == 2, (code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ebpfdiag: ") and "Traceback" not in err
    assert out == ""
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_help_has_examples():
    r = subprocess.run(
        [sys.executable, "-m", "ebpfdiag", "trace", "drop", "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Where a flow's packets die" in r.stdout
    assert "Examples:" in r.stdout
    assert "ebpfdiag trace drop --hosts client,lb,server --port 80" in r.stdout
    for option in ("--port", "--addr", "--duration", "--count", "--rate", "--json", "--output"):
        assert option in r.stdout


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--rate", "-1"), "--rate"),
        (("--rate", "many"), "--rate"),
        (("--port", "99999"), "99999"),
        (("--port", "80,http"), "http"),
        (("--addr", "foo"), "foo"),
    ],
)
def test_bad_tool_parameters_are_one_line_and_exit_2(capsys, drop_tool, inv, args, needle):
    code, out, err = run(capsys, "trace", "drop", "-i", str(inv), "--hosts", "lb", *args)
    one_line_error(code, out, err, needle)


def test_good_tool_parameters_pass_the_schema(capsys, drop_tool, inv):
    """Valid values get past the schema: the next check (the host expression) speaks."""
    code, out, err = run(
        capsys, "trace", "drop", "-i", str(inv), "--hosts", "nosuch",
        "--port", "80,8080", "--addr", "198.18.1.10", "--rate", "50",
    )  # fmt: skip
    line = one_line_error(code, out, err, "nosuch")
    assert "--rate" not in line and "--port" not in line


@pytest.mark.parametrize(
    ("args", "needle"),
    [(("--count", "0"), "--count"), (("--duration", "soon"), "soon")],
)
def test_bad_stop_conditions_are_one_line_and_exit_2(capsys, drop_tool, inv, args, needle):
    code, out, err = run(capsys, "trace", "drop", "-i", str(inv), "--hosts", "lb", *args)
    one_line_error(code, out, err, needle)


def test_unwritable_output_is_refused_before_the_hosts(capsys, drop_tool, inv, tmp_path):
    missing = tmp_path / "no-such-dir" / "drop.json"
    code, out, err = run(
        capsys, "trace", "drop", "-i", str(inv), "--hosts", "lb", "--output", str(missing)
    )
    one_line_error(code, out, err, str(missing))


def _fed_session(count: int | None = None, fanout=None, pings: int = 2):  # noqa: ANN001
    """A drop session fed by hand with a three-host stream whose SYN dies on lb, each host
    pinged at the same instants (the stream's true clocks): at its end and, with
    ``pings`` 2, also 1 s before, at its start (without that ping the clocks' drift
    allowance over that second makes their errors 0.2 ms)."""
    import json
    import time

    from ebpfdiag.cli.trace import _drop_session
    from ebpfdiag.clock import ClockSample
    from tests.test_drop import CLIENT, HOSTS, VIP, Stream

    s = Stream()
    s.syn(drop_on_lb=True)
    s.t += 1_000_000_000
    s.retrans("client", (CLIENT, 40000, VIP, 80), dt=-5_000)
    s.syn(ipid=2, drop_on_lb=True)
    s.all_counted(lb=[("NETFILTER_DROP", 12, "nf_hook_slow+0x9a", 1, 1)])  # an early report
    s.all_counted(lb=[("NETFILTER_DROP", 12, "nf_hook_slow+0x9a", 2, 2)])
    shown: list[dict] = []
    session = _drop_session(list(HOSTS), count, on_event=shown.append, settle_s=0)
    session.fanout = fanout
    now = time.monotonic_ns()
    for host in HOSTS:
        for back in (1_000_000_000, 0)[2 - pings :]:
            sent = now - back
            session.clock(host, ClockSample(sent, s.mono(host, -back), sent + 2_000))
    for rec in s.records:
        line = json.dumps({k: v for k, v in rec.items() if k != "host"}).encode()
        session.lines(rec["host"], "stdout", [line])
    return session, shown


def test_a_live_span_within_the_clocks_errors_is_only_a_bound():
    """One ping per host, at the end of the stream: 1 s earlier the clocks' errors are
    0.2 ms each, more than the SYN's 0.080 ms from client to lb."""
    session, _shown = _fed_session(pings=1)
    first = session.correlate().drops[0]
    assert first.err_ns > 100_000
    assert "dropped on lb by NETFILTER_DROP (nf_hook_slow), < 0.502 ms later;" in first.text


def test_the_session_collects_drop_records_and_answers_the_drop_question():
    import io
    import json

    from ebpfdiag.cli.app import App
    from ebpfdiag.cli.trace import _conclude_drop

    session, shown = _fed_session()
    assert {r["type"] for r in shown} == {"packet", "drop", "retrans"}  # shown live, aligned
    assert all(isinstance(r.get("ts"), int) for r in shown)
    out = io.StringIO()
    app = App(stdout=out, stderr=io.StringIO())
    app.as_json = True
    assert _conclude_drop(app, session, False, None) == 0
    recs = [json.loads(line) for line in out.getvalue().splitlines()]
    assert all("type" in r and r["v"] for r in recs)
    by_type: dict[str, list[dict]] = {}
    for r in recs:
        by_type.setdefault(r["type"], []).append(r)
    assert [r["host"] for r in by_type["drop"]] == ["lb", "lb"]
    assert "0.080 ms later" in by_type["drop"][0]["text"]
    assert [r["matched"] for r in by_type["drop_count"]] == [2]  # the last report counts
    totals = [(r["host"], r["kind"]) for r in by_type["event"] if r["kind"] == "drop_counts"]
    assert sorted(totals) == [("client", "drop_counts"), ("lb", "drop_counts"),
                              ("server", "drop_counts")]  # fmt: skip
    assert {r["host"] for r in by_type["host"]} == {"client", "lb", "server"}
    summary = recs[-1]
    assert summary["type"] == "summary" and summary["verdict"] == "dropped"
    assert (summary["hosts"], summary["drops"], summary["flows"]) == (3, 2, 1)


def test_count_stops_the_trace_after_n_drop_events():
    import asyncio

    from ebpfdiag.tracing import COUNT_SETTLE_S

    class Engine:
        stopped = 0

        def stop(self) -> None:
            self.stopped += 1

    async def feed(count: int) -> int:
        engine = Engine()
        _fed_session(count, engine)
        await asyncio.sleep(COUNT_SETTLE_S + 0.1)
        return engine.stopped

    assert asyncio.run(feed(2)) == 1
    assert asyncio.run(feed(3)) == 0  # only two drops came


def test_drop_windows_merge_close_drops_and_stay_bounded():
    from ebpfdiag.cli.trace import DROP_WINDOW_GAP_NS, DROP_WINDOWS_MAX, drop_windows

    assert drop_windows([]) == []
    assert drop_windows([5, 1, 1 + DROP_WINDOW_GAP_NS]) == [(1, 1 + DROP_WINDOW_GAP_NS)]
    far = [i * 3 * DROP_WINDOW_GAP_NS for i in range(DROP_WINDOWS_MAX + 4)]
    windows = drop_windows(far)
    assert len(windows) == DROP_WINDOWS_MAX and (windows[0][0], windows[-1][1]) == (0, far[-1])


def test_every_host_is_told_the_drops_in_its_own_time_once_before_the_stop():
    from tests.test_drop import HOSTS, Stream

    class Engine:
        def __init__(self) -> None:
            self.sent: list[tuple[str, str]] = []

        def control(self, host: str, text: str) -> bool:
            self.sent.append((host, text))
            return True

    engine = Engine()
    session, _shown = _fed_session(fanout=engine)
    session.send_windows()
    session.send_windows()  # duration and Ctrl-C may both stop: said once
    assert sorted(h for h, _ in engine.sent) == sorted(HOSTS)
    s = Stream()  # the fed stream's drops: lb at s.t (first SYN) and one second later
    for host, text in engine.sent:
        word, spans = text.split(" ")
        lo, hi = (int(x) for x in spans.split("-"))
        assert word == "drops" and "," not in spans
        first, last = s.mono(host, 0), s.mono(host, 1_000_000_000)
        assert abs(lo - first) < 100_000 and abs(hi - last) < 100_000, (host, lo - first)


def test_no_drop_no_control_line():
    from ebpfdiag.cli.trace import _drop_session

    sent: list[str] = []

    class Engine:
        def control(self, host: str, text: str) -> bool:
            sent.append(text)
            return True

    session = _drop_session(["client", "lb"], None)
    session.fanout = Engine()
    session.send_windows()
    assert sent == []


def test_show_renders_a_saved_drop_trace_as_the_live_command_did(tmp_path):
    import io
    import json
    import subprocess
    import sys

    from ebpfdiag.cli.app import App
    from ebpfdiag.cli.trace import _conclude_drop

    session, _shown = _fed_session()
    document, stream = tmp_path / "drop.json", tmp_path / "drop.ndjson"
    out = io.StringIO()
    app = App(stdout=out, stderr=io.StringIO())
    app.as_json = True
    assert _conclude_drop(app, session, False, document) == 0
    live = [json.loads(line) for line in out.getvalue().splitlines()]
    # a --json stream holds the live events too (the fed session showed them as they came)
    stream.write_text(
        "".join(json.dumps({**r, "type": "event", "kind": r["type"]}) + "\n" for r in _shown)
        + out.getvalue()
    )

    def answer(recs: list[dict]) -> tuple:
        summary = next(r for r in recs if r["type"] == "summary")
        return (
            [r["text"] for r in recs if r["type"] == "drop"],
            [(r["host"], r["reason"], r["matched"]) for r in recs if r["type"] == "drop_count"],
            (summary["verdict"], summary["drops"], summary["flows"]),
        )

    for saved in (document, stream):
        proc = subprocess.run(
            [sys.executable, "-m", "ebpfdiag", "show", str(saved), "--json"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        shown = [json.loads(line) for line in proc.stdout.splitlines()]
        assert answer(shown) == answer(live), saved.name
        assert answer(shown)[0] and "0.080 ms later" in answer(shown)[0][0]
        terminal = subprocess.run(
            [sys.executable, "-m", "ebpfdiag", "show", str(saved)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert terminal.returncode == 0 and "NETFILTER_DROP" in terminal.stdout, terminal.stderr


def test_the_engine_calls_its_before_stop_hook_at_each_stop():
    from ebpfdiag.fanout import Fanout

    calls: list[bool] = []
    engine = Fanout([], None, None, None, before_stop=lambda: calls.append(engine.interrupted))  # type: ignore[arg-type]
    engine.stop(interrupted=True)
    engine.stop()
    assert calls == [False, True] and engine.interrupted


def test_a_session_holds_and_aligns_the_record_types_it_is_given():
    from ebpfdiag.tracing import TraceSession

    session = TraceSession(["a"], held=("packet", "drop"), settle_s=3600)
    session.lines("a", "stdout", [b'{"type": "drop", "ts_ns": 5}', b'{"type": "retrans"}'])
    assert [rec["type"] for rec in session._waiting] == ["drop"]  # held, not shown yet
    default = TraceSession(["a"], settle_s=3600)
    default.lines("a", "stdout", [b'{"type": "drop", "ts_ns": 5}'])
    assert default._waiting == []
