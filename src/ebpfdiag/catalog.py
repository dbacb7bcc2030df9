"""The remote scripts shipped with ebpfdiag and the parameters/fields their headers declare.

Scripts live in ``scripts/bpf/`` of the source tree; the wheel carries them as
``ebpfdiag/scripts/bpf`` so an installed ebpfdiag finds them without the source.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from pathlib import Path

from ebpfdiag.errors import UsageError

_PACKAGE_DIR = Path(__file__).resolve().parent


def scripts_dir() -> Path:
    """Installed copy first, then the source tree (editable installs, tests)."""
    for candidate in (
        _PACKAGE_DIR / "scripts" / "bpf",
        _PACKAGE_DIR.parents[1] / "scripts" / "bpf",
    ):
        if candidate.is_dir():
            return candidate
    raise UsageError("the shipped scripts are missing from this installation of ebpfdiag")


@dataclass
class ScriptInfo:
    name: str
    path: Path
    summary: str = ""
    parameters: list[tuple[str, str]] = field(default_factory=list)
    fields: list[tuple[str, str, str]] = field(default_factory=list)


_SECTION = re.compile(r"^(Parameters|Fields):\s*$")


def parse_header(name: str, path: Path, source: str) -> ScriptInfo:
    """Read the module docstring: first line is the summary; 'Parameters:' and 'Fields:'
    blocks list ``--flag ARG  help`` and ``record.field  type  help`` lines."""
    info = ScriptInfo(name, path)
    try:
        doc = ast.get_docstring(ast.parse(source)) or ""
    except SyntaxError:
        return info
    lines = doc.splitlines()
    info.summary = lines[0].strip() if lines else ""
    section = None
    for raw in lines[1:]:
        m = _SECTION.match(raw.strip())
        if m:
            section = m.group(1)
            continue
        if not raw.startswith((" ", "\t")) or not raw.strip():
            if raw.strip():
                section = None
            continue
        parts = re.split(r"\s{2,}", raw.strip())
        if section == "Parameters":
            info.parameters.append((parts[0], " ".join(parts[1:])))
        elif section == "Fields" and len(parts) >= 2:
            info.fields.append((parts[0], parts[1], " ".join(parts[2:])))
    return info


def list_scripts() -> list[ScriptInfo]:
    out = []
    for path in sorted(scripts_dir().glob("*.py")):
        out.append(parse_header(path.stem, path, path.read_text(errors="replace")))
    return out


def script_path(name: str) -> Path:
    """A shipped script by name (``tcp_rst`` or ``tcp_rst.py``)."""
    stem = name.removesuffix(".py")
    path = scripts_dir() / f"{stem}.py"
    if not path.is_file():
        known = ", ".join(s.name for s in list_scripts()) or "none"
        raise UsageError(f"no script '{name}': not a file, nor a shipped script ({known})")
    return path


def resolve_script(arg: str) -> Path:
    """A local file when it exists, else a shipped script of that name."""
    path = Path(arg).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise UsageError(f"script {arg} is not a regular file")
    if "/" in arg:
        raise UsageError(f"script {arg} does not exist")
    return script_path(arg)
