"""``ebpfdiag metrics``: kernel counters from many hosts, accumulated and exposed for Prometheus."""
