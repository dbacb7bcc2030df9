"""Real multi-host labs on one machine: network namespaces, veths, bridges and sshd.

``topology`` builds the client -> load balancer -> server lab used to reproduce and
diagnose TCP resets; ``scenarios`` stages the failures. (The plain sshd fleet that tests
and benchmarks use lives in ``tests/fleet.py``: it is not part of the product.)
"""
