"""The agent interface the pipeline programs against, beside the sandbox interface.

An agent adapter knows one agent CLI and nothing about queues or sandboxes' providers. Its
jobs, one method each:

- `environment`: the variables (credentials) its process needs in the sandbox; they are
  secrets, redacted from everything that leaves the worker;
- `check`: before a run, that the CLI is there for the sandbox user, and its version;
- `prepare`: write its input files into the sandbox and return its command line (never
  interpolating user text into a shell);
- `stream`: a parser for one run's output that turns its lines into neutral events (text,
  a tool call with name and id, usage keyed by model message) and, when the process has
  ended, says which error of the taxonomy describes a failed run (`AgentStream.verdict`);
- `price`: what usage costs, so a run that is killed or hangs is not free;
- `template_recipe`: what a sandbox template needs to run it, for `sandqueue template build`.

Typed answers and follow-up turns (issue 12) add three questions an adapter may answer, each
with a default that works for an agent that cannot: `native_output_schema` (can this version
take the task's JSON Schema itself? else the runner asks for JSON in the system prompt),
`resumable` (can a run continue an earlier session, given `Turn.resume_session_id`?) and
`session_transcript` (where in the sandbox the agent keeps a session's transcript, which is
saved after a run and restored before a follow-up). Validating the answer and the one repair
turn are the runner's (`worker/agent/typed.py`), the same for every agent.

What is common to every agent (start, watch for stalls and the deadline, stop on cancel,
count usage once per message, enforce `max_cost_usd`) lives in `worker/agent/runner.py`.

To add an agent: write `worker/agent/<name>.py` with a subclass of `Agent` (and of
`AgentStream`), add it to `AGENTS` in `worker/agent/__init__.py`, and select it with
`SANDQUEUE_AGENT=<name>`. The pipeline does not change.
"""

from __future__ import annotations

import abc
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar

from sandqueue import errors
from sandqueue.contract import AgentTask
from sandqueue.settings import Settings
from worker.sandbox.base import Sandbox, TemplateRecipe


@dataclass(frozen=True)
class AgentText:
    """Text the model wrote."""

    text: str


@dataclass(frozen=True)
class ToolCall:
    """The model called a tool (it may have had effects: the side-effect rule counts it)."""

    name: str
    call_id: str | None = None


@dataclass(frozen=True)
class Usage:
    """Tokens of one model message so far. A message may be reported several times; the
    last report of a `message_id` replaces the earlier ones."""

    message_id: str
    tokens: dict[str, int]


@dataclass(frozen=True)
class OutputRepair:
    """The answer failed the task's output_schema: one repair turn follows (issue 12)."""

    problems: tuple[str, ...]


AgentEvent = AgentText | ToolCall | Usage | OutputRepair


@dataclass(frozen=True)
class Turn:
    """What the runner asks of one start of the agent beyond the task's own fields."""

    resume_session_id: str | None = None
    """Continue this session (a repair turn, or a follow-up task) instead of a new one."""
    output_schema: dict[str, Any] | None = None
    """Hand this JSON Schema to the agent's own structured-output support; set only when
    `Agent.native_output_schema` said yes for the agent's version."""
    cwd: str | None = None
    """Run in this directory (a follow-up runs where the session it continues ran)."""


@dataclass
class AgentRun:
    """What one agent run produced, in neutral terms; filled as the output arrives, so the
    caller keeps partial progress (tool calls made, last text) whatever the run's end."""

    final_text: str | None = None
    """The answer the agent reported at its end (None if it reported none)."""
    last_text: str | None = None
    is_error: bool | None = None
    subtype: str | None = None
    num_turns: int | None = None
    session_id: str | None = None
    model: str | None = None
    reported_usage: dict[str, int] | None = None
    """Usage as the agent totalled it at the end, when it did."""
    reported_cost_usd: float | None = None
    tool_calls: Counter[str] = field(default_factory=Counter)
    mcp_servers: list[dict[str, str]] = field(default_factory=list)
    agent_version: str | None = None
    usage_by_message: dict[str, dict[str, int]] = field(default_factory=dict)
    estimated_cost_usd: float = 0.0
    started: bool = False
    """The agent's process was started (before that, a failure had no side effects)."""
    exit_code: int | None = None
    duration_s: float = 0.0
    stderr_tail: str = ""
    # -- typed answers and turns of one session (issue 12)
    structured_output: Any = None
    """The answer the agent itself parsed against the schema (`has_structured_output`)."""
    has_structured_output: bool = False
    output: Any = None
    """The answer parsed and valid under the task's output_schema (set by the runner)."""
    turns: int = 0
    """Starts of the agent in this session so far (2 after a repair turn)."""
    cwd: str | None = None
    """The directory the agent said it ran in (its session transcript's place may depend
    on it)."""
    banked_usage: dict[str, int] = field(default_factory=dict)
    banked_cost_usd: float = 0.0
    banked_tool_calls: Counter[str] = field(default_factory=Counter)

    @property
    def turn_usage(self) -> dict[str, int]:
        """This turn's tokens: the agent's own total if it gave one, else the sum over
        messages (each once)."""
        if self.reported_usage is not None:
            return dict(self.reported_usage)
        total: dict[str, int] = {}
        for tokens in self.usage_by_message.values():
            for key, value in tokens.items():
                total[key] = total.get(key, 0) + value
        return total

    @property
    def usage(self) -> dict[str, int]:
        """Tokens of every turn of this run's session (most runs have one)."""
        total = dict(self.banked_usage)
        for key, value in self.turn_usage.items():
            total[key] = total.get(key, 0) + value
        return total

    @property
    def cost_usd(self) -> float:
        """Earlier turns' cost plus this turn's: the agent's reported cost once it reported
        one, the estimate until then."""
        if self.reported_cost_usd is not None:
            return self.banked_cost_usd + self.reported_cost_usd
        return self.banked_cost_usd + self.estimated_cost_usd

    def bank(self) -> None:
        """Close a turn before the same session continues (a repair turn): its usage, cost
        and tool calls stay counted, and the next turn's report starts afresh (an agent
        totals each start of its process on its own)."""
        self.banked_usage = self.usage
        self.banked_cost_usd = self.cost_usd
        self.banked_tool_calls = self.banked_tool_calls + self.tool_calls
        self.tool_calls = Counter()
        self.reported_usage = None
        self.reported_cost_usd = None
        self.usage_by_message = {}
        self.estimated_cost_usd = 0.0
        self.final_text = None
        self.is_error = None
        self.subtype = None
        self.structured_output = None
        self.has_structured_output = False

    def unbank_tool_calls(self) -> None:
        """After a later turn: every turn's tool calls in `tool_calls` again (the adapter's
        stream filled it with this turn's only)."""
        self.tool_calls = self.banked_tool_calls + self.tool_calls
        self.banked_tool_calls = Counter()


class AgentStream(abc.ABC):
    """The output of one run, fed line by line; it fills `run`."""

    def __init__(self, run: AgentRun) -> None:
        self.run = run

    @abc.abstractmethod
    def feed(self, line: str) -> list[AgentEvent]:
        """Events in one line of output (none for noise). Raise a SandqueueError to stop
        the run at once (e.g. the agent said at start that it cannot reach its tools)."""

    @abc.abstractmethod
    def verdict(self) -> errors.SandqueueError | None:
        """After the process ended: None for a successful run, else the error that
        describes the failure (`run.exit_code` and `run.stderr_tail` are set)."""


class Agent(abc.ABC):
    name: ClassVar[str]

    @abc.abstractmethod
    def environment(self, settings: Settings, simulated: bool) -> dict[str, str]:
        """Variables the agent's process needs (credentials). Raise AuthError if none is
        configured; a simulated sandbox may get a placeholder."""

    @abc.abstractmethod
    def check(self, sandbox: Sandbox) -> str:
        """The CLI's version; raise AgentMissing when it does not run for the sandbox user."""

    @abc.abstractmethod
    def prepare(self, sandbox: Sandbox, task: AgentTask, with_mcp: bool,
                turn: Turn | None = None) -> str:
        """Write the run's input files; return the command line that starts the run
        (continuing `turn.resume_session_id` when set)."""

    @abc.abstractmethod
    def stream(self, task: AgentTask, with_mcp: bool, run: AgentRun) -> AgentStream:
        """A parser for this run's output."""

    @abc.abstractmethod
    def price(self, model: str | None, usage: dict[str, int]) -> float:
        """USD for this usage (an estimate, replaced by the agent's own figure if any)."""

    @abc.abstractmethod
    def template_recipe(self, version: str | None = None,
                        base: str = "mcp-gateway") -> TemplateRecipe:
        """What a sandbox template needs to run this agent, at this version."""

    # -- typed answers and follow-up turns (issue 12); defaults for an agent without them
    resumable: ClassVar[bool] = False
    """Whether `prepare` honours `Turn.resume_session_id` (repair turns, follow-ups)."""

    def native_output_schema(self, version: str | None) -> bool:
        """Whether this version of the agent takes a JSON Schema for its final answer
        itself (`Turn.output_schema`); if not, the runner asks for JSON in the system
        prompt (`append_system_prompt`) and validates the text."""
        return False

    def session_transcript(self, session_id: str, cwd: str | None) -> str | None:
        """The sandbox path of a session run in `cwd` (None: the agent's default), which a
        later run in another sandbox restores there to resume the session; None if the
        agent keeps no transcript."""
        return None
