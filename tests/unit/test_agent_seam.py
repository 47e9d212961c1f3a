"""The agent seam: a second, minimal agent adapter runs through the unchanged pipeline.

`EchoAgent` is what the README's "add an agent" section describes: an `Agent` and an
`AgentStream` subclass, registered by name. Its CLI (`echo-agent`) exists in simulated
sandboxes as a scripted program beside Claude Code's stand-in. Nothing in `worker/pipeline.py`
knows either agent."""

from __future__ import annotations

import ast
import json
import shlex
from pathlib import Path
from typing import Any, ClassVar

import pytest

from sandqueue import errors
from sandqueue.contract import AgentTask, ErrorCategory, TaskMessage, TaskStatus
from sandqueue.settings import Settings
from worker.agent import AGENTS, make_agent
from worker.agent.base import (
    Agent,
    AgentEvent,
    AgentRun,
    AgentStream,
    AgentText,
    ToolCall,
    Turn,
    Usage,
)
from worker.agent.runner import AgentRunner
from worker.agent.watchdog import Watchdog
from worker.pipeline import Pipeline, TaskContext
from worker.sandbox.base import Sandbox, TemplateRecipe
from worker.sandbox.sim import SimCommand, SimProvider, SimSandbox

REPO = Path(__file__).resolve().parents[2]


class EchoStream(AgentStream):
    """Lines of JSON: {"say": ...}, {"tool": ...}, {"tokens": n}, {"done": answer}."""

    done = False

    def feed(self, line: str) -> list[AgentEvent]:
        event = json.loads(line)
        if "say" in event:
            self.run.last_text = event["say"]
            return [AgentText(event["say"])]
        if "tool" in event:
            self.run.tool_calls[event["tool"]] += 1
            return [ToolCall(event["tool"])]
        if "tokens" in event:
            return [Usage(f"m{event['n']}", {"input_tokens": event["tokens"]})]
        self.run.final_text, self.done = event["done"], True
        return []

    def verdict(self) -> errors.SandqueueError | None:
        return None if self.done else errors.AgentNoResult("echo-agent ended without answer")


class EchoAgent(Agent):
    name: ClassVar[str] = "echo"

    def environment(self, settings: Settings, simulated: bool) -> dict[str, str]:
        return {"ECHO_KEY": "echo-secret-value"}

    def check(self, sandbox: Sandbox) -> str:
        out = sandbox.run("echo-agent --version", timeout_s=5)
        if out.exit_code:
            raise errors.AgentMissing("echo-agent is not installed")
        return out.stdout.strip()

    def prepare(self, sandbox: Sandbox, task: AgentTask, with_mcp: bool,
                turn: Turn | None = None) -> str:
        sandbox.write_file("/home/user/echo-prompt.txt", task.prompt)
        sandbox.write_file(ECHO_SYSTEM, task.append_system_prompt or "")
        return "cd /home/user && exec echo-agent < /home/user/echo-prompt.txt"

    def stream(self, task: AgentTask, with_mcp: bool, run: AgentRun) -> AgentStream:
        return EchoStream(run)

    def price(self, model: str | None, usage: dict[str, int]) -> float:
        return usage.get("input_tokens", 0) / 1000

    def template_recipe(self, version: str | None = None,
                        base: str = "mcp-gateway") -> TemplateRecipe:
        return TemplateRecipe(base=base, npm_global=(f"echo-agent@{version or '1.0.0'}",))


ECHO_SYSTEM = "/home/user/echo-system.txt"


class EchoProgram:
    """`echo-agent` inside a simulated sandbox: says the prompt back, calls one tool; asked
    in its system prompt for JSON, it answers {"text": <the prompt, upper case>}."""

    def __init__(self, sandbox: SimSandbox, cmd: str, envs: dict[str, str]) -> None:
        self.sandbox, self.cmd, self.envs = sandbox, cmd, envs

    def version(self) -> tuple[int, str, str]:
        return 0, "echo-agent 1.0.0\n", ""

    def script(self, proc: SimCommand) -> int:
        stdin = shlex.split(self.cmd)[-1]
        prompt = self.sandbox.files[stdin].decode()
        answer = prompt.upper()
        if "JSON Schema" in self.sandbox.files.get(ECHO_SYSTEM, b"").decode():
            answer = json.dumps({"text": answer})
        for event in ({"say": f"key={self.envs.get('ECHO_KEY')}"}, {"tool": "Read"},
                      {"tokens": 500, "n": 1}, {"done": answer}):
            proc.emit(json.dumps(event) + "\n")
        return 0


def run_task(pipeline: Pipeline, **fields: Any) -> tuple[Any, list[dict[str, Any]]]:
    events: list[dict[str, Any]] = []
    task = AgentTask(prompt="hello seam", **fields)
    ctx = TaskContext(task_id="t-seam", message=TaskMessage(task=task), started_at=0.0,
                      deadline_at=9e12, on_event=events.append)
    return pipeline.run(ctx), events


@pytest.fixture
def registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(AGENTS, "echo", lambda settings: EchoAgent())


@pytest.mark.usefixtures("registered")
def test_a_second_agent_runs_through_the_unchanged_pipeline() -> None:
    settings = Settings(_env_file=None, agent="echo", backoff_scale=0,  # type: ignore[call-arg]
                        sim_create_latency_s=0)
    provider = SimProvider(settings)
    provider.programs["echo-agent"] = EchoProgram
    pipeline = Pipeline(settings, provider, make_agent(settings),
                        runner=AgentRunner(Watchdog(tick_s=0.02), stall_timeout_s=5))
    result, events = run_task(pipeline)
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.result == "HELLO SEAM"
    assert result.agent_version == "echo-agent 1.0.0"
    assert [(t.name, t.count) for t in result.tool_calls] == [("Read", 1)]
    assert result.usage == {"input_tokens": 500}
    # its credential reached the sandbox and is redacted from what leaves the worker
    assert {"phase": "agent_text", "text": "key=[REDACTED]"} in events


@pytest.mark.usefixtures("registered")
def test_the_same_budget_rule_binds_any_agent() -> None:
    settings = Settings(_env_file=None, agent="echo", sim_create_latency_s=0)  # type: ignore[call-arg]
    provider = SimProvider(settings)
    provider.programs["echo-agent"] = EchoProgram
    pipeline = Pipeline(settings, provider, make_agent(settings),
                        runner=AgentRunner(Watchdog(tick_s=0.02), stall_timeout_s=5))
    result, _ = run_task(pipeline, max_cost_usd=0.25)  # 500 tokens price at 0.5
    assert result.error is not None
    assert result.error.category is ErrorCategory.BUDGET_EXCEEDED


def _echo_pipeline() -> tuple[Pipeline, list[SimSandbox]]:
    settings = Settings(_env_file=None, agent="echo", backoff_scale=0,  # type: ignore[call-arg]
                        sim_create_latency_s=0)
    provider = SimProvider(settings)
    provider.programs["echo-agent"] = EchoProgram
    created: list[SimSandbox] = []
    create = provider.create

    def keep(spec: Any) -> Any:
        created.append(create(spec))
        return created[-1]

    provider.create = keep  # type: ignore[method-assign]
    return Pipeline(settings, provider, make_agent(settings),
                    runner=AgentRunner(Watchdog(tick_s=0.02), stall_timeout_s=5)), created


@pytest.mark.usefixtures("registered")
def test_an_agent_without_native_structured_output_is_asked_in_its_system_prompt() -> None:
    pipeline, sandboxes = _echo_pipeline()
    schema = {"type": "object", "properties": {"text": {"type": "string"}},
              "required": ["text"]}
    result, _ = run_task(pipeline, output_schema=schema)
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.output == {"text": "HELLO SEAM"}
    system = sandboxes[0].files[ECHO_SYSTEM].decode()
    assert "JSON Schema" in system and json.dumps(schema) in system


@pytest.mark.usefixtures("registered")
def test_an_agent_that_cannot_resume_gets_no_repair_turn() -> None:
    pipeline, sandboxes = _echo_pipeline()
    schema = {"type": "object", "properties": {"text": {"type": "integer"}}}
    result, _ = run_task(pipeline, output_schema=schema)
    assert result.error is not None
    assert result.error.category is ErrorCategory.OUTPUT_INVALID
    assert "$.text: 'HELLO SEAM' is not of type 'integer'" in result.error.message
    assert result.agent_turns == 1 and len(sandboxes[0].command_lines) == 1
    assert result.result == json.dumps({"text": "HELLO SEAM"})  # the raw answer is kept
    assert result.output is None


def test_an_unknown_agent_is_a_configuration_error() -> None:
    with pytest.raises(errors.ConfigError, match="claude-code"):
        make_agent(Settings(_env_file=None, agent="nope"))  # type: ignore[call-arg]


def test_the_pipeline_knows_no_agent_and_no_claude_specifics() -> None:
    source = (REPO / "worker/pipeline.py").read_text()
    imported = {node.module for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.ImportFrom) and node.module}
    assert "worker.agent.claude_code" not in imported
    assert not any(m.startswith("worker.sandbox.") and m != "worker.sandbox.base"
                   for m in imported)
    for claude_word in ("claude", "stream-json", "tool_use", "ANTHROPIC", "mcp__"):
        assert claude_word.lower() not in source.lower(), claude_word
