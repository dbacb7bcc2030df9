"""Tool + the core modules it uses -> one self-contained program to push to a host.

Remote tools are developed as modules: ``scripts/bpf/core/*.py`` (shared parts) and one
module per tool that imports from them with ``from core.NAME import a, b``. A host gets
nothing installed, so before a tool is sent its core modules are written out in front of
its body, in dependency order, as plain code: the bundle reads top to bottom like one of
BCC's ``tools/*.py`` (what runs as root must be reviewable), starts with the tool's own
header (parameters and fields), and needs nothing but the host's python3 and BCC.

Rules that keep that possible, checked here: core imports are top-level
``from core.NAME import ...`` statements (never ``import core...``), no ``__future__``
imports, and no two modules define the same top-level name.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from ebpfdiag import __version__
from ebpfdiag.errors import UsageError

CORE_PACKAGE = "core"


class BundleError(UsageError):
    """A tool that cannot be made into one program (a mistake in the tool's source)."""


@dataclass
class _Module:
    name: str  # "core/params.py" or the tool's file name
    path: Path
    tree: ast.Module | None  # None when only scanned
    lines: list[str]
    deps: list[str]  # core module names, in import order


def _core_imports(mod_name: str, tree: ast.Module) -> tuple[list[str], list[tuple[int, int]]]:
    """Core modules imported at top level and the line spans of those statements."""
    deps: list[str] = []
    spans: list[tuple[int, int]] = []
    future = None
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == CORE_PACKAGE or alias.name.startswith(CORE_PACKAGE + "."):
                    raise BundleError(
                        f"{mod_name}:{node.lineno}: use 'from {CORE_PACKAGE}.NAME import ...'"
                        f" (not 'import {alias.name}') so the tool can be bundled"
                    )
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level == 0 and module == "__future__":
                future = node.lineno
                continue
            if node.level or module == CORE_PACKAGE:
                raise BundleError(
                    f"{mod_name}:{node.lineno}: use 'from {CORE_PACKAGE}.NAME import ...'"
                )
            if module.startswith(CORE_PACKAGE + "."):
                if node not in tree.body:
                    raise BundleError(
                        f"{mod_name}:{node.lineno}: core imports must be at the top level"
                    )
                deps.append(module.split(".", 1)[1])
                spans.append((node.lineno, node.end_lineno or node.lineno))
    if deps and future is not None:  # it would land in the middle of the bundle
        raise BundleError(f"{mod_name}:{future}: no __future__ imports in bundled remote code")
    return deps, spans


def _load(name: str, path: Path) -> tuple[_Module, list[tuple[int, int]]]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        tree = ast.parse(text, filename=str(path))
    except SyntaxError as exc:
        raise BundleError(f"{name}:{exc.lineno}: {exc.msg}") from None
    deps, spans = _core_imports(name, tree)
    return _Module(name, path, tree, text.splitlines(), deps), spans


def _bindings(mod: _Module) -> dict[str, str]:
    """Top-level names a module binds -> what binds them (imports compare by text)."""
    out: dict[str, str] = {}
    for node in mod.tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            out[node.name] = f"def:{mod.name}"
        elif isinstance(node, ast.Assign | ast.AnnAssign | ast.AugAssign):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Name):
                        out[sub.id] = f"def:{mod.name}"
        elif isinstance(node, ast.Import):
            for alias in node.names:
                out[alias.asname or alias.name.split(".")[0]] = f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom) and not (node.module or "").startswith(
            CORE_PACKAGE + "."
        ):
            for alias in node.names:
                out[alias.asname or alias.name] = f"from {node.module} import {alias.name}"
    return out


def _strip(lines: list[str], spans: list[tuple[int, int]]) -> list[str]:
    drop = {n for start, end in spans for n in range(start, end + 1)}
    return [line for n, line in enumerate(lines, 1) if n not in drop]


def _header_end(mod: _Module) -> int:
    """Line number after the tool's docstring (0 if it has none)."""
    body = mod.tree.body
    first = body[0] if body else None
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        return (first.end_lineno or 0) if isinstance(first.value.value, str) else 0
    return 0


_CORE_FROM = re.compile(r"^from core\.(\w+) import ")


def _scan(name: str, path: Path) -> tuple[_Module, list[tuple[int, int]]]:
    """What ``_load`` finds, from the text alone: the top-level ``from core.X import``
    statements and the header. Pushing a shipped tool (checked in full by the tests and
    ``ebpfdiag bundle``) then costs no parse on the controller at every trace start."""
    text = path.read_text()
    lines = text.splitlines()
    deps: list[str] = []
    spans: list[tuple[int, int]] = []
    i = 0
    while i < len(lines):
        m = _CORE_FROM.match(lines[i])
        if m:
            start = i
            if lines[i].rstrip().endswith("("):
                while i + 1 < len(lines) and not lines[i].lstrip().startswith(")"):
                    i += 1
            deps.append(m.group(1))
            spans.append((start + 1, i + 1))
        i += 1
    return _Module(name, path, None, lines, deps), spans


def _header_end_text(lines: list[str]) -> int:
    """Line number after a leading triple-quoted docstring (after a shebang), else 0."""
    i = 1 if lines and lines[0].startswith("#!") else 0
    if i >= len(lines) or not lines[i].startswith('"""'):
        return 0
    if lines[i].count('"""') >= 2:
        return i + 1
    for j in range(i + 1, len(lines)):
        if '"""' in lines[j]:
            return j + 1
    return 0


def bundle(tool: Path, check: bool = True) -> str:
    """The program pushed for ``tool``: itself when it imports no core module, else its
    header, each core module it needs (dependencies first), then its body.

    ``check`` parses every module and refuses what would make the bundle differ from the
    modules; without it (shipped tools, whose bundles the tests check) only text is read."""
    load = _load if check else _scan
    tool_mod, tool_spans = load(tool.name, tool)
    if not tool_mod.deps:
        return tool.read_text()
    core_dir = tool.parent / CORE_PACKAGE
    loaded: dict[str, tuple[_Module, list[tuple[int, int]]]] = {}
    order: list[str] = []
    visiting: list[str] = []

    def visit(name: str, wanted_by: str) -> None:
        if name in order:
            return
        if name in visiting:
            cycle = " -> ".join([*visiting[visiting.index(name) :], name])
            raise BundleError(f"core modules import each other in a cycle: {cycle}")
        path = core_dir / f"{name}.py"
        if not path.is_file():
            raise BundleError(f"{wanted_by}: no core module '{name}' ({path})")
        visiting.append(name)
        loaded[name] = load(f"{CORE_PACKAGE}/{name}.py", path)
        for dep in loaded[name][0].deps:
            visit(dep, loaded[name][0].name)
        visiting.pop()
        order.append(name)

    for dep in tool_mod.deps:
        visit(dep, tool_mod.name)

    owners: dict[str, tuple[str, str]] = {}
    for mod in [loaded[n][0] for n in order] + [tool_mod] if check else []:
        for name, how in _bindings(mod).items():
            if name in owners and (how != owners[name][1] or how.startswith("def:")):
                raise BundleError(
                    f"{owners[name][0]} and {mod.name} both define '{name}': "
                    "rename one, bundled modules share one namespace"
                )
            owners.setdefault(name, (mod.name, how))

    head_end = _header_end(tool_mod) if check else _header_end_text(tool_mod.lines)
    tool_lines = _strip(tool_mod.lines, tool_spans)
    out = tool_lines[:head_end] + [
        "",
        f"# Bundled by ebpfdiag {__version__}: the core modules this tool uses come first,",
        "# then the tool itself. Generated from scripts/bpf/; do not edit the bundle.",
    ]
    for name in order:
        mod, spans = loaded[name]
        out += ["", "", f"# ---- {mod.name} " + "-" * max(4, 70 - len(mod.name)), ""]
        out += _strip(mod.lines, spans)
    out += ["", "", f"# ---- {tool_mod.name} " + "-" * max(4, 70 - len(tool_mod.name)), ""]
    out += tool_lines[head_end:]
    return "\n".join(out) + "\n"
