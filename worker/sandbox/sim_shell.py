"""What a simulated sandbox's shell and gateway share with the CLIs scripted inside it: how
a command line splits, what the simulated MCP gateway lists, how a prompt is fingerprinted.
"""

from __future__ import annotations

import functools
import hashlib
import shlex


def gateway_tools(servers: dict[str, object]) -> list[str]:
    """The tools the simulated gateway lists: unprefixed, one per server, as the real one
    names a server's tools by their own names."""
    return [f"{name.replace('/', '_')}_search" for name in servers]


def prompt_digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def argv_of(cmd: str) -> tuple[list[str], str | None]:
    """Split the adapter's `cd DIR && exec claude ... < FILE` as bash would."""
    tokens, stdin = _split(cmd)
    return list(tokens), stdin


@functools.lru_cache(maxsize=256)
def _split(cmd: str) -> tuple[tuple[str, ...], str | None]:
    """Cached: every task of a batch has the same command line, and shlex is slow enough to
    show in the overhead benchmark as the simulator's cost, not the product's."""
    tokens = shlex.split(cmd)
    if "exec" in tokens:
        tokens = tokens[tokens.index("exec") + 1:]
    stdin = None
    if "<" in tokens:
        i = tokens.index("<")
        stdin = tokens[i + 1] if i + 1 < len(tokens) else None
        tokens = tokens[:i] + tokens[i + 2:]
    return tuple(tokens), stdin


def cwd_of(cmd: str) -> str | None:
    """The directory a `cd DIR && ...` command line runs in (None without a `cd`)."""
    tokens = shlex.split(cmd)
    return tokens[1] if len(tokens) > 1 and tokens[0] == "cd" else None
