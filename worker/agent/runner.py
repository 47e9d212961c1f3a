"""Runs any agent in a sandbox: start, follow its output, stop it when it must stop.

What every agent run needs and no adapter should redo: output chunks split into lines
(`LineBuffer`), a watchdog that stops a run that stalls, overruns its deadline or is
cancelled, usage counted once per model message, and the task's `max_cost_usd` enforced
on the running estimate. The adapter (`worker/agent/base.py`) says what the lines mean.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sandqueue import errors
from sandqueue.contract import AgentTask
from worker.agent import typed
from worker.agent.base import (
    Agent,
    AgentEvent,
    AgentRun,
    AgentStream,
    OutputRepair,
    Turn,
    Usage,
)
from worker.agent.stream import MAX_LINE_CHARS, LineBuffer
from worker.agent.watchdog import Watch, Watchdog
from worker.sandbox.base import Sandbox

EventSink = Callable[[AgentEvent], None]

log = logging.getLogger(__name__)


class AgentRunner:
    def __init__(self, watchdog: Watchdog, *, stall_timeout_s: float) -> None:
        self.watchdog = watchdog
        self.stall_timeout_s = stall_timeout_s

    def run(self, agent: Agent, sandbox: Sandbox, task: AgentTask, *, deadline_at: float,
            run: AgentRun, with_mcp: bool = True, on_event: EventSink | None = None,
            interrupted: Callable[[], errors.SandqueueError | None] | None = None,
            on_started: Callable[[], None] | None = None,
            resume_session_id: str | None = None, cwd: str | None = None) -> AgentRun:
        """Run the agent to its end, or raise the error that describes the failure.

        With `resume_session_id` the agent continues that session, run in `cwd` (a
        follow-up task: worker/sessions.py restored the transcript). With
        an `output_schema`, the answer is checked (`worker/agent/typed.py`); an invalid one
        gets ONE repair turn in the same session, listing what was wrong, and a second
        invalid answer ends the run `output_invalid` with its raw text kept."""
        run.agent_version = agent.check(sandbox)
        schema = task.output_schema
        native = schema is not None and agent.native_output_schema(run.agent_version)
        if schema is not None and not native:
            task = typed.instruct(task, schema)
        turn = Turn(resume_session_id=resume_session_id,
                    output_schema=schema if native else None, cwd=cwd)
        go = _Go(agent, sandbox, deadline_at, with_mcp, on_event, interrupted)
        self._turn(go, task, turn, run, on_started)
        if schema is None:
            return run
        problems = typed.judge(run, schema)
        if not problems:
            return run
        if not agent.resumable or run.session_id is None:
            raise errors.OutputInvalid(errors.describe_output(problems, typed.refused(run)))
        log.info("the answer does not satisfy output_schema (%d problem(s)); one repair "
                 "turn in session %s", len(problems), run.session_id)
        if on_event is not None:
            on_event(OutputRepair(tuple(problems)))
        run.bank()
        repair = task.model_copy(update={"prompt": typed.repair_prompt(problems)})
        try:
            self._turn(go, repair, Turn(resume_session_id=run.session_id,
                                        output_schema=turn.output_schema, cwd=cwd), run, None)
        finally:
            run.unbank_tool_calls()
        problems = typed.judge(run, schema)
        if problems:
            raise errors.OutputInvalid(errors.describe_output(problems, typed.refused(run)))
        return run

    def _turn(self, go: _Go, task: AgentTask, turn: Turn, run: AgentRun,
              on_started: Callable[[], None] | None) -> None:
        """One start of the agent's process, followed to its end."""
        cmd = go.agent.prepare(go.sandbox, task, go.with_mcp, turn)
        holder: dict[str, Any] = {}
        watch = Watch(stall_timeout_s=self.stall_timeout_s, deadline_at=go.deadline_at,
                      kill=lambda: holder["cmd"].kill() if "cmd" in holder else None,
                      interrupted=go.interrupted)
        sink = _Output(go.agent, go.agent.stream(task, go.with_mcp, run), task, watch,
                       go.on_event)
        started = time.monotonic()
        remaining = max(1.0, go.deadline_at - time.time())
        run.started = True
        run.turns += 1
        if on_started is not None:
            on_started()
        holder["cmd"] = go.sandbox.start(cmd, on_stdout=sink.on_stdout,
                                         on_stderr=sink.on_stderr, timeout_s=remaining + 5)
        self.watchdog.watch(watch)
        try:
            run.exit_code = holder["cmd"].wait()
        except errors.SandqueueError as e:
            # A stream that breaks while being stopped reports the stop, not the break.
            if watch.reason is not None:
                raise watch.reason from e
            raise
        finally:
            self.watchdog.unwatch(watch)
            run.duration_s += time.monotonic() - started
            sink.close()
        if watch.reason is not None:
            raise watch.reason
        failure = sink.stream.verdict()
        if failure is not None:
            raise failure


@dataclass(frozen=True)
class _Go:
    """What every turn of one run shares."""

    agent: Agent
    sandbox: Sandbox
    deadline_at: float
    with_mcp: bool
    on_event: EventSink | None
    interrupted: Callable[[], errors.SandqueueError | None] | None


class _Output:
    """Receives the agent's output chunks and acts on what they say, as they arrive."""

    def __init__(self, agent: Agent, stream: AgentStream, task: AgentTask, watch: Watch,
                 on_event: EventSink | None) -> None:
        self.agent = agent
        self.stream = stream
        self.run = stream.run
        self.task = task
        self.watch = watch
        self.on_event = on_event
        self.lines = LineBuffer()
        self.stderr_tail: deque[str] = deque(maxlen=50)

    def on_stdout(self, chunk: str) -> None:
        self.watch.touch()
        for line in self.lines.feed(chunk):
            self._line(line)

    def on_stderr(self, chunk: str) -> None:
        self.watch.touch()
        self.stderr_tail.append(chunk)

    def close(self) -> None:
        for line in self.lines.close():
            self._line(line)
        self.run.stderr_tail = "".join(self.stderr_tail)[-4000:]
        if self.lines.dropped_lines:
            log.warning("the agent printed %d line(s) over %d characters; they were dropped",
                        self.lines.dropped_lines, MAX_LINE_CHARS)

    def _line(self, line: str) -> None:
        try:
            events = self.stream.feed(line)
        except errors.SandqueueError as e:
            self.watch.trip(e)
            return
        for event in events:
            if isinstance(event, Usage):
                self.run.usage_by_message[event.message_id] = dict(event.tokens)
                self._count_cost()
            if self.on_event is not None:
                self.on_event(event)

    def _count_cost(self) -> None:
        run = self.run
        # this turn's usage: earlier turns of the session are in run.banked_cost_usd
        run.estimated_cost_usd = self.agent.price(run.model, run.turn_usage)
        spent = run.banked_cost_usd + run.estimated_cost_usd  # a repair turn counts it all
        cap = self.task.max_cost_usd
        if cap is not None and spent >= cap:
            self.watch.trip(errors.BudgetExceeded(
                f"the agent was stopped at an estimated ${spent:.4f}, over "
                f"the task's max_cost_usd (${cap:g})"
            ))
