"""``ebpfdiag runner``: install, inspect or remove the root-owned runner on hosts.

Run by an admin with full sudo: each subcommand pushes ``remote/runner_admin.py`` over
the usual fan-out (an install carries the runner, the catalog and the policy inside the
pushed script) and reports one ``runner`` record per host. See docs/runner.md.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from ebpfdiag import __version__
from ebpfdiag.cli.app import App, RecordSink, host_options, pass_app, summary_record
from ebpfdiag.errors import EXIT_HOSTS_FAILED, UsageError

if TYPE_CHECKING:
    from ebpfdiag.fanout import HostResult


def _version_key(text: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in text.replace("-", ".").split("."))


def judge(rec: dict[str, Any], install_hint: str) -> dict[str, Any]:
    """Add ``current`` (the host's runner is this controller's version) and, for an older
    or a missing one, ``update`` (the command that fixes it)."""
    version = rec.get("version")
    if rec.get("action") != "status":
        return rec
    if not rec.get("installed"):
        return {**rec, "current": False, "update": install_hint}
    if version is None or _version_key(version) < _version_key(__version__):
        return {
            **rec,
            "current": False,
            "update": f"runner {version} is older than the controller ({__version__}): "
            + install_hint,
        }
    return {**rec, "current": version == __version__}


def _policy_from(path: Path | None, group: str) -> dict[str, Any]:
    """The policy file, checked with the runner's own rules (and for tool names this
    controller ships), or the default."""
    from ebpfdiag.remote.runner_build import RUNNER_TOOLS, default_policy, runner_functions

    if path is None:
        return default_policy(group)
    try:
        policy = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"--policy {path}: {exc}") from None
    if not isinstance(policy, dict):
        raise UsageError(f"--policy {path}: not a JSON object")
    runner = runner_functions()
    try:
        runner["check_policy"](policy)
    except runner["Refused"] as exc:
        raise UsageError(f"--policy {path}: {str(exc).removeprefix('policy: ')}") from None
    for name, entry in policy["groups"].items():
        tools = entry["tools"]
        if tools != "*" and not all(t in RUNNER_TOOLS for t in tools):
            raise UsageError(
                f"--policy {path}: group {name}: 'tools' must be \"*\" or a list of "
                + ", ".join(RUNNER_TOOLS)
            )
    if group not in policy["groups"]:
        raise UsageError(f"--policy {path}: has no entry for --group {group}")
    return policy


def _run(app: App, action: str, script_text: str, args: tuple[str, ...]) -> int:
    from ebpfdiag.fanout import Fanout
    from ebpfdiag.transport import Script

    hosts, opts = app.prepare_run(timeout=300)
    sink = RecordSink("runner")
    started = time.monotonic()
    engine = Fanout(hosts, Script("runner_admin.py", script_text.encode(), args), opts, sink)
    results = app.run(engine)
    hint = f"ebpfdiag runner install --hosts {app.options.hosts_expr} --group GROUP"
    failed = []
    for result in results:
        rec = (sink.records.get(result.host) or [None])[-1]
        if rec is not None:
            rec = judge(rec, hint)
        if rec is None or rec.get("error") or not result.ok:
            failed.append(result.host)
        _report(app, action, result, rec)
    if app.as_json:
        elapsed = time.monotonic() - started
        app.json.write(
            summary_record(results, engine.interrupted, elapsed, failed=failed, action=action)
        )
        app.json.flush()
    code = app.exit_code(results, engine.interrupted)
    return code or (EXIT_HOSTS_FAILED if failed else 0)


def _report(app: App, action: str, result: HostResult, rec: dict[str, Any] | None) -> None:
    if app.as_json:
        app.json.write(rec or {"type": "runner", "host": result.host, "action": action})
        app.json.write(result.to_json())
        return
    host = result.host
    if rec is None:
        app.term.data(f"{host}: {action} failed: {result.error or 'no answer'}")
    elif rec.get("error"):
        app.term.data(f"{host}: {action} failed: {rec['error']}")
    elif action == "install":
        what = ", ".join(rec.get("changed") or []) or "nothing (already installed)"
        app.term.data(f"{host}: runner {rec['release']} for group {rec['group']}; changed: {what}")
    elif action == "uninstall":
        removed = ", ".join(rec.get("removed") or []) or "nothing (not installed)"
        app.term.data(f"{host}: removed {removed}; audit file kept")
    elif not rec.get("installed"):
        app.term.data(f"{host}: no runner; {rec['update']}")
    else:
        ready = "ready" if rec.get("ready") else f"refuses to start: {rec.get('why')}"
        policy = json.dumps(rec.get("policy"), sort_keys=True)
        app.term.data(f"{host}: runner {rec.get('release')} {ready}; policy {policy}")
        tools = rec.get("tools") or {}
        app.term.data(
            "  tools: "
            + ", ".join(
                f"{n} {t['sha256'][:12]}{'' if t['ok'] else ' CHANGED'}" for n, t in tools.items()
            )
        )
        for problem in rec.get("problems") or []:
            app.term.data(f"  problem: {problem}")
        if rec.get("update"):
            app.term.data(f"  {rec['update']}")


@click.group()
def runner() -> None:
    """The root-owned runner that lets a group run the shipped tools without full sudo."""


@runner.command()
@host_options()
@click.option("--group", required=True, help="Unix group whose members may use the runner.")
@click.option(
    "--policy",
    "policy_file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Policy JSON (docs/runner.md); default: GROUP may run every tool for up to 1 h, "
    "4 runs at once per host, netmetrics without a cap.",
)
@pass_app
def install(app: App, group: str, policy_file: Path | None) -> int:
    """Install or upgrade the runner, catalog, policy and sudoers rule (needs full sudo).

    Safe to run twice; an upgrade swaps the release atomically."""
    from ebpfdiag.remote.runner_build import admin_script, build_payload

    policy = _policy_from(policy_file, group)
    text = admin_script("install", build_payload(), policy)
    return _run(app, "install", text, ("install", group))


@runner.command()
@host_options()
@pass_app
def status(app: App) -> int:
    """Per host: runner version, tool digests, policy, and whether it starts."""
    from ebpfdiag.remote.runner_build import admin_script

    return _run(app, "status", admin_script("status"), ("status",))


@runner.command()
@host_options()
@pass_app
def uninstall(app: App) -> int:
    """Remove the runner, its sudoers rule and policy (the audit file stays)."""
    from ebpfdiag.remote.runner_build import admin_script

    return _run(app, "uninstall", admin_script("uninstall"), ("uninstall",))
