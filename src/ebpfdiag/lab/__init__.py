"""Real multi-host labs on one machine: network namespaces, veths, bridges and sshd.

``fleet`` builds N plain sshd hosts for fan-out tests and benchmarks; ``topology`` builds
the client -> load balancer -> server lab used to reproduce and diagnose TCP resets.
"""
