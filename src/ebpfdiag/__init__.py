"""ebpfdiag: trace network problems across many Linux hosts at once with BCC scripts over SSH."""

__version__ = "0.1.0"
