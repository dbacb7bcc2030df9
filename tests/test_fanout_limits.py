"""What a fleet-sized run needs before it starts: file descriptors, and what is left of a
host once it has finished (pure, no hosts contacted)."""

import resource

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
