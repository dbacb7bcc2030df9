"""Benchmarks against real sshd fleets, the lab and synthetic streams (``python -m bench``)."""
