"""What apps call: submit agent tasks and follow them, without importing worker code or e2b.

    from producer import submit
    handle = submit("Summarise the open issues", mcp={"githubOfficial": {
        "githubPersonalAccessToken": "${GITHUB_TOKEN}"}})
    result = handle.wait(timeout=600)      # AgentResult
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import redis
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeout
from kombu.exceptions import OperationalError
from pydantic import ValidationError

from producer.outbox import IdempotencyConflict, Outbox
from producer.taskinfo import TaskInfo
from sandqueue import batchdone, errors, keys, signing, tracing
from sandqueue.artifacts import (
    ArtifactDamaged,
    ArtifactError,
    ArtifactNotFound,
    ArtifactStore,
    LocalStore,
    check_name,
    make_store,
    verified,
)
from sandqueue.celeryconf import celery_config
from sandqueue.contract import (
    TASK_NAME,
    AgentResult,
    AgentTask,
    ArtifactRef,
    ParentSession,
    TaskMessage,
    TaskStatus,
    session_store_key,
)
from sandqueue.events import EventLog
from sandqueue.sealing import Sealer, SecretPolicy, is_sealed
from sandqueue.settings import Settings, load_settings, mask_url
from sandqueue.store import TaskStore, as_text

log = logging.getLogger("sandqueue.producer")

STRANDED_AFTER_S = 10.0
"""A task still `submitting` this long after it was recorded lost its producer mid-submit
(publishing takes milliseconds); `wait()` publishes it."""
WORKER_LIMITS_CACHE_S = 30.0
"""How long a producer trusts the limits workers advertised (one Redis read per period)."""


class RedisUnavailable(errors.SandqueueError):
    """Redis could not be reached; nothing was submitted."""


class WaitTimeout(errors.SandqueueError):
    """The task did not finish within the time the caller was willing to wait."""

    def __init__(self, message: str, *, task_id: str | None = None) -> None:
        super().__init__(message)
        self.task_id = task_id
        """The task that keeps running (`--json` errors name it)."""


def _submit_spans(tasks: list[AgentTask], ids: list[str]) -> dict[str, Any]:
    """A root span per task (one trace per task); its context travels in the message."""
    tracer = tracing.tracer()
    return {task_id: tracer.start_span("sandqueue.submit", attributes={
        "sandqueue.task_id": task_id, "sandqueue.tenant": task.labels.get("tenant", "")})
        for task, task_id in zip(tasks, ids, strict=True)}


def _end_spans(spans: dict[str, Any], error: str | None = None) -> None:
    for span in spans.values():
        if error:
            span.set_attribute("sandqueue.error", error)
        span.end()


def _redis_error(e: Exception, settings: Settings) -> RedisUnavailable:
    return RedisUnavailable(
        f"cannot reach Redis at {mask_url(settings.redis_url)} ({type(e).__name__}: {e}); "
        "check REDIS_URL and that Redis is running"
    )


class TaskHandle:
    """A submitted task: ask its status, wait for its result."""

    def __init__(self, client: Client, task_id: str, *, duplicate: bool = False) -> None:
        self.client = client
        self.id = task_id
        self.duplicate = duplicate
        """True when an idempotency key matched an earlier submit: this is that task."""

    def __repr__(self) -> str:
        return f"TaskHandle({self.id!r})"

    def info(self) -> dict[str, str]:
        """The task's record: status, attempt, sandbox id, timestamps (strings)."""
        try:
            return self.client.store.get(self.id)
        except redis.RedisError as e:
            raise _redis_error(e, self.client.settings) from e

    def task_info(self) -> TaskInfo:
        """The task's record, typed (numbers, booleans, UTC datetimes); see `TaskInfo`."""
        record = self.info()
        status = None if record.get("status") else self.status()
        return TaskInfo.from_record(self.id, record, status)

    def status(self) -> TaskStatus:
        record = self.info()
        if record.get("status"):
            return TaskStatus(record["status"])
        # The record expired before the result: the result says how the task ended.
        result = self.result()
        return result.status if result is not None else TaskStatus.UNKNOWN

    def result(self) -> AgentResult | None:
        """The result if the task has finished, else None. Never blocks."""
        try:
            self.client.redis.ping()
            async_result = self.client.celery.AsyncResult(self.id)
            if not async_result.ready():
                return None
            return _to_result(self.id, async_result.get(timeout=5, propagate=False))
        except (redis.RedisError, OperationalError) as e:
            raise _redis_error(e, self.client.settings) from e

    def cancel(self) -> None:
        """Ask for cancellation: a queued task never starts; a running one stops within
        seconds, its sandbox killed, and ends `cancelled` with its partial output."""
        self.client.cancel_many([self.id])

    def follow_up(self, prompt: str, with_files: bool = False, **fields: Any) -> TaskHandle:
        """A new task that continues this one's agent conversation (`parent_id`), on any
        worker: its session transcript is restored and the agent resumed. Settings are not
        inherited: give the MCP servers, model, etc. the follow-up needs in `fields`.
        Raises InvalidTask when this task cannot be continued (not finished, or its
        transcript is gone)."""
        return self.client.submit(prompt, parent_id=self.id, with_files=with_files, **fields)

    def events(self, timeout: float | None = None) -> Iterator[dict[str, Any]]:
        """The task's progress events in order, live, ending with the `result` event."""
        end = None if timeout is None else time.monotonic() + timeout

        def expired() -> bool:
            if end is not None and time.monotonic() > end:
                return True
            # The stream may have expired or been trimmed while the result is there.
            return self.client.celery.AsyncResult(self.id).ready()

        try:
            yield from self.client.events.follow(self.id, stop=expired)
        except (redis.RedisError, OperationalError) as e:
            raise _redis_error(e, self.client.settings) from e

    # -- artifacts (issue 12) ------------------------------------------------------------
    def artifacts(self) -> list[ArtifactRef]:
        """The files the task brought back, as its result lists them ([] until it ends)."""
        outcome = self.result()
        return list(outcome.artifacts) if outcome is not None else []

    def read_artifact(self, name: str) -> bytes:
        """One artifact's bytes, from the artifact store (SANDQUEUE_ARTIFACT_STORE), checked
        against the sha256 its result lists (ArtifactDamaged when they differ)."""
        ref = next((r for r in self.artifacts() if r.name == name), None)
        if ref is None:
            raise ArtifactNotFound(f"task {self.id} has no artifact {name!r}")
        return b"".join(verified(self.client.artifact_store.open(self.id, name), ref))

    def download_artifacts(self, out_dir: str | os.PathLike[str],
                           names: list[str] | None = None) -> list[Path]:
        """Write the task's artifacts (or those named) under `out_dir`, keeping their
        relative names, each checked against the sha256 its result lists."""
        return download(self.client.artifact_store, self.id, self.artifacts(), Path(out_dir),
                        names)
    # -- end of artifacts

    def wait(self, timeout: float | None = None, poll_s: float = 0.5) -> AgentResult:
        """Block until the task ends; raise WaitTimeout after `timeout` seconds. A task whose
        producer died between recording and publishing it is published first: nobody
        waits on a task that nobody would run."""
        self.client.republish_stranded([self.id], older_than_s=STRANDED_AFTER_S)
        async_result = None
        try:
            self.client.redis.ping()  # fail fast and clearly, not after the backend's retries
            async_result = self.client.celery.AsyncResult(self.id)
            value = async_result.get(timeout=timeout, interval=poll_s, propagate=False)
        except RuntimeError as e:
            # Celery's result consumer gives up reconnecting with a bare RuntimeError.
            if isinstance(e.__cause__, redis.RedisError | OperationalError):
                raise _redis_error(e.__cause__, self.client.settings) from e
            raise
        except CeleryTimeout as e:
            _release(async_result)
            raise WaitTimeout(
                f"task {self.id} did not finish within {timeout:g}s; it keeps running, "
                f"follow it with `sandqueue status {self.id}`", task_id=self.id
            ) from e
        except (redis.RedisError, OperationalError) as e:
            raise _redis_error(e, self.client.settings) from e
        _release(async_result)
        return _to_result(self.id, value)


def download(store: ArtifactStore, task_id: str, refs: list[ArtifactRef], out_dir: Path,
             names: list[str] | None = None) -> list[Path]:
    """Copy artifacts out of the store into `out_dir`; a corrupted copy is an error, not a
    file someone trusts later."""
    wanted = [r for r in refs if names is None or r.name in names]
    missing = sorted(set(names or []) - {r.name for r in refs})
    if missing:
        raise ArtifactNotFound(f"task {task_id} has no artifact {', '.join(missing)}")
    written, damaged = [], []
    for ref in wanted:
        target = out_dir / check_name(ref.name)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            with target.open("wb") as dst:
                for chunk in verified(store.open(task_id, ref.name), ref):
                    dst.write(chunk)
        except ArtifactDamaged as e:
            target.unlink()
            damaged.append(e.message)
            continue  # the intact ones are still brought back
        written.append(target)
    if damaged:
        raise ArtifactDamaged("; ".join(damaged) + f" ({len(written)} other artifact(s) "
                              f"downloaded to {out_dir})")
    return written


def _release(async_result: Any) -> None:
    """Stop listening for this result now. Left to `AsyncResult.__del__`, the unsubscribe
    runs at interpreter exit (the timeout's traceback keeps the object alive), when redis-py
    can no longer reconnect, and Python prints an ignored-exception traceback."""
    if async_result is None:
        return
    with contextlib.suppress(Exception):  # best effort: the caller already has its answer
        async_result.backend.remove_pending_result(async_result)


def _to_result(task_id: str, value: Any) -> AgentResult:
    if isinstance(value, dict):
        return AgentResult.model_validate(value)
    # Not one of ours (e.g. an exception Celery stored): report it as data, not a pickle.
    return AgentResult(
        task_id=task_id,
        status=TaskStatus.FAILED,
        error={"category": "internal", "message": f"worker stored {value!r}", "retryable": False},
    )


class Client:
    """Submits tasks and opens handles. Cheap to create; holds one Redis pool."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.settings = settings or load_settings()
        self._warned_clear = False

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.settings.redis_url, socket_connect_timeout=5,
                                    socket_timeout=30)

    @cached_property
    def store(self) -> TaskStore:
        return TaskStore(self.redis, self.settings.result_expires_s)

    @cached_property
    def events(self) -> EventLog:
        return EventLog(self.redis, self.settings.events_max_len, self.settings.result_expires_s)

    @cached_property
    def artifact_store(self) -> ArtifactStore:
        return make_store(self.settings)

    @cached_property
    def outbox(self) -> Outbox:
        return Outbox(self.redis, self.settings.result_expires_s)

    @cached_property
    def sealer(self) -> Sealer:
        return Sealer(self.settings.secret_keys)

    @cached_property
    def celery(self) -> Celery:
        app = Celery("sandqueue-producer", set_as_current=False)
        config = celery_config(self.settings)
        # kombu pipelines a publish batch only when redis-py will not retry it on its own
        # (a retried pipeline could publish twice); producers fail fast instead.
        config["broker_transport_options"] = {**config["broker_transport_options"],
                                              "retry_on_timeout": False}
        app.conf.update(config)
        # Producers fail fast and clearly while Redis is down; only workers keep retrying.
        app.conf.update(broker_connection_retry=False, broker_connection_max_retries=0,
                        result_backend_always_retry=False)
        return app

    def build(self, task: AgentTask | str | dict[str, Any], **fields: Any) -> AgentTask:
        """Validate a task given as a model, a prompt string, or a dict (+ keyword fields)."""
        try:
            if isinstance(task, AgentTask):
                return task if not fields else AgentTask.model_validate(
                    {**task.model_dump(), **fields})
            if isinstance(task, str):
                return AgentTask.model_validate({"prompt": task, **fields})
            return AgentTask.model_validate({**task, **fields})
        except ValidationError as e:
            raise errors.InvalidTask(_describe(e)) from e

    def prepare(self, task: AgentTask | str | dict[str, Any], *, queue: str | None = None,
                **fields: Any) -> AgentTask:
        """Validate a task for this deployment and seal its inline secrets."""
        agent_task = self.build(task, **fields)
        self._check_timeout(agent_task, queue)
        policy = SecretPolicy(self.sealer, self.settings.allow_clear_secrets)
        agent_task = agent_task.model_copy(
            update={"mcp": policy.mcp(agent_task.mcp), "envs": policy.envs(agent_task.envs)})
        if policy.sent_in_clear and not self._warned_clear:
            self._warned_clear = True  # once per client, not once per input of a batch
            log.warning("SANDQUEUE_ALLOW_CLEAR_SECRETS is on: %s travel(s) through Redis in "
                        "clear; for development only, set SANDQUEUE_SECRET_KEYS instead",
                        ", ".join(policy.sent_in_clear))
        if agent_task.callback_secret and not is_sealed(agent_task.callback_secret):
            if not self.sealer.enabled:
                raise errors.InvalidTask("callback_secret would travel through Redis in clear;"
                                         " set SANDQUEUE_SECRET_KEYS on producers and workers")
            agent_task = agent_task.model_copy(
                update={"callback_secret": self.sealer.seal(agent_task.callback_secret)})
        return agent_task

    def _check_timeout(self, task: AgentTask, queue: str | None) -> None:
        """Two limits may differ: this producer's SANDQUEUE_MAX_TIMEOUT_S refuses a task
        above it; a worker's clamps the deadline (and says so in the result). When the
        workers of the queue advertise a lower limit, warn now rather than surprise later."""
        if task.timeout_s is None:
            return
        if task.timeout_s > self.settings.max_timeout_s:
            raise errors.InvalidTask(
                f"timeout_s {task.timeout_s:g} is above this producer's maximum "
                f"({self.settings.max_timeout_s:g}s, SANDQUEUE_MAX_TIMEOUT_S where you "
                "submit); lower timeout_s or raise that setting (workers apply their own)"
            )
        queue = queue or self.settings.queue
        limit = self.worker_max_timeout_s(queue)
        if limit is not None and task.timeout_s > limit:
            note = (f"timeout_s {task.timeout_s:g} is above the SANDQUEUE_MAX_TIMEOUT_S of the "
                    f"workers on queue {queue!r} ({limit:g}s): they will run the task with a "
                    f"{limit:g}s deadline (see timeout_s_applied in its result)")
            if note not in self._warned:  # once per client, not once per line of a batch
                self._warned.add(note)
                log.warning(note)

    @cached_property
    def _warned(self) -> set[str]:
        return set()

    @cached_property
    def _limits(self) -> dict[str, tuple[float, float | None]]:
        return {}

    def worker_max_timeout_s(self, queue: str | None = None) -> float | None:
        """The lowest SANDQUEUE_MAX_TIMEOUT_S among the live workers of `queue`, as they
        advertise it in Redis; None when no worker is known. Cached for a few seconds."""
        queue = queue or self.settings.queue
        cached = self._limits.get(queue)
        if cached is not None and cached[0] > time.monotonic():
            return cached[1]
        try:
            raw = self.redis.hgetall(keys.WORKER_LIMITS)
        except redis.RedisError:
            raw = {}  # submitting will say that Redis is unreachable
        now, found = time.time(), []
        for value in raw.values():
            try:
                entry = json.loads(value)
                if float(entry["until"]) >= now and queue in entry["queues"]:
                    found.append(float(entry["max_timeout_s"]))
            except (ValueError, KeyError, TypeError):
                continue
        limit = min(found) if found else None
        self._limits[queue] = (time.monotonic() + WORKER_LIMITS_CACHE_S, limit)
        return limit

    def submit(self, task: AgentTask | str | dict[str, Any], /, *, queue: str | None = None,
               task_id: str | None = None, **fields: Any) -> TaskHandle:
        """Validate and enqueue one task. Raises InvalidTask or RedisUnavailable."""
        agent_task = self.prepare(task, queue=queue, **fields)
        return self.submit_many([agent_task], queue=queue,
                                task_ids=[task_id] if task_id else None)[0]

    def submit_many(self, tasks: list[AgentTask], *, queue: str | None = None,
                    task_ids: list[str] | None = None, chunk: int = 1000) -> list[TaskHandle]:
        """Enqueue prepared tasks in pipelined chunks: a few Redis round trips per chunk
        instead of several per task. Tasks whose idempotency key is already bound come
        back as the earlier task's handle (`duplicate`)."""
        ids = task_ids or [str(uuid.uuid4()) for _ in tasks]
        if len(ids) != len(tasks):
            raise ValueError("task_ids must match tasks one to one")
        handles: list[TaskHandle] = []
        try:
            for start in range(0, len(tasks), chunk):
                handles += self._submit_chunk(tasks[start:start + chunk],
                                              ids[start:start + chunk], queue)
        except (redis.RedisError, OperationalError) as e:
            raise _redis_error(e, self.settings) from e
        return handles

    def _submit_chunk(self, tasks: list[AgentTask], ids: list[str],
                      queue: str | None) -> list[TaskHandle]:
        """Claim + record (one atomic step), publish, confirm: safe against a crash at any
        point (see producer/outbox.py)."""
        now = time.time()
        queue = queue or self.settings.queue
        spans = _submit_spans(tasks, ids) if tracing.enabled() else {}
        entries = [(task_id, task, self._body(task_id, task, now, spans.get(task_id)), queue)
                   for task, task_id in zip(tasks, ids, strict=True)]
        try:
            claims = self.outbox.claim(entries, now)
        except IdempotencyConflict as e:
            _end_spans(spans, "idempotency conflict")
            raise _conflict(e) from e
        to_publish: list[tuple[str, dict[str, Any], str]] = []
        for (task_id, _, body, _), c in zip(entries, claims, strict=True):
            if c.verdict == "new":
                to_publish.append((task_id, body, queue))
            elif c.verdict == "republish" and c.body is not None:
                to_publish.append((c.task_id, c.body, c.queue or queue))
        self._publish(to_publish)
        pipe = self.redis.pipeline(transaction=False)
        self.outbox.confirm([t for t, _, _ in to_publish], pipe)
        submitted: dict[str, int] = {}
        for task, task_id, c in zip(tasks, ids, claims, strict=True):
            if c.verdict == "new":
                self.events.publish(task_id, {"phase": "queued"}, pipe)
                tenant = task.labels.get("tenant") or "_none"
                submitted[tenant] = submitted.get(tenant, 0) + 1
        for tenant, n in submitted.items():  # the fleet's count, for /metrics
            pipe.hincrby(keys.STATS_SUBMITTED, tenant, n)
        pipe.execute()
        _end_spans(spans)
        return [TaskHandle(self, c.task_id, duplicate=c.verdict != "new") for c in claims]

    def _body(self, task_id: str, task: AgentTask, now: float,
              span: Any = None) -> dict[str, Any]:
        trace = tracing.carrier(span) if span is not None else None
        parent = self.parent_session(task)
        if parent is not None and task.with_files and task.repo is not None:
            # the parent's changes apply to the commit it worked on, not to today's HEAD
            task = task.model_copy(update={"repo": task.repo.model_copy(
                update={"ref": parent.repo_commit or task.repo.ref})})
        body = TaskMessage(task=task, submitted_at=now, trace=trace, parent=parent).model_dump(
            mode="json", exclude_defaults=True)
        return signing.sign(self.settings.signing_keys_value, task_id, body)

    # -- follow-up turns (issue 12) ---------------------------------------------------------
    def parent_session(self, task: AgentTask) -> ParentSession | None:
        """The session a follow-up continues, checked now so that a task that cannot be
        continued is the submitter's error, not a worker's failure: the parent has ended,
        saved its transcript whole, and the transcript is still in the artifact store."""
        parent_id = task.parent_id
        if parent_id is None:
            return None
        found = self.get(parent_id).result()
        if found is None:
            status = self.store.get(parent_id).get("status")
            if not status:
                raise errors.InvalidTask(
                    f"parent_id: no task {parent_id} is known (wrong id, or its result expired "
                    "after SANDQUEUE_RESULT_EXPIRES_S)")
            raise errors.InvalidTask(f"parent_id: task {parent_id} has not finished ({status}); "
                                     "continue it once it has ended")
        ref = found.transcript
        if ref is None or found.session_id is None:
            raise errors.InvalidTask(
                f"parent_id: task {parent_id} saved no session transcript (its agent never "
                "ran, or saving failed: see its warnings); it cannot be continued")
        if ref.truncated:
            raise errors.InvalidTask(f"parent_id: task {parent_id}'s session transcript was "
                                     "truncated (SANDQUEUE_ARTIFACT_MAX_FILE_BYTES); it cannot "
                                     "be continued")
        if found.repo_commit and not task.with_files:
            raise errors.InvalidTask(f"parent_id: task {parent_id} worked in a clone of its "
                                     "repository; continue it with with_files (--with-files)")
        self._check_transcript_stored(parent_id, ref.name, ref.sha256)
        session = ParentSession(task_id=parent_id, session_id=found.session_id,
                                transcript=ref.name, sha256=ref.sha256, cwd=found.agent_cwd)
        return self._with_files(task, found, session) if task.with_files else session

    def _with_files(self, task: AgentTask, found: AgentResult,
                    session: ParentSession) -> ParentSession:
        """What of the parent's workspace a `with_files` follow-up gets back: its collected
        files and, on a fresh clone of the same repository at the parent's commit, its diff.
        A truncated artifact would restore a corrupt file: refused, not restored."""
        kept = [a for a in found.artifacts
                if a.name.startswith("files/") or a.name == "repo.diff"]
        cut = [a.name for a in kept if a.truncated]
        if cut:
            raise errors.InvalidTask(f"with_files: task {found.task_id}'s {', '.join(cut[:5])} "
                                     "were truncated (artifact size limits); they cannot be "
                                     "restored")
        if found.repo_commit and task.repo is None:
            raise errors.InvalidTask(
                f"with_files: task {found.task_id} worked in a clone of a repository; give "
                "the same repo (its commit and changes are restored on a fresh clone)")
        return session.model_copy(update={
            "files": [a.name for a in kept if a.name.startswith("files/")],
            "diff": "repo.diff" if any(a.name == "repo.diff" for a in kept) else None,
            "repo_commit": found.repo_commit})

    def _check_transcript_stored(self, parent_id: str, name: str, sha256: str) -> None:
        try:
            store = make_store(self.settings)
            stored = {r.name: r for r in store.list(session_store_key(parent_id))}
        except (ArtifactError, errors.ConfigError) as e:
            raise errors.InvalidTask(
                f"parent_id: cannot look for task {parent_id}'s session transcript ({e}); "
                "producers need the workers' SANDQUEUE_ARTIFACT_* settings") from e
        if name not in stored or stored[name].sha256 != sha256:
            where = (f" {store.root}, or this producer does not see the workers' directory: "
                     "give it the same SANDQUEUE_ARTIFACT_DIR (a shared volume) or use the "
                     "s3 store" if isinstance(store, LocalStore) else "")
            raise errors.InvalidTask(
                f"parent_id: task {parent_id}'s session transcript is gone from the artifact "
                f"store (expired or deleted{where}); it cannot be continued")

    def _publish(self, messages: list[tuple[str, dict[str, Any], str]]) -> None:
        """Publish Celery task messages (task id, body, queue), pipelined. What `send_task`
        does, minus two costs a batch of thousands should not pay per task: a pub/sub
        subscription to each result (`wait()` subscribes when it is called, and reads
        results stored before that) and a repr of every argument for the message headers."""
        if not messages:
            return
        amqp = self.celery.amqp
        routes: dict[str, dict[str, Any]] = {}
        with self.celery.producer_or_acquire() as producer, producer.batch(max_size=2000):
            for task_id, body, queue in messages:
                if queue not in routes:
                    route = amqp.router.route({"queue": queue}, TASK_NAME, (), {}, None)
                    if route.get("queue") is not None:
                        producer.maybe_declare(route["queue"])  # once, not per message
                    routes[queue] = dict(route)
                message = amqp.create_task_message(
                    task_id, TASK_NAME, [body], {}, argsrepr="(agent task)", kwargsrepr="{}")
                amqp.send_task_message(producer, TASK_NAME, message, declare=[], retry=False,
                                       **routes[queue])

    def republish_stranded(self, task_ids: list[str], older_than_s: float = 0.0) -> list[str]:
        """Publish again tasks whose producer recorded them but never confirmed publishing
        (it died in between) at least `older_than_s` ago; returns their ids. Harmless for
        a copy that did go out: the worker drops a second delivery of a task that is
        running or finished."""
        stranded: list[tuple[str, dict[str, Any], str]] = []
        before = time.time() - older_than_s
        try:
            for task_id in task_ids:
                status, body, queue, at = self.redis.hmget(
                    keys.task(task_id), "status", "message", "queue", "submitted_at")
                if (as_text(status) == TaskStatus.SUBMITTING.value and body
                        and float(at or 0) <= before):
                    stranded.append((task_id, json.loads(body),
                                     as_text(queue) or self.settings.queue))
            self._publish(stranded)
            pipe = self.redis.pipeline(transaction=False)
            self.outbox.confirm([t for t, _, _ in stranded], pipe)
            pipe.execute()
        except (redis.RedisError, OperationalError) as e:
            raise _redis_error(e, self.settings) from e
        return [t for t, _, _ in stranded]

    def get(self, task_id: str) -> TaskHandle:
        return TaskHandle(self, task_id)

    def cancel_many(self, task_ids: list[str]) -> int:
        """Cancel many tasks in one round trip; returns how many were cancelled or asked
        to stop (tasks that had already ended or are unknown are not counted)."""
        outcomes = self.cancel_outcomes(task_ids)
        return sum(1 for o, _ in outcomes.values() if o in ("cancelled", "requested"))

    def cancel_outcomes(self, task_ids: list[str]) -> dict[str, tuple[str, str | None]]:
        """Task id -> (outcome, status it had ended with). Outcomes: `cancelled` (no worker
        held it: it is final now and never starts), `requested` (its worker stops it
        within seconds), `ended` (it had already finished), `unknown` (no such task)."""
        if not task_ids:
            return {}
        try:
            outcomes = self.outbox.cancel(task_ids, time.time())
            ended_now = [t for t, (o, _) in outcomes.items() if o == "cancelled"]
            for task_id in ended_now:
                self._store_cancelled(task_id)
            self._batch_tasks_ended(ended_now)
        except (redis.RedisError, OperationalError) as e:
            raise _redis_error(e, self.settings) from e
        return outcomes

    def _batch_tasks_ended(self, task_ids: list[str]) -> None:
        """Tasks ended here, by no worker: a batch they complete gets its webhook."""
        if not task_ids:
            return
        pipe = self.redis.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.hget(keys.task(task_id), "batch")
        for task_id, batch_id in zip(task_ids, pipe.execute(), strict=True):
            if batch_id:
                batchdone.task_ended(self.redis, as_text(batch_id), task_id,
                                     self.settings.result_expires_s)

    def _store_cancelled(self, task_id: str) -> None:
        """The result of a task cancelled before any worker took it, so `wait()` returns.
        (Should this producer die first, the worker that receives it stores the same.)"""
        result = AgentResult(
            task_id=task_id, status=TaskStatus.CANCELLED,
            error=errors.Cancelled("the task was cancelled before it started").to_error())
        pipe = self.redis.pipeline(transaction=False)
        self.events.publish(task_id, {"phase": "result", "status": "cancelled",
                                      "error": "cancelled"}, pipe)
        pipe.execute()
        self.celery.backend.store_result(task_id, result.model_dump(mode="json"), "SUCCESS")


def _conflict(e: IdempotencyConflict) -> errors.InvalidTask:
    shown = "; ".join(f"{key!r} is task {task_id}" for key, task_id in
                      list(e.conflicts.items())[:5])
    return errors.InvalidTask(
        f"idempotency key already used for a different task ({shown}); nothing was "
        "submitted. Use a new key for a new task, or submit exactly the same task to get "
        "the existing one back")


def _describe(e: ValidationError) -> str:
    return "invalid task: " + errors.describe(e)


_default: Client | None = None


def default_client() -> Client:
    global _default
    if _default is None:
        _default = Client()
    return _default


def submit(task: AgentTask | str | dict[str, Any], /, **kwargs: Any) -> TaskHandle:
    """Submit with the default client (settings from the environment and `.env`)."""
    return default_client().submit(task, **kwargs)


def get_task(task_id: str) -> TaskHandle:
    return default_client().get(task_id)
