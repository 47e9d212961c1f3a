"""One task, start to result: attempts, each in a fresh sandbox, under one deadline.

Retries live here, not in Celery: each attempt needs a new sandbox anyway, backoff waits
are cheap in a thread, and the task's deadline must cover all attempts. Only retryable
errors are retried, and not once the agent has made a tool call (its effects could repeat)
unless the task opts in.
"""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from sandqueue import errors
from sandqueue.artifacts import ArtifactStore, make_store
from sandqueue.contract import (
    AgentResult,
    ArtifactRef,
    AttemptRecord,
    McpServerStatus,
    TaskMessage,
    TaskStatus,
    Timings,
    ToolCallCount,
)
from sandqueue.sealing import Sealer
from sandqueue.settings import Settings
from worker import sessions
from worker.agent.base import (
    Agent,
    AgentEvent,
    AgentRun,
    AgentText,
    OutputRepair,
    ToolCall,
    Usage,
)
from worker.agent.runner import AgentRunner
from worker.agent.watchdog import Watchdog
from worker.credentials import resolve_envs, resolve_mcp
from worker.limits import Limiter
from worker.redact import Redactor
from worker.sandbox.base import Sandbox, SandboxProvider, SandboxSpec
from worker.workspace import Workspace

log = logging.getLogger(__name__)

INFRA_MIN_DELAY_S = 0.05
"""Floor of an infrastructure retry's backoff, also with backoff off (tests): a failing
dependency is never hammered in a tight loop."""

StateSink = Callable[..., None]
EventSink = Callable[[dict[str, Any]], None]
"""Receives the task's progress events (dicts as published to its stream)."""


def _noop(*_: Any, **__: Any) -> None:
    return None


@dataclass
class TaskContext:
    """One delivery of a task, and the hooks through which the worker observes it."""

    task_id: str
    message: TaskMessage
    started_at: float
    deadline_at: float
    on_state: StateSink = _noop
    on_event: EventSink = _noop
    on_tool_call: Callable[[str], None] = _noop
    next_attempt: Callable[[], int] | None = None
    """Attempt numbers counted across deliveries (the store's counter); local if None."""
    on_attempt: Callable[[AttemptRecord], None] = _noop
    """Persists an attempt's record (when it starts, gets a sandbox, ends): see store.py."""
    attempt_log: list[AttemptRecord] = field(default_factory=list)
    """Attempts of earlier deliveries (the runtime fills it in), then this delivery's."""
    worker: str | None = None
    delivery: int | None = None
    timeout_s_applied: float | None = None
    warnings: list[str] = field(default_factory=list)
    """Told to the caller in the result, e.g. that the deadline was clamped."""
    stop: threading.Event = field(default_factory=threading.Event)
    """Set when the worker stops or lost this task's lease: hand the task back."""
    cancel: threading.Event = field(default_factory=threading.Event)
    """Set when somebody cancelled the task."""
    lease_lost: threading.Event = field(default_factory=threading.Event)
    """Set (with `stop`) when another worker took the task over."""
    _local_attempts: int = 0

    def interruption(self) -> errors.SandqueueError | None:
        if self.cancel.is_set():
            return errors.Cancelled("the task was cancelled")
        if self.stop.is_set():
            return errors.WorkerStopping("the worker is stopping; the task goes back to the queue")
        return None

    def attempt_number(self) -> int:
        if self.next_attempt is not None:
            return self.next_attempt()
        self._local_attempts += 1
        return self._local_attempts


@dataclass
class _Progress:
    """What the attempts so far produced, kept for the result whatever the ending."""

    attempts: int = 0
    entry: AttemptRecord | None = None
    """The current attempt's record."""
    sandbox: Sandbox | None = None
    """The current attempt's sandbox, once created (its `killed` says if the kill held)."""
    run: AgentRun = field(default_factory=AgentRun)
    timings: Timings = field(default_factory=Timings)
    sandbox_id: str | None = None
    spent_usd: float = 0.0
    mcp_tools: list[str] = field(default_factory=list)
    agent_runs: int = 0
    infra_retries: int = 0
    infra_streak: int = 0
    """Infrastructure failures in a row (the exponent of their backoff)."""
    # -- workspace in and out (issue 12)
    repo_commit: str | None = None
    artifacts: list[ArtifactRef] = field(default_factory=list)
    """The last attempt's artifacts (each attempt collects afresh)."""
    # -- follow-up turns (issue 12)
    transcript: ArtifactRef | None = None
    """The last attempt's saved session transcript."""


class Pipeline:
    def __init__(self, settings: Settings, provider: SandboxProvider, agent: Agent,
                 environ: Mapping[str, str] | None = None,
                 limiter: Limiter | None = None, runner: AgentRunner | None = None,
                 artifacts: ArtifactStore | None = None) -> None:
        self.settings = settings
        self.provider = provider
        self.agent = agent
        self.runner = runner or AgentRunner(Watchdog(),
                                            stall_timeout_s=settings.stall_timeout_s)
        self.limiter = limiter
        self.environ = environ if environ is not None else os.environ
        self.sealer = Sealer(settings.secret_keys)
        self._artifacts = artifacts

    @property
    def artifacts(self) -> ArtifactStore:
        """The artifact store, made on first use: a task that brings nothing back needs
        none (and an S3 store needs boto3)."""
        if self._artifacts is None:
            self._artifacts = make_store(self.settings)
        return self._artifacts

    @property
    def workspace(self) -> Workspace:
        return Workspace(self.settings, self.artifacts, self.environ)

    def run(self, ctx: TaskContext) -> AgentResult:
        task = ctx.message.task
        redactor = Redactor()
        redactor.add(*self.agent.environment(self.settings, simulated=True).values())
        progress = _Progress()
        progress.timings.queued_s = max(0.0, ctx.started_at - ctx.message.submitted_at)
        try:
            mcp, secrets = resolve_mcp(task.mcp, self.environ, self.sealer)
            envs, env_secrets = resolve_envs(task.envs, self.environ, self.sealer)
            redactor.add(*secrets, *env_secrets)
            if envs != task.envs:  # the sandbox gets the opened values; Redis never does
                ctx.message = ctx.message.model_copy(
                    update={"task": task.model_copy(update={"envs": envs})})
            self._attempts(ctx, mcp, progress, redactor)
        except errors.WorkerStopping:
            raise  # the worker hands the task back; no result is stored
        except errors.SandqueueError as e:
            return self._result(ctx, progress, e, redactor)
        return self._result(ctx, progress, None, redactor)

    def _attempts(self, ctx: TaskContext, mcp: dict[str, Any], progress: _Progress,
                  redactor: Redactor) -> None:
        task = ctx.message.task
        progress.agent_runs = sum(1 for e in ctx.attempt_log if e.agent_ran)
        progress.infra_retries = sum(1 for e in ctx.attempt_log
                                     if not e.agent_ran and e.outcome != "running")
        retried: errors.SandqueueError | None = None
        while True:
            if progress.agent_runs >= task.retry.max_attempts:
                raise errors.WorkerLost(
                    f"all {task.retry.max_attempts} agent runs were used up across deliveries "
                    "(workers stopped or died while running this task)"
                )
            progress.attempts = ctx.attempt_number()
            self._open_attempt(ctx, progress)
            try:
                self._attempt(ctx, mcp, progress, redactor)
                self._close_attempt(ctx, progress, None, redactor, retried=False)
                return
            except errors.SandqueueError as e:
                err = e
            except Exception as e:  # a bug must end the task, not the worker thread
                log.exception("task %s: internal error", ctx.task_id)
                err = errors.SandqueueError(f"internal error: {type(e).__name__}: {e}")
            finally:
                progress.spent_usd += progress.run.cost_usd
            err, delay = self._verdict(ctx, err, progress)
            self._close_attempt(ctx, progress, err, redactor, retried=delay is not None
                                or isinstance(err, errors.WorkerStopping))
            if delay is None:
                if isinstance(err, errors.DeadlineExceeded) and retried is not None:
                    # The deadline struck while retrying: the cause worth telling is the
                    # failure that was being retried, not the attempt the clock cut short.
                    err.message += (f" (retrying after {retried.category.value}: "
                                    f"{retried.message})")
                raise err
            retried = err
            log.info("task %s: attempt %d failed (%s), retrying in %.1fs", ctx.task_id,
                     progress.attempts, err.category.value, delay)
            ctx.on_state(status=TaskStatus.RETRYING, error=err.category.value)
            ctx.on_event({"phase": "retrying", "attempt": progress.attempts,
                          "error": redactor.text(err.message), "delay_s": round(delay, 2)})
            self._wait(ctx, delay)

    def _verdict(self, ctx: TaskContext, err: errors.SandqueueError,
                 progress: _Progress) -> tuple[errors.SandqueueError, float | None]:
        """The error that ends this attempt, and the backoff before the next (None: none)."""
        task = ctx.message.task
        if isinstance(err, errors.WorkerStopping | errors.Cancelled):
            return err, None
        interrupted = ctx.interruption()
        if interrupted is not None:
            return interrupted, None
        if not err.retryable:
            return err, None
        if not progress.run.started:
            return self._infra_retry(ctx, err, progress)
        progress.infra_streak = 0
        if progress.agent_runs >= task.retry.max_attempts:
            return err, None
        tool_calls = sum(progress.run.tool_calls.values())
        if tool_calls and not task.retry.retry_after_side_effects:
            err.message += (
                f" (not retried: the agent had already made {tool_calls} tool call(s), "
                "whose effects a retry could repeat; set retry.retry_after_side_effects "
                "to allow it)"
            )
            return err, None
        delay = self._backoff(task.retry.backoff_s, task.retry.backoff_max_s,
                              progress.attempts, err.retry_after_s)
        if time.time() + delay >= ctx.deadline_at:
            err.message += " (no time left before the task's deadline for another attempt)"
            return err, None
        return err, delay

    def _infra_retry(self, ctx: TaskContext, err: errors.SandqueueError,
                     progress: _Progress) -> tuple[errors.SandqueueError, float | None]:
        """A failure before the agent ran had no side effects: retry it, with capped
        exponential backoff and jitter, for as long as the deadline allows, so that a
        30-second E2B outage does not fail a batch. These attempts do not count against
        `retry.max_attempts`, which bounds agent runs."""
        progress.infra_streak += 1
        s = self.settings
        delay = max(INFRA_MIN_DELAY_S, self._backoff(
            s.infra_backoff_s, s.infra_backoff_max_s, progress.infra_streak, err.retry_after_s))
        if time.time() + delay >= ctx.deadline_at:
            err.message += (f" (retried {progress.infra_retries} time(s) before the agent "
                            "could start; no time left before the task's deadline)")
            return err, None
        progress.infra_retries += 1
        return err, delay

    @staticmethod
    def _open_attempt(ctx: TaskContext, progress: _Progress) -> None:
        progress.run = AgentRun()
        progress.sandbox = None
        progress.entry = AttemptRecord(attempt=progress.attempts, delivery=ctx.delivery,
                                       worker=ctx.worker, started_at=round(time.time(), 3))
        ctx.attempt_log.append(progress.entry)
        ctx.on_attempt(progress.entry)
        ctx.on_state(status=TaskStatus.RUNNING, attempt=progress.attempts)

    @staticmethod
    def _close_attempt(ctx: TaskContext, progress: _Progress,
                       err: errors.SandqueueError | None, redactor: Redactor, *,
                       retried: bool) -> None:
        """Record how the attempt ended and whether its sandbox's kill was confirmed."""
        entry = progress.entry
        if entry is None:
            return
        if err is None:
            entry.outcome = "succeeded"
        elif isinstance(err, errors.WorkerStopping):
            entry.outcome = "worker_lost" if ctx.lease_lost.is_set() else "handed_back"
        else:
            entry.outcome = err.category.value
        entry.error = redactor.text(err.message) if err is not None else None
        entry.retried = retried
        if progress.sandbox is not None:
            entry.sandbox_killed = progress.sandbox.killed
            entry.killed_by = "worker" if progress.sandbox.killed else None
        entry.ended_at = round(time.time(), 3)
        ctx.on_attempt(entry)

    @staticmethod
    def _wait(ctx: TaskContext, delay: float) -> None:
        """Sleep before a retry, waking at once for a cancel or a worker stop."""
        end = time.monotonic() + delay
        while (left := end - time.monotonic()) > 0:
            if ctx.stop.wait(min(left, 0.5)) or ctx.cancel.is_set():
                break
        reason = ctx.interruption()
        if reason is not None:
            raise reason

    def _backoff(self, base: float, cap: float, attempt: int, hint: float | None) -> float:
        """Exponential, jittered to 50-100%, capped; a server's Retry-After wins when longer."""
        delay = min(cap, base * 2 ** min(attempt - 1, 30)) * random.uniform(0.5, 1.0)
        if hint:
            delay = max(delay, hint)
        return delay * self.settings.backoff_scale

    def _attempt(self, ctx: TaskContext, mcp: dict[str, Any], progress: _Progress,
                 redactor: Redactor) -> None:
        task = ctx.message.task
        remaining = ctx.deadline_at - time.time()
        if remaining <= 0:
            raise errors.DeadlineExceeded("the task's deadline passed before the attempt began")
        spec = SandboxSpec(
            task_id=ctx.task_id,
            attempt=progress.attempts,
            # E2B reaps the sandbox a little after the deadline even if this worker dies.
            lifetime_s=min(self.settings.sandbox_lifetime_s,
                           math.ceil(remaining) + self.settings.sandbox_grace_s),
            deadline_at=ctx.deadline_at,
            template=task.template,
            mcp=mcp,
            envs={**task.envs, **self.agent.environment(self.settings, self.provider.simulated)},
            labels=task.labels,
            request_timeout_s=max(1.0, min(remaining, self.settings.e2b_request_timeout_s)),
        )
        holder = f"{ctx.task_id}:{progress.attempts}"
        try:
            if self.limiter is not None:
                self.limiter.acquire(holder, self.limiter.sandbox_slots(), rate=True,
                                     until=ctx.deadline_at, interrupted=ctx.stop)
                self._check_time(ctx, "waiting for a sandbox slot")
            self._in_sandbox(ctx, spec, progress, redactor, bool(mcp))
        except errors.RateLimited as e:
            if self.limiter is not None:
                self.limiter.slow_down(e.retry_after_s)
            raise
        finally:
            if self.limiter is not None:
                self.limiter.release(holder)

    def _in_sandbox(self, ctx: TaskContext, spec: SandboxSpec, progress: _Progress,
                    redactor: Redactor, with_mcp: bool) -> None:
        task = ctx.message.task
        t0 = time.monotonic()
        with self.provider.session(spec) as sandbox:
            progress.timings.sandbox_create_s = time.monotonic() - t0
            progress.sandbox_id = sandbox.sandbox_id
            progress.sandbox = sandbox
            if progress.entry is not None:
                progress.entry.sandbox_id = sandbox.sandbox_id
                ctx.on_attempt(progress.entry)
            ctx.on_state(sandbox_id=sandbox.sandbox_id)
            ctx.on_event({"phase": "sandbox_created", "attempt": progress.attempts,
                          "sandbox_id": sandbox.sandbox_id,
                          "create_s": round(progress.timings.sandbox_create_s, 3)})
            self._check_time(ctx, "creating the sandbox")
            if with_mcp:
                t1 = time.monotonic()
                wait_s = min(self.settings.gateway_ready_timeout_s,
                             max(0.0, ctx.deadline_at - time.time()))
                progress.mcp_tools = sandbox.wait_gateway_ready(wait_s, list(task.mcp))
                progress.timings.gateway_ready_s = time.monotonic() - t1
                ctx.on_event({"phase": "gateway_ready"})
                self._check_time(ctx, "waiting for the MCP gateway")
            # -- workspace in (issue 12): the repo and input files, before the agent starts
            task_io = bool(task.repo or task.files or task.collect)
            if task_io:
                self._prepare(ctx, sandbox, progress, redactor)
            parent = ctx.message.parent  # -- follow-up turns (issue 12): the session back
            if parent is not None:
                sessions.restore(self.artifacts, self.agent, sandbox, parent)
                sessions.restore_files(self.artifacts, sandbox, parent)
            ctx.on_event({"phase": "agent_started"})
            try:
                self.runner.run(self.agent, sandbox, task, deadline_at=ctx.deadline_at,
                                run=progress.run, with_mcp=with_mcp,
                                on_event=self._agent_events(ctx, redactor, progress),
                                interrupted=ctx.interruption,
                                on_started=lambda: self._agent_started(ctx, progress),
                                resume_session_id=parent.session_id if parent else None,
                                cwd=parent.cwd if parent else None)
            finally:
                progress.timings.agent_run_s = progress.run.duration_s
                if task_io:  # -- workspace out (issue 12): also after a failure or timeout
                    self._collect(ctx, sandbox, progress, redactor)
                self._save_session(ctx, sandbox, progress)

    def _save_session(self, ctx: TaskContext, sandbox: Sandbox, progress: _Progress) -> None:
        """Keep the agent's session beyond the sandbox, for follow-up turns (issue 12);
        not when the task is handed back (the next delivery runs its own session)."""
        if not progress.run.started or (ctx.stop.is_set() and not ctx.cancel.is_set()):
            return
        ref, problem = sessions.save(self.artifacts, self.agent, sandbox, ctx.task_id,
                                     progress.run, replaces=progress.transcript)
        progress.transcript = ref
        if problem is not None:
            ctx.warnings.append(problem)

    def _prepare(self, ctx: TaskContext, sandbox: Sandbox, progress: _Progress,
                 redactor: Redactor) -> None:
        """Clone and write the inputs; if the deadline (or a cancel) strikes meanwhile,
        what is there is still collected."""
        try:
            progress.repo_commit = self.workspace.prepare(sandbox, ctx.message.task, redactor,
                                                          ctx.deadline_at)
            self._check_time(ctx, "preparing the workspace")
            ctx.on_event({"phase": "workspace_ready", "repo_commit": progress.repo_commit})
        except (errors.DeadlineExceeded, errors.Cancelled):
            self._collect(ctx, sandbox, progress, redactor)
            raise

    def _collect(self, ctx: TaskContext, sandbox: Sandbox, progress: _Progress,
                 redactor: Redactor) -> None:
        """Bring the attempt's files back before the sandbox is killed; not when the task
        is handed back (the next delivery collects its own)."""
        if ctx.stop.is_set() and not ctx.cancel.is_set():
            return
        workspace = self.workspace
        earlier = [a for a in progress.artifacts if workspace.collects(a.name)]
        workspace.forget(ctx.task_id, earlier)  # an earlier attempt's, replaced by these
        done = workspace.collect(sandbox, ctx.message.task, ctx.task_id, progress.repo_commit)
        progress.artifacts = [a for a in progress.artifacts if a not in earlier]
        progress.artifacts += done.artifacts
        ctx.warnings.extend(redactor.text(w) for w in done.warnings)
        if done.artifacts:
            ctx.on_event({"phase": "artifacts", "count": len(done.artifacts)})

    @staticmethod
    def _agent_started(ctx: TaskContext, progress: _Progress) -> None:
        """Counted and persisted at once: after a crash, the next delivery must know this
        attempt was an agent run (max_attempts), not an infrastructure retry."""
        progress.agent_runs += 1
        if progress.entry is not None:
            progress.entry.agent_ran = True
            ctx.on_attempt(progress.entry)

    @staticmethod
    def _check_time(ctx: TaskContext, phase: str) -> None:
        if time.time() >= ctx.deadline_at:
            raise errors.DeadlineExceeded(f"the task's deadline passed while {phase}")
        reason = ctx.interruption()
        if reason is not None:
            reason.message += f" (while {phase})"
            raise reason

    @staticmethod
    def _agent_events(ctx: TaskContext, redactor: Redactor,
                      progress: _Progress) -> Callable[[AgentEvent], None]:
        def sink(event: AgentEvent) -> None:
            if isinstance(event, ToolCall):
                ctx.on_tool_call(event.name)
                ctx.on_event({"phase": "tool_call", "name": event.name})
            elif isinstance(event, AgentText):
                ctx.on_event({"phase": "agent_text", "text": redactor.text(event.text[:2000])})
            elif isinstance(event, Usage):
                ctx.on_state(cost_usd=round(progress.spent_usd + progress.run.cost_usd, 6))
            elif isinstance(event, OutputRepair):  # typed answers (issue 12)
                ctx.on_event({"phase": "output_repair",
                              "problems": [redactor.text(p) for p in event.problems]})
        return sink

    def _result(self, ctx: TaskContext, progress: _Progress,
                error: errors.SandqueueError | None, redactor: Redactor) -> AgentResult:
        run = progress.run
        status = TaskStatus.SUCCEEDED
        if isinstance(error, errors.DeadlineExceeded):
            status = TaskStatus.TIMED_OUT
        elif isinstance(error, errors.Cancelled):
            status = TaskStatus.CANCELLED
        elif error is not None:
            status = TaskStatus.FAILED
        progress.timings.total_s = time.time() - ctx.started_at
        result = AgentResult(
            task_id=ctx.task_id,
            status=status,
            # An error result may carry no answer: keep the agent's last words.
            result=run.final_text if run.final_text is not None else run.last_text,
            is_error=run.is_error,
            subtype=run.subtype,
            num_turns=run.num_turns,
            total_cost_usd=round(progress.spent_usd, 6) if progress.spent_usd else None,
            usage=run.usage,
            session_id=run.session_id,
            agent_version=run.agent_version,
            timings=progress.timings,
            attempts=progress.attempts,
            agent_runs=progress.agent_runs,
            infra_retries=progress.infra_retries,
            attempt_log=list(ctx.attempt_log),
            sandbox_id=progress.sandbox_id,
            mcp_servers=[McpServerStatus(**s) for s in run.mcp_servers],
            mcp_tools=progress.mcp_tools,
            tool_calls=[ToolCallCount(name=n, count=c)
                        for n, c in run.tool_calls.most_common()],
            error=error.to_error() if error is not None else None,
            simulated=self.provider.simulated,
            labels=ctx.message.task.labels,
            timeout_s_requested=ctx.message.task.timeout_s,
            timeout_s_applied=ctx.timeout_s_applied,
            warnings=list(ctx.warnings),
            artifacts=progress.artifacts,  # workspace out (issue 12)
            repo_commit=progress.repo_commit,
            # -- typed answers and follow-up turns (issue 12)
            output=run.output,
            agent_turns=run.turns,
            parent_id=ctx.message.task.parent_id,
            transcript=progress.transcript,
            agent_cwd=run.cwd,
            # -- end
        )
        return redactor.model(result)
