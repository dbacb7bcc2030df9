"""The metrics benchmark runs at a tiny size (fleet, emitter, controller, lab datapath) and
reports its figures (no timing asserts: the full run's targets are in docs/benchmarks.md)."""

from pathlib import Path

import pytest

from bench.__main__ import main
from tests.conftest import require, require_root_tools


@pytest.mark.root
def test_quick_metrics_bench(tmp_path):
    require_root_tools("/usr/sbin/sshd", "iperf3", "nft")
    require(Path("/usr/lib/python3/dist-packages/bcc").is_dir(), "needs python3-bpfcc")
    out = tmp_path / "bench.md"
    assert main(["--quick", "--only", "metrics", "--out", str(out)]) == 0
    text = out.read_text()
    assert "| hosts up (all) | 5 in " in text and "(yes) |" in text, text
    assert "| deltas applied while measured | " in text
    # the memory requirement's figures: RSS after warm-up, at the end, their ratio, the target
    assert "| RSS after warm-up -> 0.1 min later (ratio) | " in text, text
    assert "| controller memory 0.1 min after warm-up | " in text and "| <= 1.10x |" in text
    assert "datapath, metrics on 3 hosts: bulk Gbit/s (ratio)" in text
