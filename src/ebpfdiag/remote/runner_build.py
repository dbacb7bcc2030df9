"""Builds what runs on a host from one source: the ``-c`` bootstrap and the runner program.

The runner shares the bootstrap's lifecycle (drain process, pings and clocks, control
lines, stdin EOF -> SIGTERM -> grace) instead of copying it: its program is
``bootstrap.py`` without its last line (``main()``), then ``scripts/bpf/core/params.py``
(the parameter rules the tools apply to themselves), then ``runner.py`` without its
imports of those two, then the call of ``runner_main()``. The catalog records the
same bundles the controller pushes to full-sudo hosts, with their sha256 and schema.
"""

from __future__ import annotations

import ast
import base64
import functools
import hashlib
import json
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ebpfdiag import __version__
from ebpfdiag.catalog import scripts_dir
from ebpfdiag.remote.bundle import bundle
from ebpfdiag.remote.schema import load_params

#: The tools a runner serves: the shipped tracers and doctor.
RUNNER_TOOLS = ("doctor", "drop", "netmetrics", "tcp_latency", "tcp_rst")
#: Tools without a duration cap (their own policy entry); see docs/runner.md.
LONG_RUNNING = ("netmetrics",)
SHEBANG = "#!/usr/bin/python3 -IS\n"
BOOTSTRAP_ENTRY = "\nmain()\n"
#: Imports in runner.py that name what the builder puts in front of it.
_PARTS = {"ebpfdiag.remote.bootstrap": "bootstrap.py", "core.params": "core/params.py"}


def _remote_text(name: str) -> str:
    return resources.files("ebpfdiag.remote").joinpath(name).read_text()


def build_bootstrap() -> str:
    """The text sent as ``python3 -c`` to full-sudo hosts (bootstrap.py as it is)."""
    return _remote_text("bootstrap.py")


def _top_level_names(text: str, label: str) -> dict[str, str]:
    """Names a part binds at top level -> how ("def" or the import), to find clashes."""
    names: dict[str, str] = {}
    for node in ast.parse(text, filename=label).body:
        if isinstance(node, ast.FunctionDef | ast.ClassDef):
            names[node.name] = "def"
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names.update((n.id, "def") for n in ast.walk(target) if isinstance(n, ast.Name))
        elif isinstance(node, ast.Import):
            names.update((a.asname or a.name, f"import {a.name}") for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            names.update((a.asname or a.name, f"from {node.module}") for a in node.names)
    return names


def _strip_part_imports(text: str, parts: dict[str, str]) -> tuple[str, dict[str, list[str]]]:
    """runner.py without its imports of the parts, and which names each import wanted."""
    lines = text.splitlines(keepends=True)
    drop: set[int] = set()
    wanted: dict[str, list[str]] = {}
    for node in ast.parse(text).body:
        if isinstance(node, ast.ImportFrom) and node.module in parts:
            wanted[parts[node.module]] = [a.name for a in node.names]
            drop.update(range(node.lineno - 1, node.end_lineno or node.lineno))
    return "".join(line for n, line in enumerate(lines) if n not in drop), wanted


def build_runner(version: str = __version__) -> str:
    """The installed runner program (self-contained, Python 3.6, no arguments)."""
    boot = build_bootstrap()
    if not boot.endswith(BOOTSTRAP_ENTRY):
        raise RuntimeError("bootstrap.py must end with its entry call 'main()'")
    boot = boot[: -len(BOOTSTRAP_ENTRY) + 1]
    params = (scripts_dir() / "core" / "params.py").read_text()
    own, wanted = _strip_part_imports(_remote_text("runner.py"), _PARTS)
    texts = {"bootstrap.py": boot, "core/params.py": params}
    defined: dict[str, tuple[str, str]] = {}
    for label, text in [*texts.items(), ("runner.py", own)]:
        for name, how in _top_level_names(text, label).items():
            first = defined.setdefault(name, (label, how))
            if first[0] != label and (how == "def" or how != first[1]):
                raise RuntimeError(f"{first[0]} and {label} both define {name!r}")
    for label, names in wanted.items():
        missing = [n for n in names if n not in _top_level_names(texts[label], label)]
        if missing:
            raise RuntimeError(f"runner.py imports {missing} that {label} does not define")
    own = own.replace('RUNNER_VERSION = "0"', f"RUNNER_VERSION = {version!r}", 1)
    banner = (
        f'"""ebpfdiag runner {version}: generated from bootstrap.py, core/params.py and\n'
        'runner.py by ebpfdiag.remote.runner_build; do not edit (docs/runner.md)."""\n'
    )
    sections = [
        SHEBANG + banner,
        "# ---- bootstrap.py " + "-" * 52 + "\n" + boot,
        "# ---- core/params.py " + "-" * 50 + "\n" + params,
        "# ---- runner.py " + "-" * 54 + "\n" + own,
        "runner_main()\n",
    ]
    return "\n\n".join(sections)


@dataclass
class Payload:
    """Everything an install writes under the release directory, and its name."""

    version: str
    runner: str
    catalog: dict
    tools: dict[str, str]

    @property
    def digest(self) -> str:
        """One sha256 over the runner and the catalog (which holds every tool's sha256)."""
        h = hashlib.sha256(self.runner.encode())
        h.update(json.dumps(self.catalog, sort_keys=True).encode())
        return h.hexdigest()

    @property
    def release(self) -> str:
        return f"{self.version}-{self.digest[:12]}"

    def to_json(self) -> dict:
        return {
            "version": self.version,
            "release": self.release,
            "runner": self.runner,
            "runner_sha256": hashlib.sha256(self.runner.encode()).hexdigest(),
            "catalog": self.catalog,
            "tools": self.tools,
        }


@functools.cache
def runner_functions() -> dict:
    """The runner program's functions, loaded without its last line (the call of its
    main), so the controller checks a policy with the very rules the runner applies."""
    text = build_runner()
    entry = "runner_main()\n"
    if not text.endswith("\n" + entry):
        raise RuntimeError("the runner program must end with its entry call 'runner_main()'")
    scope: dict = {"__name__": "ebpfdiag_runner"}
    exec(compile(text[: -len(entry)], "ebpfdiag-runner", "exec"), scope)
    return scope


def build_payload(version: str = __version__) -> Payload:
    """The runner program, the catalog and the bundled tools, as the controller sends them."""
    tools: dict[str, str] = {}
    entries: dict[str, dict] = {}
    for name in RUNNER_TOOLS:
        path: Path = scripts_dir() / f"{name}.py"
        text = bundle(path, check=False)
        tools[name] = text
        entries[name] = {
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "file": f"tools/{name}.py",
            "params": load_params(path),
            "long_running": name in LONG_RUNNING,
        }
    catalog = {"runner_version": version, "tools": entries}
    return Payload(version, build_runner(version), catalog, tools)


def default_policy(group: str) -> dict:
    """What ``runner install --group GROUP`` writes without ``--policy``."""
    return {
        "max_runs_per_host": 4,
        "groups": {group: {"tools": "*", "max_duration_s": 3600}},
        "long_running": list(LONG_RUNNING),
    }


def admin_script(action: str, payload: Payload | None = None, policy: dict | None = None) -> str:
    """``runner_admin.py`` as pushed for ``action``; an install carries the payload and
    the policy inside the script (the channel's stdin is the bootstrap's)."""
    text = _remote_text("runner_admin.py")
    if payload is None:
        return text
    data = dict(payload.to_json(), policy=policy)
    blob = base64.b64encode(zlib.compress(json.dumps(data).encode(), 9)).decode()
    line = "PAYLOAD = None  # the controller's build, base64 of zlib'd JSON, set when pushed\n"
    if line not in text:
        raise RuntimeError("runner_admin.py lost its PAYLOAD line")
    return text.replace(line, f'PAYLOAD = "{blob}"\n', 1)
