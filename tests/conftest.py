"""Shared test set-up.

Tests marked ``root`` use real parts (network namespaces, sshd, BPF, nftables). On a
laptop without root they skip; under CI (``CI=true``) a missing prerequisite fails the
test instead, so a green CI run means they really ran.
"""

import contextlib
import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True, scope="session")
def _own_caches(tmp_path_factory):
    """What the tests' controllers keep (compiled programs, parsed inventories) goes to
    caches of the session's own, never the user's; as for a user, a trace started again
    loads its kept programs."""
    names = ("EBPFDIAG_PROGRAM_CACHE", "XDG_CACHE_HOME")
    old = {name: os.environ.get(name) for name in names}
    for name in names:
        os.environ[name] = str(tmp_path_factory.mktemp(name.lower()))
    yield
    for name, value in old.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def require(condition: bool, why: str) -> None:
    """Skip (laptop) or fail (CI) when a prerequisite of a real-parts test is missing."""
    if condition:
        return
    if IN_CI:
        pytest.fail(f"prerequisite missing under CI: {why}", pytrace=False)
    pytest.skip(why)


def require_root_tools(*tools: str) -> None:
    require(os.geteuid() == 0, "needs root")
    for tool in tools:
        require(shutil.which(tool) is not None, f"needs {tool}")


def running_lab(tmp_path_factory, name: str, tools: tuple[str, ...], *, bcc: bool = True,
                **lab_args):  # fmt: skip
    """Yield a freshly built lab (one with the same prefix left over is taken down first),
    for a module-scoped ``lab`` fixture; down again afterwards."""
    from pathlib import Path

    from ebpfdiag.lab.topology import Lab

    require_root_tools(*tools)
    if bcc:
        require(Path("/usr/lib/python3/dist-packages/bcc").is_dir(), "needs python3-bpfcc")
    inventory = tmp_path_factory.mktemp(name) / "inventory.yaml"
    the_lab = Lab(inventory_out=inventory, **lab_args)
    the_lab.down()
    try:
        yield the_lab.up()
    finally:
        the_lab.down()


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("root"):
            item.fixturenames.insert(0, "_root_prerequisites")


@pytest.fixture
def _root_prerequisites():
    require_root_tools("ip", "/usr/sbin/sshd", "sudo")


DEV_LOG = "/dev/log"
#: Held while a test listens on /dev/log, so tests that want it never take it from each other.
DEV_LOG_LOCK = "/run/ebpfdiag-test-devlog.lock"


class SyslogListener:
    """A unix datagram socket on /dev/log that keeps what syslog(3) sends it."""

    def __init__(self, sock):
        import threading

        self._sock = sock
        self._got: list[str] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while True:
            try:
                data = self._sock.recv(65536)
            except OSError:
                return
            with self._cond:
                self._got.append(data.decode(errors="replace"))
                self._cond.notify_all()

    def messages(self) -> list[str]:
        """Every datagram so far, e.g. ``<84>Nov 27 17:05:00 ebpfdiag-runner[12]: {...}``."""
        with self._cond:
            return list(self._got)

    def wait_for(self, text: str, timeout: float = 10.0) -> list[str]:
        """The messages containing ``text``, once there is one (or [] after ``timeout``)."""
        import time

        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [m for m in self._got if text in m]
                left = deadline - time.monotonic()
                if found or left <= 0:
                    return found
                self._cond.wait(left)


@pytest.fixture
def syslog_listener():
    """Listen on /dev/log (the machine runs no syslog daemon) for the test's duration.

    A live /dev/log belongs to a real syslog daemon: then the test cannot see the lines
    and is skipped (failed under CI). /dev is not private in the lab's mount namespaces,
    so programs run on lab hosts log here too."""
    import fcntl
    import socket
    import stat
    import time

    require(os.geteuid() == 0, "needs root to listen on /dev/log")
    with open(DEV_LOG_LOCK, "w") as lock:
        deadline = time.monotonic() + 120
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                require(time.monotonic() < deadline, "another test held /dev/log for 120 s")
                time.sleep(0.2)
        if os.path.lexists(DEV_LOG):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            try:
                probe.connect(DEV_LOG)
                live = True
            except OSError:
                live = False
            finally:
                probe.close()
            require(not live, "a syslog daemon owns /dev/log")
            require(stat.S_ISSOCK(os.lstat(DEV_LOG).st_mode), "/dev/log is not a socket")
            os.unlink(DEV_LOG)  # a stale socket nobody listens on
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(DEV_LOG)
        os.chmod(DEV_LOG, 0o666)
        try:
            yield SyslogListener(sock)
        finally:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(DEV_LOG)
