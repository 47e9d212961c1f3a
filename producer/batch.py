"""Batches: one prompt against thousands of inputs, with progress, budgets and resume.

A batch reads JSONL (one task per line: AgentTask fields plus an optional `id`) or CSV
(columns fill `--prompt-template`), validates every line before anything is submitted, then
submits in pipelined chunks and follows the tasks, appending each result to the output file
as it completes. Every input gets a stable key (its `id`, else its line number) and every
submission an idempotency key derived from the batch id and that key, so running the same
command again after Ctrl-C or a crash submits nothing twice: it skips what is done, follows
what is in flight, and re-runs failures only when asked (`retry_failed`).

Redis: `sq:batch:<id>` (hash: meta, status), `sq:batch:<id>:keys` (list, input order),
`sq:batch:<id>:items` (hash: input key -> current task id).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import statistics
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from producer.batch_csv import CsvResults, shared_schema
from producer.outbox import fingerprint
from sandqueue import batchdone, callbacks, errors, keys
from sandqueue.contract import FINAL_STATUSES, AgentResult, AgentTask, TaskStatus
from sandqueue.store import as_text

_MERGED = ("mcp", "envs", "labels")
_FAILURES = (TaskStatus.FAILED.value, TaskStatus.TIMED_OUT.value)
"""What `--max-failures` counts: tasks that failed, not those the batch itself cancelled."""
_TASK_FIELDS = frozenset({*AgentTask.model_fields, "id"})
"""What a JSONL line may set besides template variables (`id` keys the input)."""
_WAITING = frozenset({TaskStatus.QUEUED.value, "submitting"})
"""Open statuses that mean "not started yet" (`submitting`: key claimed, not yet sent)."""


def batch_key(batch_id: str, suffix: str = "") -> str:
    return keys.batch(batch_id, suffix)


@dataclass(frozen=True)
class BatchInput:
    key: str
    line: int
    task: AgentTask


@dataclass
class BadLine:
    line: int
    message: str


class BatchInvalid(errors.InvalidTask):
    """Some lines are invalid; nothing was submitted."""

    def __init__(self, bad: list[BadLine]) -> None:
        self.bad = bad
        shown = "\n".join(f"  line {b.line}: {b.message}" for b in bad[:50])
        more = f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else ""
        super().__init__(f"{len(bad)} invalid line(s), nothing submitted:\n{shown}{more}")


def _merge(defaults: dict[str, Any], row: dict[str, Any]) -> dict[str, Any]:
    merged = {**defaults, **row}
    for name in _MERGED:
        if isinstance(defaults.get(name), dict) and isinstance(row.get(name), dict):
            merged[name] = {**defaults[name], **row[name]}
    merged.update(_merge_repo(defaults.get("repo"), row.get("repo")))
    return merged


def _merge_repo(default: Any, line: Any) -> dict[str, Any]:
    """Issue 12: `batch run --repo-token` gives each line's own repo (`"repo": URL` or an
    object, or a CSV `repo` column) its token; a line without a repo gets none."""
    if not isinstance(default, dict) or "url" in default:
        return {}
    if line is None:
        return {"repo": None}
    if isinstance(line, str):
        line = {"url": line}
    return {"repo": {**default, **line}} if isinstance(line, dict) else {}


def _csv_rows(text: str, template: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(first line of the record, fields) per CSV record.

    A quoted field may span lines, and `reader.line_num` is then the record's last line, so
    the number reported is where the record starts: one past where the previous one ended.
    A row whose field count differs from the header's is an error, not a guess: a short row
    would put the text `None` in the prompt, a long one would silently drop fields."""
    reader = csv.reader(io.StringIO(text))
    header = next(reader, None)
    if header is None:
        return
    columns = ", ".join(header)
    while True:
        start = reader.line_num + 1
        try:
            values = next(reader, None)
        except csv.Error as e:
            yield start, {"__error__": f"cannot read CSV ({e}); check the quoting"}
            return
        if values is None:
            return
        if not values:  # a blank line
            continue
        if len(values) != len(header):
            yield start, {"__error__": f"{len(values)} field(s) but the header has "
                                       f"{len(header)} ({columns}); quote a field that "
                                       f"holds a comma, e.g. \"a, b\""}
            continue
        row = dict(zip(header, values, strict=True))
        try:
            prompt = template.format_map(row)
        except KeyError as e:
            yield start, {"__error__": f"--prompt-template uses column {e} which the CSV "
                                       f"has not (columns: {columns})"}
            continue
        fields: dict[str, Any] = {"prompt": prompt}
        if row.get("id"):
            fields["id"] = row["id"]
        if row.get("repo"):  # issue 12: one task per repository (`repo`, `ref` columns)
            fields["repo"] = {"url": row["repo"], **({"ref": row["ref"]} if row.get("ref")
                                                     else {})}
        yield start, fields


def _rows(text: str, fmt: str, template: str | None) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, task fields) per input; a line it cannot read carries `__error__`."""
    if fmt == "csv":
        if not template:
            raise errors.InvalidTask("a CSV batch needs --prompt-template, e.g. "
                                     "'Triage issue {number}: {title}'")
        yield from _csv_rows(text, template)
        return
    for number, raw in enumerate(text.splitlines(), start=1):
        if not raw.strip():
            continue
        try:
            value = json.loads(raw)
        except ValueError as e:
            yield number, {"__error__": f"not JSON ({e.msg} at column {e.colno})"}
            continue
        if not isinstance(value, dict):
            yield number, {"__error__": "each line must be a JSON object with a prompt"}
            continue
        if template and "prompt" not in value:
            try:
                value["prompt"] = template.format_map(value)
            except KeyError as e:
                yield number, {"__error__": f"--prompt-template uses field {e}, not on this line"}
                continue
        if template:
            # With a template, fields that are not task fields are its variables (as a CSV's
            # columns are): they fill the prompt and are not part of the task.
            value = {k: v for k, v in value.items() if k in _TASK_FIELDS}
        yield number, value


def load_inputs(path: Path, *, prepare: Callable[[dict[str, Any]], AgentTask],
                defaults: dict[str, Any], template: str | None = None) -> list[BatchInput]:
    """Read and validate every line; raise BatchInvalid listing all bad lines."""
    try:
        # utf-8-sig: Excel and some editors start the file with a BOM, which would otherwise
        # become part of the first column's name (a CSV's `id`) or break the first JSON line.
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise errors.InvalidTask(f"cannot read {path}: {e.strerror}") from e
    except UnicodeDecodeError as e:
        raise errors.InvalidTask(f"{path} is not UTF-8 text ({e.reason})") from e
    fmt = "csv" if path.suffix.lower() == ".csv" else "jsonl"
    return parse_inputs(text, fmt, prepare=prepare, defaults=defaults, template=template,
                        source=str(path))


def parse_inputs(text: str, fmt: str, *, prepare: Callable[[dict[str, Any]], AgentTask],
                 defaults: dict[str, Any], template: str | None = None,
                 source: str = "the input") -> list[BatchInput]:
    """`load_inputs` for text already read (the HTTP API's batch bodies)."""
    inputs: list[BatchInput] = []
    bad: list[BadLine] = []
    seen: dict[str, int] = {}
    for line, row in _rows(text, fmt, template):
        if "__error__" in row:
            bad.append(BadLine(line, row["__error__"]))
            continue
        key = str(row.pop("id", f"line-{line}"))
        if key in seen:
            bad.append(BadLine(line, f"id {key!r} already used on line {seen[key]}"))
            continue
        seen[key] = line
        try:
            inputs.append(BatchInput(key, line, prepare(_merge(defaults, row))))
        except errors.InvalidTask as e:
            bad.append(BadLine(line, e.message.removeprefix("invalid task: ")))
    if bad:
        raise BatchInvalid(bad)
    if not inputs:
        raise errors.InvalidTask(f"{source} holds no tasks")
    return inputs


def sealed_callback(client: Any, url: str, secret: str | None = None) -> tuple[str, str]:
    """(URL, sealed secret) of a batch's completion webhook from the CLI or Python API, or
    InvalidTask saying what to change. The secret defaults to SANDQUEUE_WEBHOOK_SECRET."""
    why = callbacks.refusal(url, allow_private=client.settings.webhook_allow_private)
    if why:
        raise errors.InvalidTask(why)
    if secret is None and client.settings.webhook_secret is not None:
        secret = client.settings.webhook_secret.get_secret_value()
    if not secret or len(secret) < 16:
        raise errors.InvalidTask("a batch callback needs a signing secret of 16+ characters: "
                                 "set SANDQUEUE_WEBHOOK_SECRET (e.g. `openssl rand -hex 32`)")
    if not client.sealer.enabled:
        raise errors.InvalidTask("the callback secret would travel through Redis in clear; "
                                 "set SANDQUEUE_SECRET_KEYS (`sandqueue keygen` makes one)")
    return url, client.sealer.seal(secret)


def derive_batch_id(path: Path, defaults: dict[str, Any], template: str | None) -> str:
    """The same file with the same options is the same batch (so re-running resumes it)."""
    digest = hashlib.sha256(path.read_bytes())
    digest.update(json.dumps([defaults, template], sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


@dataclass
class Progress:
    total: int
    done: int = 0
    failed: int = 0
    running: int = 0
    queued: int = 0
    unknown: int = 0
    """Followed tasks with no record: not queued, not running (shown on their own)."""
    baseline: int = 0
    """Inputs that had finished before this run: the rate counts only this run's work."""
    cost_usd: float = 0.0
    started: float = field(default_factory=time.monotonic)
    by_status: Counter[str] = field(default_factory=Counter)
    by_error: Counter[str] = field(default_factory=Counter)
    durations: list[float] = field(default_factory=list)
    stopped: str | None = None

    @property
    def finished(self) -> int:
        return sum(self.by_status.values())

    @property
    def failures(self) -> int:
        return sum(self.by_status[s] for s in _FAILURES)

    def rate(self, now: float) -> float:
        """Inputs finished per second by this run (a resume does not count earlier work)."""
        return max(0, self.finished - self.baseline) / max(1e-6, now - self.started)

    def summary(self, batch_id: str, out: Path | None) -> dict[str, Any]:
        durations = sorted(self.durations)

        def pct(p: float) -> float | None:
            if not durations:
                return None
            return round(durations[min(len(durations) - 1, int(p * len(durations)))], 3)

        return {
            "batch_id": batch_id,
            "total": self.total,
            "by_status": dict(self.by_status),
            "by_error": dict(self.by_error),
            "cost_usd": round(self.cost_usd, 6),
            "duration_p50_s": round(statistics.median(durations), 3) if durations else None,
            "duration_p95_s": pct(0.95),
            "elapsed_s": round(time.monotonic() - self.started, 3),
            "unsubmitted": max(0, self.total - self.finished - self.running - self.queued
                               - self.unknown),
            "stopped": self.stopped,
            "out": str(out) if out else None,
        }


class Batch:
    """A batch's state in Redis, usable from any machine: submit, follow, cancel, read."""

    def __init__(self, client: Any, batch_id: str) -> None:
        from producer.api import Client

        self.client: Client = client
        self.id = batch_id
        self.r = client.redis
        self.ttl_s = client.settings.result_expires_s

    # -- records ---------------------------------------------------------------------------
    def exists(self) -> bool:
        return bool(self.r.exists(batch_key(self.id)))

    def meta(self) -> dict[str, str]:
        return {as_text(k): as_text(v) for k, v in self.r.hgetall(batch_key(self.id)).items()}

    def input_keys(self) -> list[str]:
        return [as_text(k) for k in self.r.lrange(batch_key(self.id, "keys"), 0, -1)]

    def items(self) -> dict[str, str]:
        """Input key -> the task id currently answering for it."""
        raw = self.r.hgetall(batch_key(self.id, "items"))
        return {as_text(k): as_text(v) for k, v in raw.items()}

    def register(self, inputs: list[BatchInput], source: str) -> bool:
        """Record the batch once (its inputs' order); True when it is new."""
        now = time.time()
        new = bool(self.r.hsetnx(batch_key(self.id), "created_at", now))
        pipe = self.r.pipeline(transaction=False)
        if new:  # the dashboard's list of batches
            pipe.zadd(keys.BATCHES, {self.id: now})
            pipe.zremrangebyscore(keys.BATCHES, "-inf", now - self.ttl_s)
            pipe.expire(keys.BATCHES, self.ttl_s)
        pipe.hset(batch_key(self.id), mapping={"total": len(inputs), "source": source,
                                               "status": "running"})
        if new:
            for start in range(0, len(inputs), 5000):
                pipe.rpush(batch_key(self.id, "keys"), *[i.key for i in inputs[start:start + 5000]])
        for suffix in ("", "keys", "items", "gen"):
            pipe.expire(batch_key(self.id, suffix), self.ttl_s)
        pipe.execute()
        return new

    def set_callback(self, url: str, sealed_secret: str, out: Path | None = None) -> None:
        """POST the batch's summary to `url` once its last task has ended (`batchdone`):
        from now on its submitted tasks are tracked. The URL must be checked already."""
        pipe = self.r.pipeline(transaction=False)
        pipe.hset(batch_key(self.id), mapping={"callback_url": url,
                                               "callback_secret": sealed_secret,
                                               **({"out": str(out)} if out else {})})
        pipe.expire(batch_key(self.id), self.ttl_s)
        pipe.execute()
        # Tasks of an earlier run that are still open count too.
        batchdone.track(self.r, self.id, list(self.items().values()), self.ttl_s)

    def seal(self) -> str | None:
        """Nothing more will be submitted by this run: the completion webhook goes out when
        the open tasks have ended (now, if they have). Returns its delivery id if now."""
        return batchdone.seal(self.r, self.id, self.ttl_s)

    def set_status(self, status: str, reason: str | None = None) -> None:
        self.r.hset(batch_key(self.id), mapping={"status": status, "reason": reason or ""})

    # -- submitting ------------------------------------------------------------------------
    def submit(self, inputs: list[BatchInput], *, queue: str | None = None,
               chunk: int = 1000, stop: Callable[[], bool] | None = None) -> dict[str, str]:
        """Submit inputs in pipelined chunks; returns {task id: input key} submitted."""
        gens = {as_text(k): int(v) for k, v in self.r.hgetall(batch_key(self.id, "gen")).items()}
        submitted: dict[str, str] = {}
        for start in range(0, len(inputs), chunk):
            if stop is not None and stop():
                break
            part = inputs[start:start + chunk]
            tasks = [i.task.model_copy(update={"idempotency_key": self._idem(i.key,
                                                                             gens.get(i.key, 0)),
                                               "labels": {**i.task.labels, "batch": self.id}})
                     for i in part]
            handles = self.client.submit_many(tasks, queue=queue)
            pipe = self.r.pipeline(transaction=False)
            pipe.hset(batch_key(self.id, "items"),
                      mapping={i.key: h.id for i, h in zip(part, handles, strict=True)})
            pipe.expire(batch_key(self.id, "items"), self.ttl_s)
            batchdone.track(self.r, self.id, [h.id for h in handles], self.ttl_s, client=pipe)
            pipe.execute()
            submitted.update({h.id: i.key for i, h in zip(part, handles, strict=True)})
        return submitted

    def next_generation(self, input_key: str) -> None:
        """A failed input is run again under a new idempotency key (`--retry-failed`)."""
        self.r.hincrby(batch_key(self.id, "gen"), input_key, 1)
        self.r.hdel(batch_key(self.id, "items"), input_key)

    def _idem(self, input_key: str, gen: int) -> str:
        digest = hashlib.sha256(input_key.encode()).hexdigest()[:24]
        return f"batch:{self.id}:{digest}:{gen}"

    # -- following -------------------------------------------------------------------------
    def states(self, task_ids: list[str]) -> dict[str, tuple[str, float]]:
        """Task id -> (status, cost so far), in pipelined chunks."""
        out: dict[str, tuple[str, float]] = {}
        for start in range(0, len(task_ids), 2000):
            part = task_ids[start:start + 2000]
            pipe = self.r.pipeline(transaction=False)
            for task_id in part:
                pipe.hmget(keys.task(task_id), "status", "cost_usd")
            for task_id, (status, cost) in zip(part, pipe.execute(), strict=True):
                out[task_id] = (as_text(status) if status else TaskStatus.UNKNOWN.value,
                                float(cost) if cost else 0.0)
        return out

    def results(self, task_ids: list[str]) -> dict[str, AgentResult]:
        """Stored results of finished tasks (those without one yet are left out)."""
        backend = self.client.celery.backend
        found: dict[str, AgentResult] = {}
        for start in range(0, len(task_ids), 1000):
            part = task_ids[start:start + 1000]
            raw = self.r.mget([backend.get_key_for_task(t) for t in part])
            for task_id, value in zip(part, raw, strict=True):
                if value is None:
                    continue
                meta = json.loads(value)
                if isinstance(meta.get("result"), dict):
                    found[task_id] = AgentResult.model_validate(meta["result"])
        return found

    def cancel(self, reason: str = "cancelled") -> int:
        """Cancel every task of the batch that has not finished; returns how many."""
        self.set_status("cancelled" if reason == "cancelled" else "stopped", reason)
        ids = list(self.items().values())
        states = self.states(ids)
        final = {s.value for s in FINAL_STATUSES}
        open_ids = [t for t in ids if states[t][0] not in final]
        cancelled = self.client.cancel_many(open_ids)
        self.seal()  # a cancelled batch submits no more: it completes when its tasks end
        return cancelled

    def counts(self) -> dict[str, Any]:
        ids = list(self.items().values())
        states = self.states(ids)
        by_status = Counter(s for s, _ in states.values())
        total = int(self.meta().get("total") or len(ids))
        by_status["unsubmitted"] = max(0, total - len(ids))
        return {"batch_id": self.id, **self.meta(), "by_status": dict(by_status),
                "cost_usd": round(sum(c for _, c in states.values()), 6)}


@dataclass
class ResumePlan:
    """What a run found of an earlier run of the same batch (all counts are inputs)."""

    finished: int = 0
    """Finished before this run: skipped (their results are kept)."""
    in_flight: int = 0
    """Submitted earlier and not finished: followed, not submitted again."""
    not_retried: int = 0
    """Finished failed, timed_out or cancelled and kept so: `--retry-failed` runs them."""
    retried: int = 0
    """Finished failed, timed_out or cancelled and submitted again (`--retry-failed`)."""
    to_submit: int = 0


class BatchRunner:
    """Runs one batch to completion from this process: resume, submit, follow, write.

    `on_progress` is called after every poll with the `Progress`; the results file gets
    one JSON line per input (`id`, `line`, then the AgentResult fields), appended as each
    task completes, so a crash loses nothing that finished.
    """

    def __init__(self, batch: Batch, inputs: list[BatchInput], *, out: Path | None,
                 queue: str | None = None, max_cost_usd: float | None = None,
                 max_failures: int | None = None, retry_failed: bool = False,
                 poll_s: float = 0.5, on_progress: Callable[[Progress], None] | None = None,
                 ) -> None:
        self.batch = batch
        self.inputs = inputs
        self.by_key = {i.key: i for i in inputs}
        self.out = out
        self.queue = queue
        self.max_cost_usd = max_cost_usd
        self.max_failures = max_failures
        self.retry_failed = retry_failed
        self.poll_s = poll_s
        self.on_progress = on_progress or (lambda _: None)
        self.on_resume: Callable[[ResumePlan], None] = lambda _: None
        """Called once, before submitting, when the batch had been run before."""
        self.progress = Progress(total=len(inputs))
        self.plan = ResumePlan()
        self._finished_cost = 0.0
        self._running_cost: dict[str, float] = {}
        self._failures_at_stop: int | None = None
        self._cancelled_by_stop = 0
        self.csv: CsvResults | None = None
        """`--out FILE.csv`: rows with the output_schema's columns (producer/batch_csv.py)."""
        if out is not None and out.suffix.lower() == ".csv":
            self.csv = CsvResults(out, shared_schema([i.task for i in inputs], out))

    def run(self, source: str) -> Progress:
        new = self.batch.register(self.inputs, source)
        if self.max_cost_usd is not None:  # shown by the dashboard as the batch's budget
            self.batch.r.hset(batch_key(self.batch.id), "max_cost_usd", self.max_cost_usd)
        written = self._read_out()
        pending = self._resume(written)
        # An interrupted run may have recorded tasks it never published: publish them now,
        # or this run would follow them forever.
        self.batch.client.republish_stranded(list(pending))
        followed = set(pending.values())
        todo = [i for i in self.inputs if i.key not in written and i.key not in followed]
        self.plan.to_submit = len(todo)
        self.progress.baseline = self.plan.finished
        if not new:
            self.on_resume(self.plan)
        pending.update(self.batch.submit(todo, queue=self.queue, stop=self._should_stop))
        self.batch.seal()
        if self._over_budget():
            self._stop(pending)
        self._follow(pending)
        self.batch.seal()  # a task whose end went unreported (its worker died) ends here
        if self.progress.stopped is None and self.batch.meta().get("status") == "running":
            self.batch.set_status("done")
        elif self._failures_at_stop is not None or self._cancelled_by_stop:
            self.progress.stopped = self._stop_message()
            self.batch.set_status("stopped", self.progress.stopped)
        return self.progress

    def _should_stop(self) -> bool:
        """Between submission chunks: a budget ran out, or the batch was cancelled."""
        if self.batch.meta().get("status") == "cancelled":
            self.progress.stopped = self.progress.stopped or "the batch was cancelled"
            return True
        return self._over_budget()

    # -- resume ----------------------------------------------------------------------------
    def _read_out(self) -> dict[str, dict[str, Any]]:
        """Lines already in the results file, by input key (the last line of a key wins)."""
        lines: dict[str, dict[str, Any]] = {}
        if self.csv is not None:
            return {line["id"]: line for line in self.csv.read() if line["id"] in self.by_key}
        if self.out is None or not self.out.exists():
            return lines
        for raw in self.out.read_text(encoding="utf-8").splitlines():
            try:
                value = json.loads(raw)
            except ValueError:
                continue  # a line cut short by a crash: the task is followed again
            if isinstance(value, dict) and str(value.get("id")) in self.by_key:
                lines[str(value["id"])] = value
        return lines

    def _resume(self, written: dict[str, dict[str, Any]]) -> dict[str, str]:
        """Plan from what Redis and the file say; returns in-flight {task id: key}."""
        items = self.batch.items()
        states = self.batch.states(list(items.values()))
        retry = {TaskStatus.FAILED.value, TaskStatus.TIMED_OUT.value, TaskStatus.CANCELLED.value}
        final = {s.value for s in FINAL_STATUSES}
        pending: dict[str, str] = {}
        plan = self.plan
        for key, task_id in items.items():
            status = states[task_id][0]
            ended = written[key].get("status") if key in written else status
            if ended in retry and self.retry_failed:
                self.batch.next_generation(key)
                written.pop(key, None)
                plan.retried += 1
                continue
            plan.not_retried += ended in retry
            if key in written or status in final:
                plan.finished += 1
            else:
                plan.in_flight += 1
            if key not in written:  # in flight, or finished after the last run stopped
                pending[task_id] = key
        self._rewrite(written)
        for line in written.values():
            self._count(line.get("status", "unknown"), line)
        return pending

    def _rewrite(self, written: dict[str, dict[str, Any]]) -> None:
        if self.csv is not None:
            self.csv.rewrite([written[i.key] for i in self.inputs if i.key in written])
            return
        if self.out is None:
            return
        tmp = self.out.with_name(self.out.name + ".tmp")
        with tmp.open("w", encoding="utf-8") as f:
            for item in self.inputs:
                if item.key in written:
                    f.write(json.dumps(written[item.key], ensure_ascii=False) + "\n")
        tmp.replace(self.out)

    # -- follow ----------------------------------------------------------------------------
    def _follow(self, pending: dict[str, str]) -> None:
        out = (self.out.open("a", encoding="utf-8")
               if self.out is not None and self.csv is None else None)
        try:
            while pending:
                states = self.batch.states(list(pending))
                final_ids = [t for t, (s, _) in states.items()
                             if s in {f.value for f in FINAL_STATUSES}]
                for task_id, result in self.batch.results(final_ids).items():
                    key = pending.pop(task_id)
                    self._running_cost.pop(task_id, None)
                    line = {"id": key, "line": self.by_key[key].line,
                            **result.model_dump(mode="json")}
                    if out is not None:
                        out.write(json.dumps(line, ensure_ascii=False) + "\n")
                        out.flush()
                    if self.csv is not None:
                        self.csv.append(line)
                    self._count(result.status.value, line)
                self._tally_open(states, pending)
                if self.progress.stopped is None and self._over_budget():
                    self._stop(pending)
                self.on_progress(self.progress)
                if pending:
                    time.sleep(self.poll_s)
        finally:
            if out is not None:
                out.close()

    def _tally_open(self, states: dict[str, tuple[str, float]], pending: dict[str, str]) -> None:
        running = queued = unknown = 0
        for task_id in pending:
            status, cost = states.get(task_id, (TaskStatus.QUEUED.value, 0.0))
            self._running_cost[task_id] = cost
            if status in _WAITING:
                queued += 1
            elif status == TaskStatus.UNKNOWN.value:  # no record: nobody says it is queued
                unknown += 1
            else:  # running, retrying, or final with its result about to be stored
                running += 1
        p = self.progress
        p.running, p.queued, p.unknown = running, queued, unknown
        self.progress.cost_usd = self._finished_cost + sum(self._running_cost.values())

    def _count(self, status: str, line: dict[str, Any]) -> None:
        p = self.progress
        p.by_status[status] += 1
        if status == TaskStatus.SUCCEEDED.value:
            p.done += 1
        else:
            p.failed += 1
            error = line.get("error") or {}
            p.by_error[str(error.get("category", status))] += 1
        self._finished_cost += float(line.get("total_cost_usd") or 0.0)
        p.cost_usd = self._finished_cost + sum(self._running_cost.values())
        total_s = (line.get("timings") or {}).get("total_s")
        if isinstance(total_s, int | float):
            p.durations.append(float(total_s))

    # -- budgets ---------------------------------------------------------------------------
    def _over_budget(self) -> bool:
        p = self.progress
        if self.max_cost_usd is not None and p.cost_usd >= self.max_cost_usd:
            p.stopped = p.stopped or (f"cost ${p.cost_usd:.4f} reached --max-cost "
                                      f"${self.max_cost_usd:g}")
            return True
        if self.max_failures is not None and p.failures > self.max_failures:
            if p.stopped is None:
                self._failures_at_stop = p.failures
                p.stopped = f"{p.failures} failures exceeded --max-failures {self.max_failures}"
            return True
        return False

    def _stop(self, pending: dict[str, str]) -> None:
        """Stop submitting and cancel what is still queued; running tasks finish."""
        states = self.batch.states(list(pending))
        queued = [t for t, (s, _) in states.items() if s in _WAITING]
        self._cancelled_by_stop += self.batch.client.cancel_many(queued)
        self.batch.set_status("stopped", self.progress.stopped)

    def _stop_message(self) -> str:
        """Why the batch stopped, with the final counts: tasks already running when a budget
        tripped finish, and may fail too, so the count at the trip is not the end of it."""
        p = self.progress
        message = p.stopped or ""
        if self._failures_at_stop is not None:
            kinds = ", ".join(f"{s} {p.by_status[s]}" for s in _FAILURES if p.by_status[s])
            late = p.failures - self._failures_at_stop
            message = (f"--max-failures {self.max_failures} exceeded: {p.failures} task(s) "
                       f"failed ({kinds}), {self._failures_at_stop} when the budget tripped"
                       f" and {late} more that were already running")
        if self._cancelled_by_stop:
            message += f"; {self._cancelled_by_stop} queued task(s) cancelled"
        return message


class BatchHandle:
    """A submitted batch, for apps: progress counts, results as they complete, cancel."""

    def __init__(self, batch: Batch, submitted: dict[str, str]) -> None:
        self.batch = batch
        self.id = batch.id
        self._pending = dict(submitted)

    def progress(self) -> dict[str, Any]:
        return self.batch.counts()

    def results(self, poll_s: float = 0.5,
                timeout: float | None = None) -> Iterator[tuple[str, AgentResult]]:
        """(input key, result) pairs in completion order, until every task has finished."""
        end = None if timeout is None else time.monotonic() + timeout
        final = {s.value for s in FINAL_STATUSES}
        while self._pending:
            states = self.batch.states(list(self._pending))
            done = [t for t, (s, _) in states.items() if s in final]
            for task_id, result in self.batch.results(done).items():
                yield self._pending.pop(task_id), result
            if end is not None and time.monotonic() > end:
                return
            if self._pending:
                time.sleep(poll_s)

    def cancel(self) -> int:
        return self.batch.cancel()


def submit_batch(tasks: list[AgentTask | dict[str, Any] | str], *, batch_id: str | None = None,
                 client: Any = None, queue: str | None = None, callback_url: str | None = None,
                 callback_secret: str | None = None) -> BatchHandle:
    """Validate every task (raising BatchInvalid with all bad ones), then submit them all in
    pipelined chunks. Task keys are list positions ("0", "1", ...) unless a dict has "id".
    Submitting the same batch id again submits nothing twice. With `callback_url`, the
    batch's summary is POSTed there once its last task has ended, signed with
    `callback_secret` (default: SANDQUEUE_WEBHOOK_SECRET)."""
    from producer.api import default_client

    client = client or default_client()
    hook = sealed_callback(client, callback_url, callback_secret) if callback_url else None
    inputs: list[BatchInput] = []
    bad: list[BadLine] = []
    for n, task in enumerate(tasks):
        raw = dict(task) if isinstance(task, dict) else task
        key = str(raw.pop("id", n)) if isinstance(raw, dict) else str(n)
        try:
            inputs.append(BatchInput(key, n, client.prepare(raw)))
        except errors.InvalidTask as e:
            bad.append(BadLine(n, e.message.removeprefix("invalid task: ")))
    if bad:
        raise BatchInvalid(bad)
    # Fingerprints, not the tasks: sealed values differ on every run (fresh IVs), and the
    # same inputs must be the same batch so that a re-run resumes it.
    batch = Batch(client, batch_id or hashlib.sha256(
        json.dumps([[i.key, fingerprint(i.task)] for i in inputs]).encode()
    ).hexdigest()[:16])
    batch.register(inputs, "api")
    if hook is not None:
        batch.set_callback(*hook)
    known = batch.items()
    client.republish_stranded(list(known.values()))
    submitted = {task_id: key for key, task_id in known.items()}
    submitted.update(batch.submit([i for i in inputs if i.key not in known], queue=queue))
    batch.seal()
    return BatchHandle(batch, submitted)
