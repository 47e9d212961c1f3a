"""Typed answers (`output_schema`): the schema checked at submit, the answer checked after the
run, one repair turn in the same session, `output_invalid` after a second bad answer.

The pipeline runs in-process with the simulated provider and Claude Code's adapter; the
scripted CLI answers per turn of its session from SIM_OUTPUT (worker/sandbox/sim.py) and
honours `--json-schema` and `--resume` as the real CLI does (research/claude-code-facts.md §7).
"""

from __future__ import annotations

import json
import shlex
import time
from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from sandqueue import errors, schemas
from sandqueue.contract import AgentResult, AgentTask, ErrorCategory, TaskMessage, TaskStatus
from sandqueue.settings import Settings
from worker.agent.base import Turn
from worker.agent.claude_code import ClaudeCodeAgent, build_command, classify_result
from worker.agent.runner import AgentRunner
from worker.agent.watchdog import Watchdog
from worker.pipeline import Pipeline, TaskContext
from worker.sandbox.sim import SimProvider, SimSandbox

WATCHDOG = Watchdog(tick_s=0.02)
DUE = {"type": "object", "properties": {"title": {"type": "string"},
                                        "due": {"type": "string", "format": "date"}},
       "required": ["title", "due"]}


class Harness:
    """The pipeline on the sim, keeping every sandbox it created (for the flags each run got)."""

    def __init__(self, agent: ClaudeCodeAgent | None = None) -> None:
        self.settings = Settings(_env_file=None, backoff_scale=0,  # type: ignore[call-arg]
                                 sim_create_latency_s=0, sim_latency_s=0.01)
        self.provider = SimProvider(self.settings)
        self.sandboxes: list[SimSandbox] = []
        self.events: list[dict[str, Any]] = []
        create = self.provider.create

        def keep(spec: Any) -> Any:
            self.sandboxes.append(create(spec))
            return self.sandboxes[-1]

        self.provider.create = keep  # type: ignore[method-assign]
        self.pipeline = Pipeline(self.settings, self.provider, agent or ClaudeCodeAgent(),
                                 runner=AgentRunner(WATCHDOG, stall_timeout_s=5))

    def run(self, output: list[Any] | None = None, **fields: Any) -> AgentResult:
        envs = {"SIM_OUTPUT": json.dumps(output)} if output is not None else {}
        task = AgentTask(prompt="When is the report due?", envs=envs, **fields)
        now = time.time()
        ctx = TaskContext(task_id="t-typed", message=TaskMessage(task=task, submitted_at=now),
                          started_at=now, deadline_at=now + 60, on_event=self.events.append)
        result = self.pipeline.run(ctx)
        assert self.provider.list_live() == []
        return result

    def argv(self, n: int = 0) -> list[list[str]]:
        """The agent command lines the n-th sandbox ran, split as bash would."""
        return [shlex.split(line) for line in self.sandboxes[n].command_lines]


def flag(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


# -- the schema itself, at submit --------------------------------------------------------

def _nested(levels: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object"}
    inner = schema
    for _ in range(levels):
        inner["properties"] = {"a": {"type": "object"}}
        inner = inner["properties"]["a"]
    return schema


class Report(BaseModel):
    title: str
    pages: int


def test_a_pydantic_model_class_becomes_its_json_schema() -> None:
    task = AgentTask(prompt="p", output_schema=Report)  # type: ignore[arg-type]
    assert task.output_schema == Report.model_json_schema()
    assert schemas.columns(task.output_schema) == ["title", "pages"]


def test_the_python_api_takes_a_model_class() -> None:
    from producer.api import Client

    client = Client(Settings(_env_file=None))  # type: ignore[call-arg]
    task = client.build("Summarise", output_schema=Report)
    assert task.output_schema == Report.model_json_schema()
    with pytest.raises(errors.InvalidTask, match="output_schema: must describe a JSON object"):
        client.build("Summarise", output_schema={"type": "string"})


@pytest.mark.parametrize(("schema", "said"), [
    ({"type": "object", "properties": {"a": {"type": "strnig"}}}, "not a valid JSON Schema"),
    ({"type": "array", "items": {"type": "string"}}, '"type": "object"'),
    ({"type": "object", "properties": {"a": {"$ref": "https://evil.example/s.json"}}},
     "$ref must point inside the schema"),
    ({"type": "object", "description": "x" * (schemas.MAX_OUTPUT_SCHEMA_BYTES + 1)},
     "over the 65536-byte limit"),
    ("not a schema", "must be a JSON Schema object"),
    ({"$schema": {"a": 1}, "type": "object"}, "$schema must be a meta-schema URI"),
    (_nested(200), "over 64 levels deep"),
])
def test_a_bad_schema_is_refused_at_submit_saying_why(schema: Any, said: str) -> None:
    with pytest.raises(ValidationError) as caught:
        AgentTask(prompt="p", output_schema=schema)
    assert said in str(caught.value)
    assert "output_schema" in str(caught.value)


def test_problems_name_where_and_assert_formats() -> None:
    assert schemas.problems(DUE, {"title": "t", "due": "2026-12-24"}) == []
    assert schemas.problems(DUE, {"title": 3, "due": "next week"}) == [
        "$.due: 'next week' is not a 'date'", "$.title: 3 is not of type 'string'"]


def test_a_hostile_answer_is_a_problem_not_a_crash() -> None:
    deep: Any = 0
    for _ in range(100_000):
        deep = [deep]
    nested = {"type": "object", "properties": {"a": {"$ref": "#/$defs/list"}},
              "$defs": {"list": {"type": ["array", "integer"], "items": {"$ref": "#/$defs/list"}}}}
    assert schemas.problems(nested, {"a": deep}) == [
        "$: the answer nests too deeply to be checked"]


# -- the adapter's flags and the version that gets them ----------------------------------

def test_claude_code_gets_json_schema_from_2_1_205_and_the_prompt_instruction_before() -> None:
    agent = ClaudeCodeAgent()
    assert agent.native_output_schema("2.1.221")
    assert agent.native_output_schema("2.1.205")
    assert not agent.native_output_schema("2.1.204")
    assert not agent.native_output_schema(None)
    argv = shlex.split(build_command(AgentTask(prompt="p"), turn=Turn(
        resume_session_id="abc-123", output_schema=DUE)))
    assert flag(argv, "--resume") == "abc-123"
    assert json.loads(flag(argv, "--json-schema") or "") == DUE


def test_the_clis_own_structured_output_retries_running_out_is_output_invalid() -> None:
    said = "Failed to provide valid structured output after 5 attempts"
    kind, text = classify_result({"type": "result", "is_error": True, "errors": [said],
                                  "subtype": "error_max_structured_output_retries"})
    assert kind.category is ErrorCategory.OUTPUT_INVALID
    assert "5 attempts" in text


# -- the three outcomes -----------------------------------------------------------------

def test_a_valid_answer_is_parsed_into_output() -> None:
    h = Harness()
    answer = {"title": "Q4 report", "due": "2026-12-24"}
    result = h.run([answer], output_schema=DUE)
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.output == answer
    assert result.agent_turns == 1
    (argv,) = h.argv()
    assert json.loads(flag(argv, "--json-schema") or "") == DUE  # 2.1.221: natively


def test_an_invalid_answer_is_repaired_in_the_same_session() -> None:
    h = Harness()
    # The CLI's own check ignores `format`: "next week" passes it, not ours.
    result = h.run([{"title": "Q4", "due": "next week"}, {"title": "Q4", "due": "2026-12-24"}],
                   output_schema=DUE)
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.output == {"title": "Q4", "due": "2026-12-24"}
    assert result.agent_turns == 2 and result.attempts == 1 and result.agent_runs == 1
    first, repair = h.argv()
    assert flag(first, "--resume") is None
    assert flag(repair, "--resume") == result.session_id  # the first run's session, kept
    assert json.loads(flag(repair, "--json-schema") or "") == DUE
    prompt = h.sandboxes[0].files["/home/user/.sandqueue/prompt.txt"].decode()
    assert "$.due: 'next week' is not a 'date'" in prompt
    assert {"phase": "output_repair",
            "problems": ["$.due: 'next week' is not a 'date'"]} in h.events
    # both turns are counted: the sim reports $0.0042 per start of the CLI
    assert result.total_cost_usd == pytest.approx(0.0084)


def test_an_answer_still_invalid_after_the_repair_turn_fails_output_invalid() -> None:
    h = Harness()
    result = h.run([{"title": "Q4", "due": "next week"}, {"title": "Q4", "due": "soon"}],
                   output_schema=DUE)
    assert result.status is TaskStatus.FAILED
    assert result.error is not None
    assert result.error.category is ErrorCategory.OUTPUT_INVALID
    assert not result.error.retryable
    assert "$.due: 'soon' is not a 'date'" in result.error.message
    assert result.output is None
    assert result.agent_turns == 2 and result.attempts == 1
    assert result.result is not None and "simulated" in result.result  # the raw text


def test_the_refused_structured_answer_is_quoted_not_the_text_beside_it() -> None:
    """Under --json-schema the answer judged is `structured_output`; the result's text beside
    it is not the answer, so the error quotes the refused value the user needs to see."""
    h = Harness()
    refused = {"title": "Q4", "due": "soon"}
    result = h.run([{"title": "Q4", "due": "next week"}, refused], output_schema=DUE)
    assert result.error is not None
    assert result.error.category is ErrorCategory.OUTPUT_INVALID
    assert json.dumps(refused) in result.error.message


def test_an_old_cli_is_asked_in_the_system_prompt_and_its_text_parsed() -> None:
    class OldClaude(ClaudeCodeAgent):
        def native_output_schema(self, version: str | None) -> bool:
            return False  # as for a version before 2.1.205

    h = Harness(OldClaude())
    result = h.run(["Here you go: not JSON", '```json\n{"title": "Q4", "due": "2026-12-24"}\n```'],
                   output_schema=DUE)
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert result.output == {"title": "Q4", "due": "2026-12-24"}
    first, repair = h.argv()
    assert "--json-schema" not in first and "--json-schema" not in repair
    assert json.dumps(DUE) in (flag(first, "--append-system-prompt") or "")
    assert flag(repair, "--resume") == result.session_id


def test_an_unknown_resume_id_is_the_clis_error_result() -> None:
    h = Harness()
    sandbox = h.provider.create(_spec())
    out: list[str] = []
    cmd = build_command(AgentTask(prompt="p"), with_mcp=False,
                        turn=Turn(resume_session_id="4f1c-no-such-session"))
    sandbox.write_file("/home/user/.sandqueue/prompt.txt", "p")
    code = sandbox.start(cmd, on_stdout=out.append, on_stderr=out.append, timeout_s=10).wait()
    sandbox.kill()
    (line,) = [json.loads(x) for x in "".join(out).splitlines() if x.startswith("{")]
    assert code == 1
    assert line["subtype"] == "error_during_execution" and line["is_error"] is True
    assert line["errors"] == ["No conversation found with session ID: 4f1c-no-such-session"]


def _spec() -> Any:
    from worker.sandbox.base import SandboxSpec

    return SandboxSpec(task_id="t", attempt=1, lifetime_s=60, deadline_at=time.time() + 60,
                       envs={"ANTHROPIC_API_KEY": "sk-ant-x"})


def test_a_repair_turn_counts_the_first_turns_cost_against_max_cost_usd() -> None:
    h = Harness()
    # The sim reports $0.0042 per start; its estimate per turn is far below that. The
    # first turn's reported cost alone is under the cap, with the repair turn it is over.
    first = h.run([{"title": "Q4", "due": "next week"}, {"title": "Q4", "due": "2026-12-24"}],
                  output_schema=DUE, max_cost_usd=0.0043)
    assert first.error is not None, first
    assert first.error.category is ErrorCategory.BUDGET_EXCEEDED
    assert first.agent_turns == 2
