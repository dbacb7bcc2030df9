"""The controller's per-host totals and their exposition, from recorded records (pure),
plus ``promtool check metrics`` on the text they make."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ebpfdiag.metrics.accumulator import MAX_SERIES, OTHER, HostMetrics
from ebpfdiag.metrics.exposition import Fleet, registry_for
from tests.conftest import require

FAMILIES = {
    "tcp_resets_sent": {"type": "counter", "labels": ["reason", "state", "port"], "help": "sent"},
    "tcp_connect_seconds": {
        "type": "histogram",
        "labels": [],
        "help": "connect",
        "scale": 1e-9,
        "bounds": [0.001, 0.002, 0.004],
    },
}
HELLO = {"type": "hello", "script": "netmetrics", "families": FAMILIES}


def delta(seq: int, **families) -> dict:
    return {"type": "delta", "seq": seq, "c": families}


def samples(fleet: Fleet) -> dict[tuple, float]:
    """Exposed samples as {(name, labels...): value}, read back by the client's parser."""
    text = generate_latest(registry_for(fleet)).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, *sorted(s.labels.items()))] = s.value
    return out


def sent(host: str, reason: str, state: str = "UNKNOWN", port: str = "") -> tuple:
    labels = {"host": host, "reason": reason, "state": state, "port": port}
    return ("ebpfdiag_tcp_resets_sent_total", *sorted(labels.items()))


def test_counters_continue_across_a_script_restart():
    h = HostMetrics("web1")
    h.on_record(HELLO, 100.0)
    h.on_record(delta(1, tcp_resets_sent=[["NO_SOCKET", "UNKNOWN", "", 3]]), 101.0)
    h.down("connection lost")
    assert not h.up and h.counters["tcp_resets_sent"][("NO_SOCKET", "UNKNOWN", "")] == 3
    h.on_record(HELLO, 110.0)  # the script started again from zero
    h.on_record({"type": "ready"}, 110.0)
    h.on_record(delta(1, tcp_resets_sent=[["NO_SOCKET", "UNKNOWN", "", 2]]), 111.0)
    assert h.up and h.sessions == 2 and h.last_update == 111.0
    assert h.counters["tcp_resets_sent"][("NO_SOCKET", "UNKNOWN", "")] == 5


def test_hello_says_what_the_host_cannot_count():
    h = HostMetrics("old")
    missing = [{"probe": "tcp_receive_reset", "why": "no tracepoint tcp:tcp_receive_reset"}]
    h.on_record(dict(HELLO, missing=missing), 1.0)
    assert h.missing == ["tcp_receive_reset: no tracepoint tcp:tcp_receive_reset"]
    h.on_record(dict(HELLO, missing=[]), 2.0)  # a later run that has it
    assert h.missing == []


def test_a_decrease_or_a_malformed_row_is_rejected_never_applied():
    h = HostMetrics("web1")
    h.on_record(HELLO, 1.0)
    h.on_record(delta(1, tcp_resets_sent=[["A", "B", "", 4]]), 2.0)
    bad = [["A", "B", "", -2], ["A", "B", "", "7"], ["A", "B", 1], ["A", "B", "", True]]
    h.on_record(delta(2, tcp_resets_sent=bad, unknown_family=[["x", 1]]), 3.0)
    assert h.counters["tcp_resets_sent"] == {("A", "B", ""): 4}
    assert h.rejected == 5


def test_a_family_cannot_change_shape_after_its_first_hello():
    h = HostMetrics("web1")
    h.on_record(HELLO, 1.0)
    changed = {"tcp_resets_sent": {"type": "counter", "labels": ["reason"], "help": "x"}}
    h.on_record({"type": "hello", "families": changed}, 2.0)
    assert h.families["tcp_resets_sent"].labels == ("reason", "state", "port")
    assert h.rejected == 1


def test_at_most_64_label_sets_per_family_the_rest_summed_into_other():
    h = HostMetrics("web1")
    h.on_record(HELLO, 1.0)
    rows = [[f"R{i}", "S", "", 1] for i in range(100)]
    h.on_record(delta(1, tcp_resets_sent=rows), 2.0)
    h.on_record(delta(2, tcp_resets_sent=rows), 3.0)  # known ones keep their series
    series = h.counters["tcp_resets_sent"]
    assert len(series) == MAX_SERIES
    assert series[("R0", "S", "")] == 2 and series[("R62", "S", "")] == 2
    assert series[(OTHER, OTHER, OTHER)] == 2 * (100 - (MAX_SERIES - 1))
    assert sum(series.values()) == 200


def test_exposition_names_help_type_host_label_and_up():
    fleet = Fleet(["a", "b"], {"a": {"role": "lb"}, "b": {"role": "server"}})
    fleet.record("a", HELLO, 50.0)
    fleet.record("a", delta(1, tcp_resets_sent=[["NO_SOCKET", "UNKNOWN", "", 3]]), 51.0)
    fleet.down("a", "connection refused")  # away: the value stays, up is 0
    text = generate_latest(registry_for(fleet)).decode()
    assert "# HELP ebpfdiag_tcp_resets_sent_total sent" in text
    assert "# TYPE ebpfdiag_tcp_resets_sent_total counter" in text
    assert "# TYPE ebpfdiag_host_up gauge" in text
    got = samples(fleet)
    key = ("ebpfdiag_tcp_resets_sent_total", ("host", "a"), ("port", ""), ("reason", "NO_SOCKET"),
           ("role", "lb"), ("state", "UNKNOWN"))  # fmt: skip
    assert got[key] == 3
    assert got[("ebpfdiag_host_up", ("host", "a"), ("role", "lb"))] == 0
    assert got[("ebpfdiag_host_up", ("host", "b"), ("role", "server"))] == 0
    assert got[("ebpfdiag_host_last_update_timestamp_seconds", ("host", "a"), ("role", "lb"))] == 51
    assert (
        "ebpfdiag_host_last_update_timestamp_seconds",
        ("host", "b"),
        ("role", "server"),
    ) not in got


def test_histogram_buckets_are_cumulative_seconds():
    fleet = Fleet(["a"])
    fleet.record("a", HELLO, 1.0)
    row = [3_500_000, [[0, 1], [2, 1], [7, 1]]]  # 0.5 ms, 3 ms, and one past every bound
    fleet.record("a", {"type": "delta", "seq": 1, "h": {"tcp_connect_seconds": [row]}}, 2.0)
    got = samples(fleet)
    bucket = "ebpfdiag_tcp_connect_seconds_bucket"
    assert got[(bucket, ("host", "a"), ("le", "0.001"))] == 1
    assert got[(bucket, ("host", "a"), ("le", "0.002"))] == 1
    assert got[(bucket, ("host", "a"), ("le", "0.004"))] == 2
    assert got[(bucket, ("host", "a"), ("le", "+Inf"))] == 3
    assert abs(got[("ebpfdiag_tcp_connect_seconds_sum", ("host", "a"))] - 0.0035) < 1e-12
    assert got[("ebpfdiag_tcp_connect_seconds_count", ("host", "a"))] == 3


def test_promtool_accepts_the_exposition(tmp_path):
    require(shutil.which("promtool") is not None, "needs promtool (Debian prometheus)")
    fleet = Fleet(["a", "b"])
    for host in ("a", "b"):
        fleet.record(host, HELLO, 1.0)
        rows = [["NO_SOCKET", "UNKNOWN", "", 2], ["TCP_STATE", "TCP_CLOSE", "8082", 1]]
        fleet.record(host, delta(1, tcp_resets_sent=rows), 2.0)
        fleet.record(host, {"type": "delta", "h": {"tcp_connect_seconds": [[10, [[1, 1]]]]}}, 3)
    text = generate_latest(registry_for(fleet))
    proc = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert b"tcp_resets_sent_total" in text


def test_netmetrics_drop_family_is_capped_with_reason_other():
    """netmetrics' own packet_drops declaration: reasons past the cap sum into "other"."""
    tool = Path(__file__).resolve().parents[1] / "scripts" / "bpf" / "netmetrics.py"
    sys.path.insert(0, str(tool.parent))
    spec = importlib.util.spec_from_file_location("netmetrics_families", tool)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    h = HostMetrics("lb")
    h.on_record({"type": "hello", "script": "netmetrics", "families": module.FAMILIES}, 1.0)
    rows = [[f"REASON_{i}", 1] for i in range(MAX_SERIES + 10)]
    h.on_record({"type": "delta", "seq": 1, "c": {"packet_drops": rows}}, 2.0)
    fleet = Fleet(["lb"])
    fleet.hosts["lb"] = h
    got = {k: v for k, v in samples(fleet).items() if k[0] == "ebpfdiag_packet_drops_total"}
    assert len(got) == MAX_SERIES
    assert got[("ebpfdiag_packet_drops_total", ("host", "lb"), ("reason", OTHER))] == 11


def test_a_host_declaring_a_family_otherwise_is_counted_not_silently_dropped():
    fleet = Fleet(["a", "b"])
    fleet.record("a", HELLO, 1.0)
    other = {"tcp_resets_sent": {"type": "counter", "labels": ["reason"], "help": "x"}}
    fleet.record("b", {"type": "hello", "families": other}, 1.0)
    fleet.record("a", delta(1, tcp_resets_sent=[["NO_SOCKET", "UNKNOWN", "", 3]]), 2.0)
    fleet.record("b", delta(1, tcp_resets_sent=[["NO_SOCKET", 5]]), 2.0)
    for _ in range(2):  # counted when declared, not on every scrape
        got = samples(fleet)
        assert got[sent("a", "NO_SOCKET")] == 3  # the exposed shape is unchanged
        assert not [k for k in got if k[0] == sent("a", "x")[0] and ("host", "b") in k]
        assert got[("ebpfdiag_rows_rejected_total", ("host", "a"))] == 0
        assert got[("ebpfdiag_rows_rejected_total", ("host", "b"))] == 1
    fleet.record("b", {"type": "hello", "families": other}, 3.0)  # its script restarted
    assert samples(fleet)[("ebpfdiag_rows_rejected_total", ("host", "b"))] == 1
