"""What a fleet-sized run costs and needs before it starts: file descriptors, keys and
known_hosts read once, the algorithms proposed, log text built only when logged,
connection options built without a thread (pure, no hosts contacted)."""

import gc
import logging
import resource
import subprocess

import pytest

from ebpfdiag import fanout
from ebpfdiag.errors import UsageError
from ebpfdiag.fanout import (
    FD_BASE,
    FD_PER_HOST,
    fd_need,
    fd_soft_limit_for,
    hosts_at_once,
    plan_fanout,
)


def test_descriptors_follow_the_hosts_connected_at_once():
    assert fd_need(1000, 64) == FD_BASE + 64 * FD_PER_HOST
    assert fd_need(10, 64) == FD_BASE + 10 * FD_PER_HOST  # never more hosts than exist
    assert fd_need(1000, 1000) == FD_BASE + 1000 * FD_PER_HOST
    assert fd_need(1000, 1000, jump_hosts=3) == FD_BASE + 1000 * FD_PER_HOST + 3
    assert fd_need(5, 0) == FD_BASE + FD_PER_HOST  # a fan-out of 0 still runs one host


def test_soft_limit_is_raised_up_to_the_hard_one_and_never_lowered():
    assert fd_soft_limit_for(2000, 1024, 4096) == 2000
    assert fd_soft_limit_for(8000, 1024, 4096) == 4096
    assert fd_soft_limit_for(8000, 1024, resource.RLIM_INFINITY) == 8000
    assert fd_soft_limit_for(100, 1024, 4096) == 1024


def test_hosts_that_fit_in_a_limit():
    assert hosts_at_once(FD_BASE + 10 * FD_PER_HOST) == 10
    assert hosts_at_once(FD_BASE + 10 * FD_PER_HOST, jump_hosts=FD_PER_HOST) == 9
    assert hosts_at_once(FD_BASE) == 0
    assert hosts_at_once(10) == 0


@pytest.fixture
def nofile_limit(monkeypatch):
    """A fake RLIMIT_NOFILE: (soft, hard), raised by setrlimit like the real one."""
    limits = {"now": (256, 256)}

    def getrlimit(which):
        assert which == resource.RLIMIT_NOFILE
        return limits["now"]

    def setrlimit(which, value):
        soft, hard = value
        if soft > limits["now"][1]:
            raise ValueError("not allowed to raise maximum limit")
        limits["now"] = value

    monkeypatch.setattr(fanout.resource, "getrlimit", getrlimit)
    monkeypatch.setattr(fanout.resource, "setrlimit", setrlimit)
    return limits


def test_a_run_raises_the_soft_limit_when_the_hard_one_allows(nofile_limit, capsys):
    nofile_limit["now"] = (256, 65536)
    assert plan_fanout(1000, 1000, 0) == 1000
    assert nofile_limit["now"] == (fd_need(1000, 1000), 65536)
    assert capsys.readouterr().err == ""


def test_too_few_descriptors_lower_the_concurrency_with_a_warning(nofile_limit, capsys):
    nofile_limit["now"] = (256, 256)
    fit = (256 - FD_BASE) // FD_PER_HOST
    assert plan_fanout(1000, 500, 0) == fit
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning" in err and f"{fit} hosts at once" in err
    assert f"ulimit -n {fd_need(1000, 500)}" in err


def test_no_room_for_one_host_is_a_usage_error(nofile_limit):
    nofile_limit["now"] = (FD_BASE, FD_BASE)
    with pytest.raises(UsageError, match=r"open-file limit 64 is too low .*\(ulimit -n 84\)"):
        plan_fanout(10, 10, 0)


class Exploding:
    """An argument whose text must never be built."""

    def __str__(self):
        raise AssertionError("formatted a log argument nobody logs")

    def __len__(self):
        raise AssertionError("measured a packet nobody logs")


def test_asyncssh_builds_log_text_only_when_it_is_logged(caplog):
    from asyncssh.logging import SSHLogger, logger
    from asyncssh.packet import SSHPacketLogger

    class Packets(SSHPacketLogger):
        _handler_names = {1: "MSG_X"}

        @property
        def logger(self):
            return logger

    caplog.set_level(logging.WARNING, logger="asyncssh")
    logger.info("connected to %s", Exploding())
    Packets().log_sent_packet(1, 7, Exploding())
    assert caplog.records == []
    caplog.set_level(logging.DEBUG, logger="asyncssh")
    logger.info("connected to %s", "h01")
    previous = SSHLogger._debug_level
    SSHLogger.set_debug_level(3)
    try:
        Packets().log_sent_packet(1, 7, b"abc")
    finally:
        SSHLogger.set_debug_level(previous)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "connected to h01"
    assert messages[1].startswith("[pktid=7] Sent MSG_X (1), 3 bytes") and len(messages) == 2


def test_proposed_algorithms_are_openssh_defaults_cheapest_first():
    from ebpfdiag.transport import ENCRYPTION_ALGS, KEX_ALGS

    openssh_ciphers = {
        "chacha20-poly1305@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr",
        "aes128-gcm@openssh.com", "aes256-gcm@openssh.com",
    }  # fmt: skip
    openssh_kex = {
        "mlkem768x25519-sha256", "sntrup761x25519-sha512", "curve25519-sha256",
        "curve25519-sha256@libssh.org", "ecdh-sha2-nistp256", "ecdh-sha2-nistp384",
        "ecdh-sha2-nistp521", "diffie-hellman-group-exchange-sha256",
        "diffie-hellman-group16-sha512", "diffie-hellman-group18-sha512",
        "diffie-hellman-group14-sha256",
    }  # fmt: skip
    assert set(ENCRYPTION_ALGS) <= openssh_ciphers and set(KEX_ALGS) <= openssh_kex
    assert ENCRYPTION_ALGS[0] == "aes128-gcm@openssh.com"
    assert "curve25519-sha256" in KEX_ALGS[:2]


@pytest.fixture
def ssh_config(tmp_path, monkeypatch):
    """Write the client configuration the controller reads (its caches emptied)."""
    from ebpfdiag import transport

    path = tmp_path / "config"
    monkeypatch.setattr(transport, "SSH_CONFIG", str(path))

    def write(text: str) -> None:
        path.write_text(text)
        for cached in (transport._config_text, transport._algorithms, transport._host_options):
            cached.cache_clear()

    yield write
    for cached in (transport._config_text, transport._algorithms, transport._host_options):
        cached.cache_clear()


def test_ssh_config_ciphers_and_kex_win_over_the_proposed_order(ssh_config):
    from ebpfdiag.transport import ENCRYPTION_ALGS, KEX_ALGS, _algorithms

    ours = {"kex_algs": KEX_ALGS, "encryption_algs": ENCRYPTION_ALGS}
    ssh_config("Host *\n  User ops\n  # Ciphers aes256-ctr is only a comment\n")
    assert _algorithms("a") == ours  # nothing chosen: never parsed per host
    ssh_config("Host a\n  Ciphers aes256-ctr\nHost b\n  KexAlgorithms=curve25519-sha256\n")
    assert _algorithms("a") == {"kex_algs": KEX_ALGS}  # the config's ciphers alone
    assert _algorithms("b") == {"encryption_algs": ENCRYPTION_ALGS}
    assert _algorithms("c") == ours


def test_known_hosts_and_keys_are_read_once_per_content(tmp_path, monkeypatch):
    import asyncssh

    from ebpfdiag import transport
    from ebpfdiag.inventory import Host

    keys = []
    for name in ("a", "b"):
        path = tmp_path / name
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)],
                       check=True)  # fmt: skip
        keys.append(path.with_suffix(".pub").read_text().split()[:2])
    known = tmp_path / "known_hosts"
    known.write_text(f"198.18.0.1 {' '.join(keys[0])}\n")
    reads = []
    real_read = asyncssh.read_known_hosts
    monkeypatch.setattr(asyncssh, "read_known_hosts", lambda f: reads.append(f) or real_read(f))
    one = Host(name="one", address="198.18.0.1", known_hosts=str(known))
    two = Host(name="two", address="198.18.0.2", known_hosts=str(known))
    first = transport.trusted_host_keys(one)
    assert transport.trusted_host_keys(two) is first and len(reads) == 1
    assert transport._has_known_key(one) and not transport._has_known_key(two)
    with known.open("a") as f:  # what --accept-new-host-keys does
        f.write(f"198.18.0.2 {' '.join(keys[1])}\n")
    assert transport._has_known_key(two) and len(reads) == 2
    pair = transport.client_keys(str(tmp_path / "a"))
    assert transport.client_keys(str(tmp_path / "a")) is pair
    assert pair[0].public_data == asyncssh.import_public_key(" ".join(keys[0])).public_data


def test_connection_options_are_built_in_the_loop_but_dns_still_goes_to_threads():
    """No thread hand-off per connection for its options (the controller passes parsed
    keys); a lookup that may block, like getaddrinfo, still runs in the thread pool."""
    import asyncio
    import concurrent.futures

    import asyncssh

    class Recording(concurrent.futures.ThreadPoolExecutor):
        submitted: list = []

        def submit(self, fn, *args, **kwargs):
            self.submitted.append(getattr(fn, "func", fn))
            return super().submit(fn, *args, **kwargs)

    async def build() -> asyncssh.SSHClientConnectionOptions:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(Recording(max_workers=1))
        options = await asyncssh.SSHClientConnectionOptions.construct(
            None, host="198.18.0.1", known_hosts=None, client_keys=[], config=[]
        )
        await loop.getaddrinfo("localhost", 22)
        return options

    assert fanout.asyncssh is asyncssh  # the controller's asyncssh, with its adjustments
    options = asyncio.run(build())
    assert options.host == "198.18.0.1"
    assert asyncssh.SSHClientConnectionOptions not in Recording.submitted
    assert len(Recording.submitted) == 1  # the lookup alone


def test_a_run_collects_less_often_and_leaves_the_collector_as_it_found_it():
    """During a run what start-up loaded is frozen out of the cyclic collector's walks and
    young collections are rarer; afterwards both are as before."""
    before = gc.get_threshold()
    with fanout._fewer_collections():
        assert gc.get_threshold()[0] == fanout.GC_YOUNG_THRESHOLD
        assert gc.get_freeze_count() > 0
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
