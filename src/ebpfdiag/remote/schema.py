"""A tool's parameter schema, read on the controller without running the tool.

Tools declare ``PARAMS`` as a literal list of dicts (see ``scripts/bpf/core/params.py``);
it is read here with ``ast.literal_eval``, and checked with that same core module, so the
CLI refuses exactly what the tool would refuse, before any host is contacted.
"""

from __future__ import annotations

import ast
import importlib.util
import re
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

from ebpfdiag.catalog import scripts_dir
from ebpfdiag.errors import UsageError


@cache
def params_module() -> ModuleType:
    """``scripts/bpf/core/params.py``, the one implementation of the schema rules."""
    path = scripts_dir() / "core" / "params.py"
    spec = importlib.util.spec_from_file_location("ebpfdiag_remote_params", path)
    if spec is None or spec.loader is None:
        raise UsageError(f"the shipped scripts are incomplete: {path} is missing")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


#: ``PARAMS = [`` at the start of a line up to the ``]`` that starts a line: the literal
#: alone is parsed, not the whole tool (a trace starts a few dozen ms sooner)
_PARAMS = re.compile(r"^PARAMS = (\[.*?^\])", re.S | re.M)


def load_params(tool: Path) -> list[dict[str, Any]]:
    """The tool's ``PARAMS`` literal, or [] when it declares none."""
    text = tool.read_text()
    m = _PARAMS.search(text)
    try:
        params = ast.literal_eval(m.group(1)) if m else None
    except (ValueError, SyntaxError):
        params = None
    if params is None:  # written some other way: find it in the whole module
        params = []
        for node in ast.parse(text, filename=str(tool)).body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == "PARAMS" for t in node.targets
            ):
                params = ast.literal_eval(node.value)
    params_module().check_schema(params)
    return list(params)


def tool_argv(tool: Path, values: dict[str, Any]) -> tuple[str, ...]:
    """Option values -> the tool's argv, refused with one line when a value is bad."""
    mod = params_module()
    try:
        return tuple(mod.to_argv(load_params(tool), values))
    except mod.ParamError as exc:
        raise UsageError(str(exc)) from None
