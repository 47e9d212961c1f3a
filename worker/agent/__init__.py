"""Agent adapters behind one interface (`worker/agent/base.py`); Claude Code is the one
that ships. Register another in `AGENTS` and select it with SANDQUEUE_AGENT."""

from __future__ import annotations

from collections.abc import Callable

from sandqueue import errors
from sandqueue.settings import Settings
from worker.agent.base import Agent
from worker.agent.claude_code import ClaudeCodeAgent

AGENTS: dict[str, Callable[[Settings], Agent]] = {
    ClaudeCodeAgent.name: ClaudeCodeAgent.from_settings,
}


def make_agent(settings: Settings) -> Agent:
    """The adapter settings ask for."""
    try:
        factory = AGENTS[settings.agent]
    except KeyError:
        raise errors.ConfigError(
            f"SANDQUEUE_AGENT={settings.agent!r} is not a known agent; known: "
            f"{', '.join(sorted(AGENTS))}") from None
    return factory(settings)
