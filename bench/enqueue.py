"""3. Batch enqueue: time to put 10,000 tasks on the queue, by each way a producer can.

Measured in the same run, one after the other, against the same Redis with no worker
consuming (only enqueueing is timed), each after a short warm-up (connections, queue
declaration) and with the same tasks:

* `apply_async loop`: the baseline, Celery's `signature(...).apply_async` once per task
  with the wire message built inline (no validation, no task record).
* `Client.submit loop`: sandqueue's producer API, one task at a time (validation, task
  record and `queued` event, then the Celery publish).
* `Client.submit_many` / `Client.submit_batch`: pipelined publishing, measured when the
  producer API has it (the slot is reported as missing otherwise); timed with
  `Client.prepare` (validation) of each task included, as an app pays for it.
* `producer.batch.submit_batch`: the batch API (validation of all, idempotency keys, batch
  records, then `submit_many` in chunks).
* `sandqueue batch run`: the CLI, run as a subprocess on a JSONL file, timed from the
  command's start (interpreter start-up included, and reported apart) until every message
  is on the queue.
* References (not product paths) that show what pipelining buys and what blocks it:
  the apply_async loop inside kombu's `Producer.batch()` with sandqueue's broker options
  (kombu refuses to pipeline while `retry_on_timeout` is on, so nothing changes), the same
  with `retry_on_timeout` off for the producer, and a bench-only prototype of `submit_many`
  doing the producer API's work (validate, task record, `queued` event) with both the
  records and the publishes pipelined.

Target (for the batch paths): under 3 s for 10,000 tasks and at least 4x faster than the
apply_async loop. Also reported: Redis commands and bytes per enqueued task, and a cProfile
of the `Client.submit` loop (where a producer's time goes).
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from celery import Celery

from bench import harness
from bench.harness import PY, Bench, agent_task, celery_client
from bench.profiling import cprofile
from sandqueue.contract import TASK_NAME, AgentTask, TaskMessage

TARGET_S = 3.0
TARGET_SPEEDUP = 4.0
WARMUP = 20


def _measure(b: Bench, name: str, queue: str, n: int,
             fn: Callable[[Sequence[dict[str, Any]]], object], rounds: int) -> dict[str, Any]:
    """Time fn(tasks) for n fresh tasks, best of `rounds`; check n messages landed on `queue`.

    Best of: enqueueing is pure producer work, so the fastest round is the one the shared
    machine disturbed least; every round's time is kept in the results.
    """
    fn([agent_task(i, tag="warmup") for i in range(WARMUP)])
    times: list[float] = []
    traffic: dict[str, Any] = {}
    landed = 0
    for _ in range(rounds):
        tasks = [agent_task(i, tag="enqueue") for i in range(n)]
        b.redis.r.delete(queue)
        gc.collect()
        b.redis.reset_stats()
        s0 = b.redis.snapshot()
        t0 = time.perf_counter()
        fn(tasks)
        times.append(time.perf_counter() - t0)
        s1 = b.redis.snapshot()
        landed = int(b.redis.r.llen(queue))
        traffic = harness.BenchRedis.diff(s0, s1).per_task(n)
        if landed != n:
            raise harness.BenchError(f"{name}: {landed} of {n} messages on the queue")
    best = min(times)
    return {"method": name, "tasks": n, "seconds": round(best, 3),
            "rounds_s": [round(t, 3) for t in times], "tasks_per_s": round(n / best),
            "enqueued": landed,
            "redis": {k: traffic[k] for k in ("commands", "requests", "bytes_in",
                                              "bytes_out", "redis_cpu_ms", "by_command")}}


def _cli_startup_s(env: dict[str, str], cwd: str) -> float:
    """Wall time of `python -m producer.cli --version`: the CLI's fixed start-up cost."""
    t0 = time.perf_counter()
    subprocess.run([PY, "-m", "producer.cli", "--version"], env=env, cwd=cwd,
                   capture_output=True, timeout=120, check=False)
    return time.perf_counter() - t0


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    """Ctrl-C first (the batch runner follows its tasks forever without a worker)."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


def _batch_cli(b: Bench, queue: str, n: int, rounds: int) -> dict[str, Any]:
    """`sandqueue batch run FILE`: from starting the command to n messages on the queue.

    The command then follows its tasks until they finish; with no worker running it would
    wait forever, so it is stopped (Ctrl-C) once every message is on the queue.
    """
    from producer.cli import cli

    group = getattr(cli, "commands", {}).get("batch")
    if group is None or "run" not in getattr(group, "commands", {}):
        return {"method": "sandqueue batch run", "missing": "the CLI has no `batch run` yet"}
    env = harness.worker_env(b.redis.url, queue)
    times: list[float] = []
    landed = 0
    with tempfile.TemporaryDirectory(prefix="sandqueue-bench-") as tmp:
        startup = _cli_startup_s(env, tmp)
        for r in range(rounds):
            path = Path(tmp) / f"tasks-{r}.jsonl"  # a new file: a new batch id, no resume
            path.write_text("".join(json.dumps({**agent_task(i, tag=f"cli{r}"), "id": i}) + "\n"
                                    for i in range(n)))
            b.redis.r.delete(queue)
            argv = [PY, "-m", "producer.cli", "batch", "run", str(path), "--no-progress",
                    "--queue", queue]
            t0 = time.perf_counter()
            with open(Path(tmp) / "cli.log", "wb") as log:
                proc = subprocess.Popen(argv, env=env, cwd=tmp, stdout=log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
            try:
                deadline = t0 + 300
                while time.perf_counter() < deadline and proc.poll() is None:
                    landed = int(b.redis.r.llen(queue))
                    if landed >= n:
                        break
                    time.sleep(0.02)
                elapsed = time.perf_counter() - t0
            finally:
                _stop_process(proc)
            if landed < n:
                tail = (Path(tmp) / "cli.log").read_text(errors="replace")[-800:]
                return {"method": "sandqueue batch run", "missing":
                        f"only {landed} of {n} messages on the queue: {tail}"}
            times.append(elapsed)
    best = min(times)
    return {"method": "sandqueue batch run", "tasks": n,
            "command": "python -m producer.cli batch run tasks.jsonl --no-progress",
            "seconds": round(best, 3), "rounds_s": [round(t, 3) for t in times],
            "cli_startup_s": round(startup, 3), "tasks_per_s": round(n / best),
            "enqueued": landed}


def _producer_app(b: Bench, queue: str, *, retry_on_timeout: bool) -> Celery:
    """sandqueue's producer Celery config, optionally without the broker's retry_on_timeout."""
    app = celery_client(b.redis.url, queue)
    if not retry_on_timeout:
        opts = dict(app.conf.broker_transport_options)
        opts.pop("retry_on_timeout", None)
        app.conf.broker_transport_options = opts
    b._clients.append(app)
    return app


def _batched_apply(app: Celery, queue: str) -> Callable[[Sequence[dict[str, Any]]], None]:
    sig = app.signature(TASK_NAME)

    def go(tasks: Sequence[dict[str, Any]]) -> None:
        with app.producer_or_acquire() as producer, producer.batch(max_size=1000):
            for t in tasks:
                sig.apply_async(args=[{"v": 1, "task": t, "submitted_at": time.time()}],
                                queue=queue, producer=producer)

    return go


def _prototype_submit_many(b: Bench, queue: str) -> Callable[[Sequence[dict[str, Any]]], None]:
    """What a pipelined `Client.submit_many` could do (bench prototype, not product code).

    Same work per task as `Client.submit` without idempotency keys or MCP sealing: validate,
    record `queued` with its event, publish. Records go in one Redis pipeline per chunk,
    publishes in kombu's `Producer.batch()` (another pipeline), with the producer's broker
    transport not retrying on timeout (else kombu will not pipeline).
    """
    client = b.sandqueue_client(queue)
    app = _producer_app(b, queue, retry_on_timeout=False)

    def go(tasks: Sequence[dict[str, Any]], chunk: int = 500) -> None:
        for start in range(0, len(tasks), chunk):
            part = tasks[start:start + chunk]
            now = time.time()
            messages = [(str(uuid.uuid4()), TaskMessage(task=AgentTask.model_validate(t),
                                                        submitted_at=now)) for t in part]
            pipe = client.redis.pipeline(transaction=False)
            for task_id, m in messages:
                client.store.mark_queued(task_id, m.submitted_at, pipe)
                client.events.publish(task_id, {"phase": "queued"}, pipe=pipe)
            pipe.execute()
            with app.producer_or_acquire() as producer, producer.batch(max_size=chunk):
                for task_id, m in messages:
                    app.send_task(TASK_NAME, args=[m.model_dump(mode="json",
                                                                exclude_defaults=True)],
                                  task_id=task_id, queue=queue, producer=producer)

    return go


def _prototype_lean(b: Bench, queue: str) -> Callable[[Sequence[dict[str, Any]]], None]:
    """`_prototype_submit_many` with a leaner publish (bench prototype, not product code).

    Per message it skips what `send_task` does that a batch does not need: the `saferepr`
    of the arguments for the `argsrepr` header (a fixed short string instead; this also
    keeps prompts out of worker logs and Flower), the queue declaration (once per chunk
    instead of per message), the result-channel SUBSCRIBE/UNSUBSCRIBE pair (`on_task_call`
    and `AsyncResult.__del__`; waiting subscribes on demand and reads the stored result)
    and kombu's per-message retry wrapper (the batch flush is the only I/O).
    """
    client = b.sandqueue_client(queue)
    app = _producer_app(b, queue, retry_on_timeout=False)
    amqp = app.amqp

    def go(tasks: Sequence[dict[str, Any]], chunk: int = 1000) -> None:
        for start in range(0, len(tasks), chunk):
            part = tasks[start:start + chunk]
            now = time.time()
            messages = [(str(uuid.uuid4()), TaskMessage(task=AgentTask.model_validate(t),
                                                        submitted_at=now)) for t in part]
            pipe = client.redis.pipeline(transaction=False)
            for task_id, m in messages:
                client.store.mark_queued(task_id, m.submitted_at, pipe)
                client.events.publish(task_id, {"phase": "queued"}, pipe=pipe)
            pipe.execute()
            with app.producer_or_acquire() as producer:
                producer.maybe_declare(amqp.queues[queue])
                with producer.batch(max_size=chunk):
                    for task_id, m in messages:
                        message = amqp.create_task_message(
                            task_id, TASK_NAME,
                            args=[m.model_dump(mode="json", exclude_defaults=True)],
                            kwargs={}, argsrepr="(<AgentTask>,)", kwargsrepr="{}",
                            reply_to=app.thread_oid)
                        amqp.send_task_message(producer, TASK_NAME, message, queue=queue,
                                               declare=[], retry=False)

    return go


def _product_methods(b: Bench, queue: str, n: int, rounds: int
                     ) -> tuple[list[dict[str, Any]], dict[str, Callable[..., None]]]:
    """The baseline loop and each producer path that exists today; also returns the
    callables so the section can profile them."""
    app = b.control(queue)
    client = b.sandqueue_client(queue)
    sig = app.signature(TASK_NAME)

    def apply_loop(tasks: Sequence[dict[str, Any]]) -> None:
        for t in tasks:
            sig.apply_async(args=[{"v": 1, "task": t, "submitted_at": time.time()}],
                            queue=queue)

    def submit_loop(tasks: Sequence[dict[str, Any]]) -> None:
        for t in tasks:
            client.submit(t, queue=queue)

    paths: dict[str, Callable[..., None]] = {"Client.submit loop": submit_loop}
    methods = [_measure(b, "apply_async loop (baseline)", queue, n, apply_loop, rounds),
               _measure(b, "Client.submit loop", queue, n, submit_loop, rounds)]
    for attr in ("submit_many", "submit_batch"):
        batch_fn = getattr(client, attr, None)
        if batch_fn is None:
            if attr == "submit_many":
                methods.append({"method": f"Client.{attr}", "missing": "not in producer/api.py"})
            continue

        def pipelined(tasks: Sequence[dict[str, Any]], f: Any = batch_fn) -> None:
            # It takes prepared tasks: preparing (validation) is part of the cost.
            prepare = getattr(client, "prepare", None)
            f([prepare(t) for t in tasks] if prepare else list(tasks))

        paths[f"Client.{attr}"] = pipelined
        methods.append(_measure(b, f"Client.{attr}", queue, n, pipelined, rounds))
    from producer import batch as batch_mod

    api_batch = getattr(batch_mod, "submit_batch", None)
    if api_batch is not None:
        def submit_batch(tasks: Sequence[dict[str, Any]], f: Any = api_batch) -> None:
            # A new batch id each call: the same id again would (rightly) submit nothing.
            f(list(tasks), client=client, queue=queue, batch_id=uuid.uuid4().hex)

        paths["producer.batch.submit_batch"] = submit_batch
        methods.append(_measure(b, "producer.batch.submit_batch", queue, n, submit_batch,
                                rounds))
    else:
        methods.append({"method": "producer.batch.submit_batch", "missing": "not there yet"})
    methods.append(_batch_cli(b, queue, n, rounds))
    return methods, paths


def _reference_methods(b: Bench, queue: str, n: int, rounds: int) -> list[dict[str, Any]]:
    methods = []
    for label, fn in (
        ("ref: apply_async in Producer.batch(), sandqueue broker options",
         _batched_apply(_producer_app(b, queue, retry_on_timeout=True), queue)),
        ("ref: apply_async in Producer.batch(), retry_on_timeout off",
         _batched_apply(_producer_app(b, queue, retry_on_timeout=False), queue)),
        ("ref: prototype submit_many (validate + record + event, pipelined)",
         _prototype_submit_many(b, queue)),
        ("ref: same, lean publish (no argsrepr/declare/subscribe per task)",
         _prototype_lean(b, queue)),
    ):
        try:
            entry = _measure(b, label, queue, n, fn, rounds)
        except Exception as e:  # a reference must not sink the section
            entry = {"method": label, "missing": f"{type(e).__name__}: {e}"}
        entry["reference"] = True
        methods.append(entry)
    return methods


def run(sizes: Any) -> dict[str, Any]:
    n = sizes.enqueue_tasks
    with Bench() as b:
        queue = f"bench.enqueue.{uuid.uuid4().hex[:6]}"
        methods, paths = _product_methods(b, queue, n, sizes.enqueue_rounds)
        if sizes.enqueue_references:
            methods += _reference_methods(b, queue, n, sizes.enqueue_rounds)
        profiles = {}
        for name, fn in paths.items():
            b.redis.r.delete(queue)
            tasks = [agent_task(i) for i in range(sizes.producer_profile_tasks)]
            profiles[name] = {"tasks": len(tasks), **cprofile(lambda f=fn, t=tasks: f(t))}
        b.redis.r.delete(queue)
    baseline = methods[0]["seconds"]
    for m in methods:
        if "seconds" in m:
            m["speedup_vs_loop"] = round(baseline / m["seconds"], 2)
            if m is not methods[0] and not m.get("reference"):
                m["met"] = m["seconds"] < TARGET_S * n / 10_000 and m["speedup_vs_loop"] >= (
                    TARGET_SPEEDUP)
    return {"tasks": n, "methods": methods, "target": (
        f"< {TARGET_S:g} s per 10,000 and >= {TARGET_SPEEDUP:g}x the apply_async loop"),
        "producer_profiles": profiles}
