"""Kill sandboxes that no running task owns: they cost money while alive.

Every sandbox carries its task id, attempt and deadline in its metadata. A live sandbox is
killed when its task has finished, when a later attempt superseded it, when its deadline
(plus grace) has passed, or when no worker holds its task's lease any more (the worker
died). Run periodically by workers and on demand by `sandqueue reap [--dry-run]`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from datetime import datetime

from sandqueue.contract import FINAL_STATUSES, TaskStatus
from sandqueue.settings import Settings
from sandqueue.store import TaskStore
from worker.sandbox.base import (
    META_ATTEMPT,
    META_DEADLINE,
    META_TASK_ID,
    LiveSandbox,
    SandboxProvider,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Verdict:
    sandbox_id: str
    task_id: str | None
    reason: str | None
    """Why it should die; None when it is in use."""
    killed: bool = False

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def judge(sandbox: LiveSandbox, store: TaskStore, settings: Settings,
          now: float | None = None) -> str | None:
    """Why this sandbox should be killed, or None while a running task owns it."""
    now = time.time() if now is None else now
    meta = sandbox.metadata
    task_id = meta.get(META_TASK_ID)
    if not task_id:
        return None  # not ours to judge (created by sandqueue but without a task id)
    deadline = float(meta.get(META_DEADLINE) or 0)
    if deadline and now > deadline + settings.sandbox_grace_s:
        return "past its task's deadline"
    record = store.get(task_id)
    if not record:
        return "its task is unknown (expired or never submitted)"
    if record.get("status") in {s.value for s in FINAL_STATUSES}:
        return f"its task has finished ({record['status']})"
    attempt = int(meta.get(META_ATTEMPT) or 0)
    if attempt and int(record.get("attempt") or 0) > attempt:
        return f"attempt {attempt} was superseded by attempt {record['attempt']}"
    started = sandbox.started_at.timestamp() if isinstance(sandbox.started_at, datetime) else 0
    young = now - started < 2 * settings.lease_ttl_s
    if not young and record.get("status") != TaskStatus.QUEUED.value \
            and not store.has_live_lease(task_id):
        return "no worker holds its task's lease (the worker died)"
    if not young and record.get("status") == TaskStatus.QUEUED.value:
        return "its task went back to the queue"
    return None


def reap(provider: SandboxProvider, store: TaskStore, settings: Settings, *,
         dry_run: bool = False) -> list[Verdict]:
    verdicts: list[Verdict] = []
    for sandbox in provider.list_live():
        reason = judge(sandbox, store, settings)
        killed = False
        if reason is not None and not dry_run:
            try:
                killed = provider.kill(sandbox.sandbox_id)
                log.warning("reaped sandbox %s: %s", sandbox.sandbox_id, reason)
            except Exception as e:
                log.error("could not reap sandbox %s: %s", sandbox.sandbox_id, e)
            if killed:
                _note(store, sandbox)
        verdicts.append(Verdict(sandbox.sandbox_id, sandbox.metadata.get(META_TASK_ID),
                                reason, killed))
    return verdicts


def _note(store: TaskStore, sandbox: LiveSandbox) -> None:
    """Tell the task's attempt log that this attempt's sandbox is gone (its worker died,
    so nobody else can)."""
    task_id = sandbox.metadata.get(META_TASK_ID)
    attempt = sandbox.metadata.get(META_ATTEMPT)
    if task_id and attempt and attempt.isdigit():
        try:
            store.note_reaped(task_id, int(attempt), sandbox.sandbox_id)
        except Exception as e:  # bookkeeping; the kill itself succeeded
            log.warning("could not note the reaping of %s on task %s: %s",
                        sandbox.sandbox_id, task_id, e)
