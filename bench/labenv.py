"""The benchmark's own client -> lb -> server lab (built as ``ebpfdiag lab up`` builds one)
and a running ``trace tcp-rst`` in it."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from bench.builds import CURRENT, Build
from bench.common import is_record

PREFIX = "eblb"
BASE = "198.18.84.0"
STATE_DIR = Path("/run/ebpfdiag/lab-bench")
HOSTS = "client,lb,server"


@contextlib.contextmanager
def bench_lab() -> Iterator:
    """A fresh lab (whatever a crashed run left is removed first), always taken down."""
    from ebpfdiag.lab.topology import Lab

    lab = Lab(state_dir=STATE_DIR, prefix=PREFIX, base=BASE,
              inventory_out=STATE_DIR / "inventory.yaml")  # fmt: skip
    lab.down()
    try:
        yield lab.up()
    finally:
        lab.down()


def ns_argv(state, host: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", state.host(host).netns, *argv]


class Tracer:
    """``ebpfdiag trace COMMAND --json`` on lab hosts (tcp-rst by default), as a user would
    run it, with ``extra`` arguments after the ports."""

    def __init__(
        self,
        state,
        ports: list[int],
        build: Build = CURRENT,
        hosts: str = HOSTS,
        command: str = "tcp-rst",
        extra: tuple[str, ...] = (),
    ):
        self.state = state
        self.ports = ports
        self.build = build
        self.hosts = hosts
        self.command = command
        self.extra = list(extra)
        #: monotonic times of the ``tracing`` record and of the stop, for records/s
        self.started = self.stopped = 0.0
        self.proc: subprocess.Popen | None = None
        self.ready_s: float | None = None
        self._drain: threading.Thread | None = None
        #: event records (packets and resets) the trace printed after it was ready
        self.events = 0
        #: host -> seconds from the process start to its ``ready`` status record (the
        #: trace's own figure; builds without per-host records leave it empty)
        self.host_ready: dict[str, float] = {}
        #: host -> its hello record (they come at the end of the run)
        self.hellos: dict[str, dict] = {}

    def start(self, timeout: float = 60.0) -> float:
        """Start and wait for the ``tracing`` status record; returns seconds until it came."""
        argv = [*self.build.argv, "trace", self.command, "-i", str(self.state.inventory),
                "--hosts", self.hosts, "--json"]  # fmt: skip
        for port in self.ports:
            argv += ["--port", str(port)]
        argv += self.extra
        t0 = time.monotonic()
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=self._err, env=self.build.environ()
        )
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            rec = json.loads(line)
            if rec.get("type") != "status":
                continue
            if rec.get("state") == "ready":
                self.host_ready[rec["host"]] = rec["after_s"]
            elif rec.get("state") == "tracing":
                if sorted(rec["hosts"]) != sorted(self.hosts.split(",")):
                    self.stop()
                    raise RuntimeError(f"trace ready on only {rec['hosts']}")
                self.started = time.monotonic()
                self.ready_s = self.started - t0
                # keep reading, so a busy trace never blocks on a full pipe
                self._drain = threading.Thread(target=self._count_events, daemon=True)
                self._drain.start()
                return self.ready_s
        err = self.stop()
        raise RuntimeError(f"trace {self.command} never became ready: {err[-300:]}")

    def _count_events(self) -> None:
        for line in self.proc.stdout:
            if is_record(line, "event"):
                self.events += 1
            elif is_record(line, "hello"):
                rec = json.loads(line)
                self.hellos[rec["host"]] = rec

    def stop(self) -> str:
        """Interrupt it like Ctrl-C; it detaches everywhere and exits. Returns its stderr."""
        if self.proc is None:
            return ""
        self.stopped = time.monotonic()
        proc, self.proc = self.proc, None
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if self._drain is not None:
            self._drain.join(timeout=10)
            self._drain = None
        self._err.seek(0)
        err = self._err.read()
        self._err.close()
        if proc.returncode not in (0, 130):
            raise RuntimeError(
                f"trace {self.command} exited {proc.returncode}: {err.decode()[-300:]}"
            )
        return err.decode(errors="replace")

    @property
    def records_per_s(self) -> float:
        """Event records the controller printed per second of tracing."""
        return self.events / max(self.stopped - self.started, 1e-9)

    def __enter__(self) -> Tracer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
