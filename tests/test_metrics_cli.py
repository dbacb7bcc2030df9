"""``ebpfdiag metrics``: usage errors are one line and exit 2 before any host is contacted;
the backoff between reconnects doubles up to its cap, with jitter."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from ebpfdiag.cli.metrics import parse_listen
from ebpfdiag.errors import UsageError
from ebpfdiag.metrics.sessions import BACKOFF_MAX_S, backoff_delays, stale_after
from tests.conftest import require

# A literal host that is never contacted: every case fails before connecting.
HOST = "nobody@198.18.152.250:22"


def ebpfdiag(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ebpfdiag", *argv], capture_output=True, text=True, timeout=30
    )


def one_line_usage_error(proc: subprocess.CompletedProcess, words: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


def test_parse_listen():
    assert parse_listen("127.0.0.1:9469") == ("127.0.0.1", 9469)
    assert parse_listen("[::1]:9469") == ("::1", 9469)
    for bad in ("9469", "localhost:9469", "127.0.0.1:0", "127.0.0.1:x", "[::1]"):
        with pytest.raises(UsageError):
            parse_listen(bad)


@pytest.mark.parametrize(
    ("argv", "words"),
    [
        (["serve", "--listen", "nowhere"], "--listen nowhere"),
        (["serve", "--listen", "127.0.0.1:9469", "--interval", "0"], "--interval"),
        (["serve", "--listen", "127.0.0.1:9469", "--host-label", "bad key!"], "--host-label"),
        (["textfile", "--dir", "/nonexistent/ebmx"], "not a directory"),
    ],
)
def test_usage_errors_are_one_line_exit_2(argv, words):
    one_line_usage_error(ebpfdiag("metrics", argv[0], "--hosts", HOST, *argv[1:]), words)


def test_a_busy_listen_port_is_a_usage_error():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = ebpfdiag("metrics", "serve", "--hosts", HOST, "--listen", f"127.0.0.1:{port}")
    one_line_usage_error(proc, "cannot listen on")


def test_backoff_doubles_to_its_cap_with_jitter():
    middle = backoff_delays(1.0, 8.0, rand=lambda: 0.5)
    assert [next(middle) for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    low, high = backoff_delays(rand=lambda: 0.0), backoff_delays(rand=lambda: 1.0)
    assert next(low) == pytest.approx(0.8) and next(high) == pytest.approx(1.2)
    capped = backoff_delays(rand=lambda: 1.0)
    assert max(next(capped) for _ in range(20)) == pytest.approx(BACKOFF_MAX_S * 1.2)


def test_silence_that_ends_a_run():
    assert stale_after(1.0) == 10.0 and stale_after(15.0) == 45.0


def test_the_documented_alert_rules_pass_promtool(tmp_path):
    require(shutil.which("promtool") is not None, "needs promtool (Debian prometheus)")
    doc = (Path(__file__).resolve().parents[1] / "docs" / "metrics.md").read_text()
    section = doc.split("## Example alert rules", 1)[1]
    rules = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    assert "ebpfdiag_host_up == 0" in rules and "ebpfdiag_tcp_resets_sent_total" in rules
    path = tmp_path / "rules.yml"
    path.write_text(rules)
    proc = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 6 rules found" in proc.stdout


def test_textfile_refuses_a_prom_path_that_is_a_directory(tmp_path):
    (tmp_path / "ebpfdiag.prom").mkdir()
    proc = ebpfdiag("metrics", "textfile", "--hosts", HOST, "--dir", str(tmp_path))
    one_line_usage_error(proc, "is a directory")


def test_a_failed_run_quotes_only_its_own_stderr(monkeypatch):
    """Two runs that fail before their host comes up: the second's reason is its own,
    never the first run's stderr."""
    import asyncio
    import types

    from ebpfdiag.inventory import Host
    from ebpfdiag.metrics import sessions
    from ebpfdiag.metrics.exposition import Fleet

    said = iter([[b"first run: cannot attach"], []])

    class Conn:
        def close(self) -> None:
            pass

    class Run:
        def __init__(self, host, script, ssh, *, on_lines, on_running, on_clock):
            self.on_lines = on_lines

        async def run(self, conn, stop):
            lines = next(said)
            if lines:
                self.on_lines("stderr", lines)
            return types.SimpleNamespace(exit_status=1, exit_signal=None)

    async def connect(host, ssh, jumps):
        return Conn()

    monkeypatch.setattr(sessions, "RemoteRun", Run)
    monkeypatch.setattr(sessions, "connect", connect)

    async def two_runs() -> list[str | None]:
        host = Host("web1", "198.18.152.250")
        session = sessions.HostSession(host, None, None, None, Fleet(["web1"]), 15.0,
                                       lambda *_: None, asyncio.Semaphore(1))  # fmt: skip
        return [await session._once(), await session._once()]

    first, second = asyncio.run(two_runs())
    assert first == "the metrics script ended (exit 1): first run: cannot attach"
    assert second == "the metrics script ended (exit 1)"
