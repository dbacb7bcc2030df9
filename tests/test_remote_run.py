"""RemoteRun's conversation with a host, driven packet by packet through its channel
callbacks (no outside part: the SSH side is a recording stand-in), and StopSignal."""

from __future__ import annotations

import asyncio

import pytest
from asyncssh.constants import EXTENDED_DATA_STDERR

from ebpfdiag.inventory import Host
from ebpfdiag.transport import HostFailure, RemoteRun, Script, SSHOptions, StopSignal

MARK = b"\x1eebpfdiag:"


class Channel:
    """Records what the run writes; closing it ends the session as asyncssh does."""

    def __init__(self, session):
        self.session = session
        self.data = b""
        self.eof = False
        self.closed = False
        self.exit_status: int | None = None
        #: a link where nothing comes back any more (packets dropped on the way)
        self.dead = False

    def write(self, data: bytes) -> None:
        if self.eof or self.closed:
            raise BrokenPipeError("channel not open for sending")
        self.data += data

    def write_eof(self) -> None:
        self.eof = True

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            if not self.dead:  # the host confirms the close
                asyncio.get_running_loop().call_soon(self.session.connection_lost, None)

    def get_exit_status(self) -> int | None:
        return self.exit_status

    def get_exit_signal(self) -> None:
        return None

    # what the host does
    def stderr(self, data: bytes) -> None:
        self.session.data_received(data, EXTENDED_DATA_STDERR)

    def stdout(self, data: bytes) -> None:
        self.session.data_received(data, None)

    def exit(self, status: int) -> None:
        self.session.eof_received()
        self.exit_status = status
        self.close()


class Conn:
    def __init__(self, opened: asyncio.Event | None = None):
        self.opened = opened
        self.chan: Channel | None = None
        self.ready = asyncio.Event()

    def get_extra_info(self, name: str) -> str:
        return "diag"

    async def create_session(self, factory, command, **kwargs):
        if self.opened is not None:
            await self.opened.wait()
        session = factory()
        self.chan = Channel(session)
        self.ready.set()
        return self.chan, session


def new_run(script: Script, lines: list, stop_grace: float = 5.0) -> RemoteRun:
    return RemoteRun(
        Host(name="web1", address="198.18.0.1", user="diag"),
        script,
        SSHOptions(),
        on_lines=lambda stream, batch: lines.append((stream, batch)),
        on_running=lambda: lines.append(("state", [b"running"])),
        on_clock=None,
        stop_grace=stop_grace,
    )


def test_the_script_goes_when_asked_and_lines_are_whole_across_packets():
    script = Script("probe.py", b"print(1)\n")
    lines: list = []

    async def scenario():
        conn, stop = Conn(), StopSignal()
        run = new_run(script, lines)
        task = asyncio.ensure_future(run.run(conn, stop))
        await conn.ready.wait()
        chan = conn.chan
        assert chan.data == b""  # nothing before the host asks
        chan.stderr(MARK + b"want-scr")  # a marker cut between two packets
        assert chan.data == b""
        chan.stderr(b"ipt 3.11.2\n")
        assert chan.data == script.frame()
        chan.stderr(MARK + b"running 42\nwarn")
        chan.stdout(b"one\ntw")
        chan.stdout(b"o\nthree")  # no newline before the end: still a line
        chan.exit(0)
        return await task, run

    outcome, run = asyncio.run(scenario())
    assert (outcome.exit_status, outcome.stopped_by_us, outcome.via) == (0, False, "sudo")
    assert lines == [
        ("state", [b"running"]),
        ("stdout", [b"one"]),
        ("stdout", [b"two"]),
        ("stdout", [b"three"]),
        ("stderr", [b"warn"]),
    ]


def test_a_stop_while_the_channel_opens_sends_eof_and_no_script():
    lines: list = []

    async def scenario():
        opened = asyncio.Event()
        conn, stop = Conn(opened), StopSignal()
        run = new_run(Script("probe.py", b"print(1)\n"), lines)
        task = asyncio.ensure_future(run.run(conn, stop))
        await asyncio.sleep(0)
        stop.set()  # before the channel exists
        opened.set()
        await conn.ready.wait()
        await asyncio.sleep(0)
        assert conn.chan.eof
        conn.chan.stderr(MARK + b"want-script 3.11.2\n")  # too late: nothing is sent
        assert conn.chan.data == b""
        conn.chan.exit(98)
        return await task

    outcome = asyncio.run(scenario())
    assert outcome.stopped_by_us and outcome.exit_status == 98


def test_a_script_that_does_not_exit_once_stopped_fails_after_the_grace_even_on_a_dead_link():
    lines: list = []

    async def scenario():
        conn, stop = Conn(), StopSignal()
        run = new_run(Script("probe.py", b"print(1)\n"), lines, stop_grace=0.05)
        task = asyncio.ensure_future(run.run(conn, stop))
        await conn.ready.wait()
        conn.chan.stderr(MARK + b"want-script 3.11.2\n" + MARK + b"running 42\n")
        conn.chan.dead = True  # nothing more from the host, not even the close
        stop.set()
        assert conn.chan.eof and not conn.chan.closed
        with pytest.raises(HostFailure) as failure:
            await asyncio.wait_for(task, 5.0)  # a run waiting for the dead host would hang
        return failure.value, conn.chan

    failure, chan = asyncio.run(scenario())
    assert failure.kind == "stop" and "within 0.05s of being stopped" in str(failure)
    assert chan.closed


def test_a_stop_after_the_script_ended_is_not_ours():
    async def scenario():
        conn, stop = Conn(), StopSignal()
        run = new_run(Script("probe.py", b"print(1)\n"), [], stop_grace=0.05)
        task = asyncio.ensure_future(run.run(conn, stop))
        await conn.ready.wait()
        conn.chan.stderr(MARK + b"want-script 3.11.2\n" + MARK + b"running 42\n")
        conn.chan.session.eof_received()
        stop.set()
        assert not conn.chan.eof
        conn.chan.exit_status = 3
        conn.chan.close()
        return await task

    outcome = asyncio.run(scenario())
    assert outcome.exit_status == 3 and not outcome.stopped_by_us


def test_a_launch_that_never_ran_is_explained():
    async def scenario():
        conn, stop = Conn(), StopSignal()
        run = new_run(Script("probe.py", b"print(1)\n"), [])
        task = asyncio.ensure_future(run.run(conn, stop))
        await conn.ready.wait()
        conn.chan.stderr(b"sudo: a password is required\n")
        conn.chan.exit(1)
        with pytest.raises(HostFailure) as failure:
            await task
        return failure.value

    failure = asyncio.run(scenario())
    assert failure.kind == "sudo" and "sudo needs a password on web1" in str(failure)


def test_stop_signal_calls_back_once_and_forgets():
    calls: list[str] = []
    stop = StopSignal()
    forget = stop.on_set(lambda: calls.append("a"))
    stop.on_set(lambda: calls.append("b"))
    forget()
    stop.set()
    stop.set()
    stop.on_set(lambda: calls.append("late"))  # already set: at once
    assert calls == ["b", "late"] and stop.is_set()
