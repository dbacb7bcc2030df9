"""Shared test set-up.

Tests marked ``root`` use real parts (network namespaces, sshd, BPF, nftables). On a
laptop without root they skip; under CI (``CI=true``) a missing prerequisite fails the
test instead, so a green CI run means they really ran.
"""

import os
import shutil

import pytest

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


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


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.get_closest_marker("root"):
            item.fixturenames.insert(0, "_root_prerequisites")


@pytest.fixture
def _root_prerequisites():
    require_root_tools("ip", "/usr/sbin/sshd", "sudo")
