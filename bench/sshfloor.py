"""asyncssh alone: the fan-out benchmark's floor for a controller built on it.

Runs the benchmark's command on every host of a fleet inventory with nothing but asyncssh:
the same key exchange and cipher order as ebpfdiag, the client key and known_hosts loaded
once (not per connection), ``concurrency`` hosts at once, each connection closed after its
command. What ebpfdiag spends per host above this is its own (the bootstrap, the script
push, markers, records); what this spends is the SSH library's, which ebpfdiag cannot go
below without replacing it. Prints ``NAME: OUTPUT`` per host.

Usage: python -m bench.sshfloor INVENTORY CONCURRENCY COMMAND HOST...
"""

from __future__ import annotations

import asyncio
import sys

import asyncssh
import yaml

from ebpfdiag.transport import ENCRYPTION_ALGS, KEX_ALGS


async def _one(name: str, entry: dict, defaults: dict, gate: asyncio.Semaphore,
               known: asyncssh.SSHKnownHosts, keys: list, command: str) -> str:  # fmt: skip
    async with (
        gate,
        asyncssh.connect(
            entry["address"],
            port=entry.get("port", 22),
            username=entry.get("user", defaults["user"]),
            known_hosts=known,
            client_keys=keys,
            kex_algs=KEX_ALGS,
            encryption_algs=ENCRYPTION_ALGS,
            compression_algs=None,
        ) as conn,
    ):
        result = await conn.run(command)
    return f"{name}: {str(result.stdout).strip()}"


async def _all(inventory: dict, concurrency: int, command: str, names: list[str]) -> list[str]:
    defaults = inventory["defaults"]
    known = asyncssh.read_known_hosts([defaults["known_hosts"]])
    keys = asyncssh.load_keypairs([defaults["identity_file"]])
    gate = asyncio.Semaphore(concurrency)
    hosts = inventory["hosts"]
    return await asyncio.gather(
        *(_one(n, hosts[n], defaults, gate, known, keys, command) for n in names)
    )


def main(argv: list[str]) -> int:
    path, concurrency, command, *names = argv
    with open(path) as f:
        inventory = yaml.safe_load(f)
    for line in asyncio.run(_all(inventory, int(concurrency), command, names)):
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
