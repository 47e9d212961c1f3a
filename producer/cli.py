"""The `sandqueue` command.

Exit codes a script can rely on:
    0    success (the task succeeded, or the command did what it was asked)
    1    the task ended failed, timed_out or cancelled (`batch status`: some inputs are in
         an unknown state)
    2    usage, configuration or invalid task; an empty, malformed or unknown task id
    3    Redis (or E2B, for `check`) could not be reached
    4    the task has not finished (yet) within the time given
    5    `cancel`: nothing to cancel, the task had already ended
    130  interrupted (Ctrl-C); `batch run` prints the command that resumes it
Every option that has an environment variable says so in `--help`.

With `--json`, errors are JSON too: one object on stdout, `{"error": CODE, "category":
usage|unreachable|pending|interrupted, "message": ...}` (plus `id` where there is a task id),
with the exit code above; the message also goes to stderr, as without `--json`. CODE is
short and stable, e.g. `usage_error`, `invalid_task`, `invalid_task_id`, `unknown_task`,
`unknown_batch`, `config_error`, `redis_unavailable`, `wait_timeout`, `not_finished`,
`interrupted` (`batch run` adds `batch_id` and `resume`).
"""

from __future__ import annotations

import base64
import json
import os
import shlex
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
import redis

from producer import render
from producer.api import Client, RedisUnavailable, WaitTimeout
from sandqueue import catalog, errors
from sandqueue.artifacts import ArtifactDamaged, ArtifactError, ArtifactNotFound
from sandqueue.contract import AgentResult, TaskStatus
from sandqueue.settings import load_settings

if TYPE_CHECKING:
    from producer.batch import ResumePlan

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_PENDING = 0, 1, 2, 3, 4
# `cancel` of a task that had already ended: not 0 (the cancel changed nothing, a script that
# cancels to stop spending should know), not 1 (that means "the task failed", and it may have
# succeeded), not 2 (the request was valid). A code of its own, documented above.
EXIT_ALREADY_ENDED = 5
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C

_CATEGORY = {EXIT_USAGE: "usage", EXIT_UNREACHABLE: "unreachable", EXIT_PENDING: "pending",
             EXIT_INTERRUPTED: "interrupted"}
MAX_TASK_ID = 255

F = TypeVar("F", bound=Callable[..., Any])


class CliError(errors.SandqueueError):
    """An error a command reports and exits with: as a line on stderr, or with --json as one
    JSON object on stdout (see the module docstring)."""

    def __init__(self, message: str, *, code: str, exit_code: int = EXIT_USAGE,
                 task_id: str | None = None, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.exit_code = exit_code
        self.task_id = task_id
        self.extra = extra or {}


def _exit_for(result: AgentResult) -> int:
    return EXIT_OK if result.status is TaskStatus.SUCCEEDED else EXIT_FAILED


def _as_cli_error(e: errors.SandqueueError) -> CliError | None:
    """The error tree's exit codes; None for errors a command does not expect."""
    if isinstance(e, CliError):
        return e
    if isinstance(e, RedisUnavailable):
        return CliError(e.message, code="redis_unavailable", exit_code=EXIT_UNREACHABLE)
    if isinstance(e, WaitTimeout):
        return CliError(e.message, code="wait_timeout", exit_code=EXIT_PENDING,
                        task_id=e.task_id)
    if isinstance(e, errors.ConfigError):
        return CliError(e.message, code="config_error")
    if isinstance(e, ArtifactNotFound):
        return CliError(e.message, code="unknown_artifact")
    if isinstance(e, ArtifactDamaged):  # not mended by a retry, unlike an unreachable store
        return CliError(e.message, code="artifact_damaged")
    if isinstance(e, ArtifactError):
        return CliError(e.message, code="artifact_store_error", exit_code=EXIT_UNREACHABLE)
    if isinstance(e, errors.InvalidTask):
        bad = getattr(e, "bad", None)  # a batch file's invalid lines, for machines too
        return CliError(e.message, code="invalid_task", extra={"lines": [
            {"line": b.line, "message": b.message} for b in bad]} if bad else None)
    return None


def fail(e: CliError, as_json: bool) -> None:
    """Report `e` and exit with its code: the message on stderr for people (also with
    --json, as before), and with --json the error object on stdout for scripts."""
    style = "yellow" if e.exit_code == EXIT_PENDING else "red"
    prefix = "" if e.exit_code == EXIT_PENDING else f"[{style}]error:[/] "
    # soft_wrap: a command to copy (the resume hint) must stay on one line
    render.err.print(f"{prefix}[{style}]{render.escape(e.message)}[/]", soft_wrap=True)
    if as_json:
        render.print_json({"error": e.code, "category": _CATEGORY.get(e.exit_code, "failed"),
                           "message": e.message,
                           **({"id": e.task_id} if e.task_id is not None else {}), **e.extra})
    sys.exit(e.exit_code)


def handle_errors(fn: F) -> F:
    """Map the error tree to exit codes with a one-line message on stderr, or with the
    command's `--json` a JSON error object on stdout."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = bool(kwargs.get("as_json"))
        try:
            return fn(*args, **kwargs)
        except KeyboardInterrupt:  # click would say "Aborted!" and exit 1, "the task failed"
            fail(CliError("interrupted", code="interrupted", exit_code=EXIT_INTERRUPTED),
                 as_json)
        except redis.RedisError as e:  # batch commands read Redis directly
            fail(CliError(f"cannot reach Redis ({type(e).__name__}: {e}); check REDIS_URL "
                          "and that Redis is running", code="redis_unavailable",
                          exit_code=EXIT_UNREACHABLE), as_json)
        except errors.SandqueueError as e:
            cli_error = _as_cli_error(e)
            if cli_error is None:
                raise
            fail(cli_error, as_json)

    return wrapper  # type: ignore[return-value]


def check_task_id(task_id: str) -> str:
    """Refuse ids no task can have before asking Redis (Celery raises on an empty one)."""
    if not task_id.strip():
        raise CliError("the task id is empty: give the id that `sandqueue submit` printed",
                       code="invalid_task_id", task_id=task_id)
    if len(task_id) > MAX_TASK_ID or any(c.isspace() or not c.isprintable() for c in task_id):
        raise CliError(f"{task_id[:80]!r} is not a task id: ids have no spaces or control "
                       "characters; give the id that `sandqueue submit` printed",
                       code="invalid_task_id", task_id=task_id)
    return task_id


def unknown_task(task_id: str) -> CliError:
    return CliError(f"no task {task_id} is known (wrong id, or its record expired after "
                    "SANDQUEUE_RESULT_EXPIRES_S)", code="unknown_task", task_id=task_id)


def _client(ctx: click.Context) -> Client:
    obj = ctx.ensure_object(dict)
    if "client" not in obj:
        overrides = {k: v for k, v in obj.get("overrides", {}).items() if v is not None}
        obj["client"] = Client(load_settings(**overrides))
    return obj["client"]


class JsonErrorsGroup(click.Group):
    """With `--json`, the usage errors click finds itself (a missing argument, a bad option
    value, an unknown command) are a JSON error object on stdout too, exit 2."""

    wants_json = False

    def main(self, args: Sequence[str] | None = None, **kwargs: Any) -> Any:
        self.wants_json = "--json" in (sys.argv[1:] if args is None else list(args))
        return super().main(args, **kwargs)

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.UsageError as e:
            if not self.wants_json:
                raise
            fail(CliError(e.format_message(), code="usage_error"), as_json=True)


@click.group(cls=JsonErrorsGroup,
             context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--redis-url", envvar="REDIS_URL", show_envvar=True, default=None,
              help="Redis for broker and results.")
@click.version_option(package_name="sandqueue")
@click.pass_context
def cli(ctx: click.Context, redis_url: str | None) -> None:
    """Run AI agent tasks in fresh E2B sandboxes, at scale, through Redis and Celery."""
    ctx.ensure_object(dict)["overrides"] = {"redis_url": redis_url}


# -- submit -------------------------------------------------------------------------------

def read_prompt(prompt: str | None) -> str:
    if prompt is None or prompt == "-":
        if prompt is None and sys.stdin.isatty():
            raise errors.InvalidTask("give a prompt: inline, @file, or - to read stdin")
        return sys.stdin.read()
    if prompt.startswith("@"):
        path = Path(prompt[1:])
        try:
            return path.read_bytes().decode("utf-8")  # byte-exact: no newline translation
        except OSError as e:
            raise errors.InvalidTask(f"cannot read prompt file {path}: {e.strerror}") from e
        except UnicodeDecodeError as e:
            raise errors.InvalidTask(f"prompt file {path} is not UTF-8 text ({e.reason})") from e
    return prompt


def _coerce(server: str, key: str, value: str) -> Any:
    if value.startswith("${"):
        return value
    spec = catalog.catalog()["servers"].get(server, {})
    kind = spec.get("types", {}).get(key, "str")
    try:
        if kind == "int":
            return int(value)
        if kind == "float":
            return float(value)
    except ValueError as e:
        raise errors.InvalidTask(f"--mcp-config {server}.{key}: {value!r} is not a number") from e
    if kind == "bool":
        if value.lower() not in {"true", "false", "1", "0", "yes", "no"}:
            raise errors.InvalidTask(f"--mcp-config {server}.{key}: expected true or false")
        return value.lower() in {"true", "1", "yes"}
    if kind == "list":
        return [v.strip() for v in value.split(",") if v.strip()]
    return value


def parse_mcp(names: tuple[str, ...], settings: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """`--mcp notion --mcp-config notion.internalIntegrationToken=${NOTION_TOKEN}`."""
    mcp: dict[str, dict[str, Any]] = {name: {} for name in names}
    for item in settings:
        left, sep, value = item.partition("=")
        if not sep or "." not in left:
            raise errors.InvalidTask(
                f"--mcp-config {item!r}: write NAME.key=value, e.g. "
                "githubOfficial.githubPersonalAccessToken=${GITHUB_TOKEN}"
            )
        if ".envs." in left:  # github/<owner>/<repo>.envs.VAR=value
            server, _, var = left.partition(".envs.")
            mcp.setdefault(server, {}).setdefault("envs", {})[var] = value
            continue
        server, key = left.rsplit(".", 1)
        mcp.setdefault(server, {})[key] = _coerce(server, key, value)
    return mcp


def read_output_schema(value: str | None) -> Any:
    """`--output-schema`: a JSON Schema as a FILE (e.g. schema.json) or inline JSON text."""
    if value is None:
        return None
    text = value
    if not value.lstrip().startswith("{"):
        try:
            text = Path(value).read_bytes().decode("utf-8-sig")
        except OSError as e:
            raise errors.InvalidTask(f"--output-schema {value}: cannot read the file "
                                     f"({e.strerror}); give a JSON Schema file or inline "
                                     "JSON") from e
        except UnicodeDecodeError as e:
            raise errors.InvalidTask(f"--output-schema {value} is not UTF-8 text") from e
    try:
        schema = json.loads(text)
    except ValueError as e:
        raise errors.InvalidTask(f"--output-schema is not JSON ({e}); give a JSON Schema "
                                 "file or inline JSON") from e
    return schema  # the contract says what is wrong with it, if anything


def parse_pairs(items: tuple[str, ...], flag: str) -> dict[str, str]:
    pairs: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise errors.InvalidTask(f"{flag} {item!r}: write KEY=VALUE")
        pairs[key] = value
    return pairs


@cli.command()
@click.argument("prompt", required=False)
@click.option("--mcp", "mcp_names", multiple=True, metavar="NAME",
              help="MCP catalog server the agent may use (repeatable).")
@click.option("--mcp-config", "mcp_settings", multiple=True, metavar="NAME.KEY=VALUE",
              help="Server setting; VALUE may be ${ENV} resolved on the worker (repeatable).")
@click.option("--model", help="Claude model, e.g. claude-sonnet-4-5.")
@click.option("--max-turns", type=click.IntRange(1), help="Stop the agent after N turns.")
@click.option("--allowed-tool", "allowed_tools", multiple=True, help="Tool the agent may use.")
@click.option("--disallowed-tool", "disallowed_tools", multiple=True, help="Tool it may not use.")
@click.option("--append-system-prompt", help="Text appended to Claude Code's system prompt.")
@click.option("--output-schema", "output_schema", metavar="FILE|JSON",
              help="JSON Schema the final answer must satisfy (the result's `output`).")
@click.option("--continue", "parent_id", metavar="TASK_ID",
              help="Continue that task's agent conversation (a follow-up turn).")
@click.option("--with-files", is_flag=True, default=None,
              help="With --continue: restore the parent's repository and collected files.")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1),
              help="Whole-task deadline in seconds (all attempts).")
@click.option("--template", help="E2B template (default: mcp-gateway).")
@click.option("--env", "envs", multiple=True, metavar="KEY=VALUE",
              help="Environment variable for the sandbox (repeatable); VALUE may be ${ENV} "
                   "resolved on the worker. Credential-looking values need SANDQUEUE_SECRET_KEYS.")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE",
              help="Label carried to the result and the sandbox metadata (repeatable).")
@click.option("--idempotency-key", help="Submitting twice with one key runs the task once.")
@click.option("--max-attempts", type=click.IntRange(1, 20), help="Attempts for transient errors.")
@click.option("--retry-after-side-effects", is_flag=True, default=None,
              help="Retry even after the agent made tool calls (effects may repeat).")
@click.option("--queue", envvar="SANDQUEUE_QUEUE", show_envvar=True, help="Queue to send to.")
# -- workspace in and out (issue 12)
@click.option("--repo", "repo_url", metavar="URL", help="Git repository cloned into the sandbox; "
              "the agent works in it and its diff comes back as the repo.diff artifact.")
@click.option("--ref", "repo_ref", help="With --repo: branch, tag or full commit id.")
@click.option("--repo-depth", type=click.IntRange(0), default=None,
              help="With --repo: commits of history to fetch (default 1; 0 = all).")
@click.option("--repo-token", metavar="${NAME}", help="With --repo: a ${NAME} reference to a "
              "worker environment variable holding an HTTPS token for a private repository.")
@click.option("--file", "input_files", multiple=True, metavar="LOCAL[:REMOTE]",
              help="A small local file written into the agent's working directory.")
@click.option("--collect", multiple=True, metavar="GLOB",
              help="Files (glob, relative to the working directory) brought back as artifacts.")
# -- end of workspace in and out
@click.option("--wait", is_flag=True, help="Block until the task ends and print its result.")
@click.option("--wait-timeout", type=float, default=None, help="With --wait: give up after N s.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@handle_errors
def submit(ctx: click.Context, prompt: str | None, mcp_names: tuple[str, ...],
           mcp_settings: tuple[str, ...], envs: tuple[str, ...], labels: tuple[str, ...],
           max_attempts: int | None, retry_after_side_effects: bool | None, queue: str | None,
           wait: bool, wait_timeout: float | None, as_json: bool, **fields: Any) -> None:
    """Submit an agent task. PROMPT is text, @FILE, or - (stdin; also when omitted)."""
    retry: dict[str, Any] = {}
    if max_attempts is not None:
        retry["max_attempts"] = max_attempts
    if retry_after_side_effects:
        retry["retry_after_side_effects"] = True
    fields["output_schema"] = read_output_schema(fields.get("output_schema"))
    if fields.get("parent_id") is not None:
        fields["parent_id"] = check_task_id(fields["parent_id"])
    task: dict[str, Any] = {
        **task_io(fields),  # repo, files, collect (issue 12)
        "prompt": read_prompt(prompt),
        "mcp": parse_mcp(mcp_names, mcp_settings),
        "envs": parse_pairs(envs, "--env"),
        "labels": parse_pairs(labels, "--label"),
        **({"retry": retry} if retry else {}),
        **{k: (list(v) if isinstance(v, tuple) else v) for k, v in fields.items()
           if v not in (None, ())},
    }
    client = _client(ctx)
    handle = client.submit(task, queue=queue)
    if not wait:
        if as_json:
            render.print_json({"id": handle.id, "duplicate": handle.duplicate})
        else:
            render.out.print(handle.id)
            if handle.duplicate:
                render.err.print("(an earlier task with this idempotency key; not re-run)")
        return
    if not as_json:
        render.err.print(f"submitted {handle.id}; waiting for the result...")
    try:
        result = handle.wait(timeout=wait_timeout)
    except KeyboardInterrupt:  # the id was not printed yet: say it, the task keeps running
        raise CliError(f"interrupted; task {handle.id} keeps running: follow it with "
                       f"`sandqueue watch {handle.id}`", code="interrupted",
                       exit_code=EXIT_INTERRUPTED, task_id=handle.id) from None
    _show(result, as_json)
    sys.exit(_exit_for(result))


def read_input_file(spec: str) -> dict[str, str]:
    """`--file LOCAL[:REMOTE]`: text files travel as text, others as base64."""
    local, remote = spec, None
    if not Path(spec).is_file() and ":" in spec:
        local, _, remote = spec.rpartition(":")
    path = Path(local)
    if not path.is_file():
        raise CliError(f"--file {spec}: no such local file {local!r}", code="usage_error")
    data = path.read_bytes()
    try:
        return {"path": remote or path.name, "content": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"path": remote or path.name, "content": base64.b64encode(data).decode(),
                "encoding": "base64"}


def task_io(fields: dict[str, Any]) -> dict[str, Any]:
    """The repo, files and collect options of `submit` (popped from `fields`) as task
    fields."""
    url, ref = fields.pop("repo_url", None), fields.pop("repo_ref", None)
    depth, token = fields.pop("repo_depth", None), fields.pop("repo_token", None)
    files, collect = fields.pop("input_files", ()), fields.pop("collect", ())
    out: dict[str, Any] = {}
    if url is None and (ref or depth is not None or token):
        raise CliError("--ref, --repo-depth and --repo-token need --repo URL",
                       code="usage_error")
    if url is not None:
        repo: dict[str, Any] = {"url": url, "ref": ref, "token": token}
        if depth is not None:
            repo["depth"] = depth
        out["repo"] = repo
    if files:
        out["files"] = [read_input_file(f) for f in files]
    if collect:
        out["collect"] = list(collect)
    return out


def _show(result: AgentResult, as_json: bool) -> None:
    if as_json:
        render.print_json(result.model_dump(mode="json"))
    else:
        render.print_result(result)


# -- status / result ------------------------------------------------------------------------

@cli.command()
@click.argument("task_id")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (typed).")
@click.pass_context
@handle_errors
def status(ctx: click.Context, task_id: str, as_json: bool) -> None:
    """Show a task's status (queued, running, retrying, succeeded, ...)."""
    info = _client(ctx).get(check_task_id(task_id)).task_info()
    if info.status == TaskStatus.UNKNOWN:
        raise unknown_task(task_id)
    if as_json:
        render.print_json(info.model_dump(mode="json"))
        return
    state = str(info.status)  # a status this version does not know is still shown
    render.out.print(f"{task_id} {render.escape(state)}")
    for key in ("attempt", "sandbox_id", "worker", "error", "tool_calls", "cost_usd"):
        value = getattr(info, key)
        if value:
            render.out.print(f"  {key}: {render.escape(str(value))}")
    if info.cancel_requested and not (isinstance(info.status, TaskStatus)
                                      and info.status.is_final):
        render.out.print("  cancel requested")


@cli.command()
@click.argument("task_id")
@click.option("--wait", is_flag=True, help="Block until the task ends.")
@click.option("--wait-timeout", type=float, default=None, help="With --wait: give up after N s.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@handle_errors
def result(ctx: click.Context, task_id: str, wait: bool, wait_timeout: float | None,
           as_json: bool) -> None:
    """Print a task's result; exit 4 if it has not finished."""
    handle = _client(ctx).get(check_task_id(task_id))
    outcome = handle.wait(timeout=wait_timeout) if wait else handle.result()
    if outcome is None:
        state = str(handle.task_info().status)
        if state == TaskStatus.UNKNOWN:
            raise unknown_task(task_id)
        raise CliError(f"{task_id} has not finished: {state}", code="not_finished",
                       exit_code=EXIT_PENDING, task_id=task_id,
                       extra={"status": state, "result": None})
    _show(outcome, as_json)
    sys.exit(_exit_for(outcome))


# -- artifacts (issue 12) --------------------------------------------------------------------

@cli.command()
@click.argument("task_id")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Download them into this directory (names kept); else only list them.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@handle_errors
def artifacts(ctx: click.Context, task_id: str, out_dir: Path | None, as_json: bool) -> None:
    """List a finished task's artifacts (collected files, repo.diff); download with --out.
    Exit 4 if the task has not finished."""
    handle = _client(ctx).get(check_task_id(task_id))
    outcome = handle.result()
    if outcome is None:
        state = str(handle.task_info().status)
        if state == TaskStatus.UNKNOWN:
            raise unknown_task(task_id)
        raise CliError(f"{task_id} has not finished: {state}", code="not_finished",
                       exit_code=EXIT_PENDING, task_id=task_id, extra={"status": state})
    refs = outcome.artifacts
    if out_dir is not None:
        try:
            out_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:  # e.g. a file where a directory must be: the caller's to fix
            raise CliError(f"--out {out_dir}: cannot make that directory "
                           f"({e.strerror or e})", code="usage", exit_code=EXIT_USAGE) from e
    paths = handle.download_artifacts(out_dir) if out_dir is not None else []
    if as_json:
        render.print_json({"id": task_id, "artifacts": [
            {**r.model_dump(mode="json"), **({"downloaded_to": str(p)} if paths else {})}
            for r, p in zip(refs, paths or [None] * len(refs), strict=True)]})
        return
    for ref, path in zip(refs, paths or [None] * len(refs), strict=True):
        note = f"  truncated (of {ref.original_size or 'more'} bytes)" if ref.truncated else ""
        where = str(path) if path is not None else (ref.path or ref.url or "")
        render.out.print(f"{render.escape(ref.name)}  {ref.size} B  sha256 {ref.sha256[:16]}"
                         f"  {render.escape(where)}{note}", soft_wrap=True)
    if not refs:
        render.err.print(f"{task_id} has no artifacts")


_CANCEL_OUTCOMES = {"cancelled": "cancelled", "requested": "cancel_requested",
                    "ended": "already_ended", "unknown": "unknown"}


def _cancel_reports(client: Client, ids: list[str]) -> list[dict[str, Any]]:
    """{id, outcome, status} per id, decided atomically in Redis: `cancelled` (no worker
    held it: it ended now), `cancel_requested` (its worker stops it within seconds),
    `already_ended` (nothing to do) or `unknown`."""
    decided = client.cancel_outcomes(ids)
    reports = []
    for task_id in ids:
        outcome, ended_as = decided[task_id]
        status = {"cancelled": "cancelled", "ended": ended_as, "unknown": "unknown"}.get(
            outcome) or str(client.get(task_id).task_info().status)
        reports.append({"id": task_id, "outcome": _CANCEL_OUTCOMES[outcome],
                        "status": status})
    return reports


@cli.command()
@click.argument("task_ids", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@handle_errors
def cancel(ctx: click.Context, task_ids: tuple[str, ...], as_json: bool) -> None:
    """Cancel tasks: queued ones never start, running ones stop within seconds.

    Exits 0 when every cancel was requested, 5 when a task had already ended (nothing to
    cancel), 2 when an id is unknown (the most severe wins)."""
    client = _client(ctx)
    ids = [check_task_id(t) for t in task_ids]  # all of them before cancelling any
    reports = _cancel_reports(client, ids)
    outcomes = {r["outcome"] for r in reports}
    if as_json:
        render.print_json({"tasks": reports})
    else:
        for r in reports:
            said = {"unknown": "unknown (wrong id, or its record expired)",
                    "already_ended": f"already ended ({r['status']}); nothing to cancel",
                    "cancelled": "cancelled (it had not started)",
                    "cancel_requested": "cancel requested"}[r["outcome"]]
            render.out.print(f"{r['id']} {said}")
    if "unknown" in outcomes:
        sys.exit(EXIT_USAGE)
    if "already_ended" in outcomes:
        sys.exit(EXIT_ALREADY_ENDED)


@cli.command()
@click.argument("task_id")
@click.option("--timeout", "timeout_s", type=float, default=None,
              help="Give up after N seconds (exit 4).")
@click.option("--json", "as_json", is_flag=True, help="One JSON event per line.")
@click.pass_context
@handle_errors
def watch(ctx: click.Context, task_id: str, timeout_s: float | None, as_json: bool) -> None:
    """Follow a task's progress live, like tail -f; exit with its result."""
    handle = _client(ctx).get(check_task_id(task_id))
    if not handle.info() and handle.result() is None:
        raise unknown_task(task_id)
    ended = False
    for event in handle.events(timeout=timeout_s):
        ended = ended or event.get("phase") == "result"
        if as_json:
            render.print_json(event)
        else:
            render.print_event(event)
    # The result event is published just before the result itself is stored.
    outcome = handle.wait(timeout=30) if ended else handle.result()
    if outcome is None:
        state = str(handle.task_info().status)
        raise CliError(f"{task_id} has not finished: {state}", code="not_finished",
                       exit_code=EXIT_PENDING, task_id=task_id, extra={"status": state})
    if as_json:
        render.print_json({"phase": "final", "result": outcome.model_dump(mode="json")})
    else:
        render.print_result(outcome)
    sys.exit(_exit_for(outcome))


@cli.command()
@click.option("--dry-run", is_flag=True, help="Only say what would be killed.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@handle_errors
def reap(ctx: click.Context, dry_run: bool, as_json: bool) -> None:
    """Kill sandboxes that no running task owns (finished, superseded, past deadline, or
    whose worker died). Workers also do this periodically."""
    from worker.reaper import reap as reap_sandboxes
    from worker.sandbox import make_provider

    client = _client(ctx)
    provider = make_provider(client.settings, client.redis)
    try:
        verdicts = reap_sandboxes(provider, client.store, client.settings, dry_run=dry_run)
    except errors.SandqueueError as e:
        raise CliError(e.message, code="sandboxes_unavailable",
                       exit_code=EXIT_UNREACHABLE) from e
    doomed = [v for v in verdicts if v.reason]
    if as_json:
        render.print_json({"dry_run": dry_run, "live": len(verdicts),
                           "sandboxes": [v.to_dict() for v in verdicts]})
        return
    render.out.print(f"{len(verdicts)} live sandbox(es), {len(doomed)} "
                     f"{'to kill' if dry_run else 'killed'}")
    for v in doomed:
        render.out.print(f"  {v.sandbox_id} (task {v.task_id}): {v.reason}")


@cli.command()
def keygen() -> None:
    """Print a new key for SANDQUEUE_SECRET_KEYS (encrypts inline per-task secrets)."""
    from sandqueue.sealing import generate_key

    render.out.print(generate_key())


# -- batch --------------------------------------------------------------------------------

@cli.group()
def batch() -> None:
    """Run one prompt against many inputs (JSONL or CSV), with progress and resume."""


@batch.command("run")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path),
              help="Results file (JSONL, one line per input, appended as tasks complete).")
@click.option("--prompt-template", help="Prompt with {column} fields (CSV rows, JSONL fields).")
@click.option("--batch-id", help="Name the batch (default: derived from the file and options).")
@click.option("--mcp", "mcp_names", multiple=True, metavar="NAME")
@click.option("--mcp-config", "mcp_settings", multiple=True, metavar="NAME.KEY=VALUE")
@click.option("--model")
@click.option("--max-turns", type=click.IntRange(1))
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=1))
@click.option("--env", "envs", multiple=True, metavar="KEY=VALUE")
@click.option("--label", "labels", multiple=True, metavar="KEY=VALUE")
@click.option("--max-task-cost", "max_cost_usd", type=click.FloatRange(min=0, min_open=True),
              help="Per-task budget in USD: stops that task's agent.")
@click.option("--output-schema", "output_schema", metavar="FILE|JSON",
              help="JSON Schema every answer must satisfy; with --out FILE.csv, its top-level "
                   "properties are the CSV's columns.")
@click.option("--max-cost", "batch_max_cost", type=float,
              help="Batch budget in USD: stop submitting and cancel queued tasks past it.")
@click.option("--max-failures", type=click.IntRange(0),
              help="Stop submitting and cancel queued tasks after more failures than this.")
@click.option("--retry-failed", is_flag=True, help="On resume, run failed inputs again.")
@click.option("--collect", "collect", multiple=True, metavar="GLOB",
              help="Files every task brings back as artifacts (issue 12).")
@click.option("--repo-token", metavar="${NAME}",
              help="Token reference for every line's repo (JSONL `repo`, CSV `repo`/`ref`).")
@click.option("--callback-url", help="POST the batch's summary here when its last task ends "
              "(signed with SANDQUEUE_WEBHOOK_SECRET).")
@click.option("--queue", envvar="SANDQUEUE_QUEUE", show_envvar=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary on stdout.")
@click.option("--no-progress", is_flag=True, help="No live progress bar.")
@click.pass_context
@handle_errors
def batch_run(ctx: click.Context, file: Path, out: Path | None, prompt_template: str | None,
              batch_id: str | None, mcp_names: tuple[str, ...], mcp_settings: tuple[str, ...],
              envs: tuple[str, ...], labels: tuple[str, ...], batch_max_cost: float | None,
              max_failures: int | None, retry_failed: bool, callback_url: str | None,
              queue: str | None, as_json: bool, no_progress: bool, **fields: Any) -> None:
    """Run a batch; run the same command again to resume it."""
    from producer.batch import Batch, BatchRunner, derive_batch_id, load_inputs, sealed_callback

    client = _client(ctx)
    fields["output_schema"] = read_output_schema(fields.get("output_schema"))
    defaults: dict[str, Any] = {k: (list(v) if isinstance(v, tuple) else v)
                                for k, v in fields.items() if v not in (None, ())}
    if "repo_token" in defaults:  # merged into each line's own repo (producer/batch.py)
        defaults["repo"] = {"token": defaults.pop("repo_token")}
    mcp = parse_mcp(mcp_names, mcp_settings)
    for name, value in (("mcp", mcp), ("envs", parse_pairs(envs, "--env")),
                        ("labels", parse_pairs(labels, "--label"))):
        if value:
            defaults[name] = value
    inputs = load_inputs(file, prepare=client.prepare, defaults=defaults,
                         template=prompt_template)
    hook = sealed_callback(client, callback_url) if callback_url else None
    batch_id = batch_id or derive_batch_id(file, defaults, prompt_template)
    if hook is not None:
        Batch(client, batch_id).set_callback(*hook, out=out)
    runner = BatchRunner(Batch(client, batch_id), inputs, out=out, queue=queue,
                         max_cost_usd=batch_max_cost, max_failures=max_failures,
                         retry_failed=retry_failed)
    render.err.print(f"batch {batch_id}: {len(inputs)} inputs"
                     + (f", results to {out}" if out else ""))
    ctrl_c = CtrlC()

    def on_progress(progress: Any) -> None:
        ctrl_c.check()
        bar.update(progress)

    with ctrl_c.installed():
        try:
            with render.BatchProgress(len(inputs), enabled=not no_progress) as bar:
                runner.on_progress = on_progress
                runner.on_resume = lambda plan: _say_resume(plan, bar)
                progress = runner.run(source=str(file))
        except KeyboardInterrupt:
            ctrl_c.leaving = True
            command = resume_command(ctx, batch_id)
            fail(CliError(f"interrupted; tasks already submitted keep running. Resume with "
                          f"(nothing runs twice):\n  {command}", code="interrupted",
                          exit_code=EXIT_INTERRUPTED, extra={"batch_id": batch_id,
                                                             "resume": command}), as_json)
    summary = progress.summary(batch_id, out)
    if as_json:
        render.print_json(summary)
    else:
        render.print_batch_summary(summary)
    sys.exit(EXIT_OK if progress.failed == 0 and progress.stopped is None else EXIT_FAILED)


class CtrlC:
    """Ctrl-C for a long command that must end with 130 and its resume hint, however the
    interrupt lands. Python turns SIGINT into a KeyboardInterrupt wherever the main thread
    is, and ignores one raised inside a finalizer (`__del__`, a weakref callback) as it
    ignores any exception there: the interrupt would be lost and the command would go on
    following results. So the handler records it too, and the result loop re-raises it on
    its next poll (C-Vise guards its Ctrl-C the same way). Once the command is on its way
    out (`leaving`), further Ctrl-Cs are ignored. A command started with SIGINT ignored (a
    background job of a shell without job control) keeps ignoring it, as the shell meant."""

    def __init__(self) -> None:
        self.pending = False
        self.leaving = False

    def _handler(self, signum: int, frame: Any) -> None:
        self.pending = True
        if not self.leaving:
            raise KeyboardInterrupt

    def check(self) -> None:
        if self.pending and not self.leaving:
            raise KeyboardInterrupt

    @contextmanager
    def installed(self) -> Iterator[CtrlC]:
        try:
            if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
                yield self
                return
            previous = signal.signal(signal.SIGINT, self._handler)
        except ValueError:  # not the main thread (an embedding app): Python's own handling
            yield self
            return
        try:
            yield self
        finally:
            # On the way out with 130, a late Ctrl-C must not kill the exit itself.
            signal.signal(signal.SIGINT, signal.SIG_IGN if self.leaving else previous)


def resume_command(ctx: click.Context, batch_id: str) -> str:
    """This `batch run` command as given (long option names), with its batch id spelled out
    so that it resumes the same batch. `--redis-url` is left to the environment: it may
    hold a password."""
    argv = ["sandqueue", "batch", "run"]
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if isinstance(param, click.Argument):
            argv.append(str(value))
        elif not isinstance(param, click.Option) or param.name == "batch_id":
            continue
        elif param.is_flag:
            argv += [max(param.opts, key=len)] if value else []
        elif param.multiple:
            for item in value or ():
                argv += [max(param.opts, key=len), str(item)]
        elif value is not None:
            argv += [max(param.opts, key=len), str(value)]
    return shlex.join([*argv, "--batch-id", batch_id])


def _say_resume(plan: ResumePlan, bar: render.BatchProgress) -> None:
    """On a resume, what is skipped, followed and submitted, and what is not run again."""
    bar.resume_from(plan.finished)
    note = (f"resuming: {plan.finished} input(s) finished before are skipped, "
            f"{plan.in_flight} in flight are followed, {plan.to_submit} to submit")
    if plan.retried:
        note += f"; {plan.retried} failed/cancelled input(s) run again (--retry-failed)"
    if plan.not_retried:
        note += (f"; {plan.not_retried} failed/cancelled input(s) keep their result: add "
                 "--retry-failed to run them again")
    render.err.print(render.escape(note), soft_wrap=True)


@batch.command("status")
@click.argument("batch_id")
@click.option("--json", "as_json", is_flag=True)
@click.pass_context
@handle_errors
def batch_status(ctx: click.Context, batch_id: str, as_json: bool) -> None:
    """Counts by status and cost so far, from any machine. Exits 1 when some inputs are in
    an unknown state (their task has no record: expired, or never written)."""
    from producer.batch import Batch

    b = Batch(_client(ctx), batch_id)
    if not b.exists():
        raise CliError(f"no batch {batch_id!r} is known", code="unknown_batch")
    counts = b.counts()
    unknown = counts["by_status"].get(TaskStatus.UNKNOWN.value, 0)
    problem = (f"{unknown} input(s) are in an unknown state: their tasks have no record "
               "(expired after SANDQUEUE_RESULT_EXPIRES_S, or never written); they are "
               "neither queued nor running") if unknown else None
    if as_json:
        render.print_json({**counts, **({"error": "unknown_inputs", "message": problem}
                                        if problem else {})})
    else:
        render.out.print(f"batch {batch_id} ({counts.get('status')}, {counts.get('total')} "
                         f"inputs, ${counts['cost_usd']:.4f})")
        for status_name, n in sorted(counts["by_status"].items()):
            render.out.print(f"  {status_name}: {n}")
    if problem:
        if not as_json:
            render.err.print(f"[red]error:[/] {render.escape(problem)}")
        sys.exit(EXIT_FAILED)


@batch.command("results")
@click.argument("batch_id")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path),
              help="Write JSONL here instead of stdout.")
@click.pass_context
@handle_errors
def batch_results(ctx: click.Context, batch_id: str, out: Path | None) -> None:
    """The results of finished inputs as JSONL, in input order, from any machine."""
    from producer.batch import Batch

    b = Batch(_client(ctx), batch_id)
    if not b.exists():
        raise CliError(f"no batch {batch_id!r} is known", code="unknown_batch")
    items = b.items()
    results = b.results(list(items.values()))
    sink = out.open("w", encoding="utf-8") if out else sys.stdout
    try:
        for n, key in enumerate(b.input_keys()):
            task_id = items.get(key)
            if task_id in results:
                line = {"id": key, "index": n, **results[task_id].model_dump(mode="json")}
                sink.write(json.dumps(line, ensure_ascii=False) + "\n")
    finally:
        if out:
            sink.close()


@batch.command("cancel")
@click.argument("batch_id")
@click.pass_context
@handle_errors
def batch_cancel(ctx: click.Context, batch_id: str) -> None:
    """Cancel every unfinished task of a batch."""
    from producer.batch import Batch

    b = Batch(_client(ctx), batch_id)
    if not b.exists():
        raise CliError(f"no batch {batch_id!r} is known", code="unknown_batch")
    render.out.print(f"cancel requested for {b.cancel()} task(s) of batch {batch_id}")


# -- worker -------------------------------------------------------------------------------

@cli.command(context_settings={"ignore_unknown_options": True})
@click.option("-c", "--concurrency", type=click.IntRange(1), envvar="SANDQUEUE_CONCURRENCY",
              show_envvar=True, help="Tasks in flight in this process (default 50).")
@click.option("-Q", "--queues", envvar="SANDQUEUE_QUEUE", show_envvar=True,
              help="Comma-separated queues to consume (default: sandqueue).")
@click.option("--pool", type=click.Choice(["threads", "prefork", "solo"]),
              envvar="SANDQUEUE_POOL", show_envvar=True, help="Celery pool (default threads).")
@click.option("-l", "--loglevel", envvar="SANDQUEUE_LOG_LEVEL", show_envvar=True,
              default="INFO")
@click.option("-n", "--hostname", help="Worker name, e.g. worker1@%h.")
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
@handle_errors
def worker(ctx: click.Context, concurrency: int | None, queues: str | None, pool: str | None,
           loglevel: str, hostname: str | None, celery_args: tuple[str, ...]) -> None:
    """Start a worker (a Celery worker with sandqueue's pool and options)."""
    # The worker's settings (pool sizes, Celery's pool) are read from the environment when
    # worker.broker.app is imported: flags must be in it first, or Celery's defaults win.
    for name, value in (("REDIS_URL", ctx.obj["overrides"].get("redis_url")),
                        ("SANDQUEUE_CONCURRENCY", concurrency), ("SANDQUEUE_POOL", pool)):
        if value:
            os.environ[name] = str(value)
    settings = load_settings()
    concurrency = settings.concurrency
    pool = settings.pool
    queues = queues or settings.queue
    if (settings.provider == "e2b" and settings.anthropic_api_key is None
            and settings.claude_code_oauth_token is None):
        raise errors.ConfigError(
            "neither ANTHROPIC_API_KEY nor CLAUDE_CODE_OAUTH_TOKEN is set: Claude Code in the "
            "sandboxes cannot run without one of them"
        )
    if settings.provider == "sim":
        render.err.print(f"[bold yellow]{render.SIM_BANNER}[/]", soft_wrap=True)
    from worker.broker.app import app  # the worker side is imported only here

    argv = ["worker", f"--pool={pool}", f"--concurrency={concurrency}", f"--queues={queues}",
            f"--loglevel={loglevel}", "--without-gossip", "--without-mingle"]
    if hostname:
        argv.append(f"--hostname={hostname}")
    sys.exit(_run_celery(app, [*argv, *celery_args]))


def _run_celery(app: Any, argv: list[str]) -> int:
    """Run Celery's command line and return its exit code. `app.worker_main()` drops it
    (Celery runs its click command in non-standalone mode and ignores what it returns), so
    a worker that failed to start, e.g. an "Unrecoverable error", used to exit 0."""
    from celery.bin.celery import celery as celery_command

    celery_command.params[0].default = app  # what app.start() does: `-A` defaults to app
    try:
        code = celery_command.main(args=argv, standalone_mode=False)
    except click.exceptions.Exit as e:
        code = e.exit_code
    finally:
        celery_command.params[0].default = None
    return code if isinstance(code, int) else 0


# -- check --------------------------------------------------------------------------------

@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def check(ctx: click.Context, as_json: bool) -> None:
    """Validate configuration; reach Redis, the artifact store and, with keys, E2B."""
    from producer.check import run_checks

    overrides = {k: v for k, v in ctx.obj["overrides"].items() if v is not None}
    report = run_checks(overrides)
    if as_json:
        render.print_json(report)
    else:
        styles = {"ok": ("ok", "green"), "warn": ("warn", "yellow"), "fail": ("FAIL", "red")}
        for item in report["checks"]:
            label, style = styles[item["state"]]
            render.out.print(f"[{style}]{label:>4}[/]  {item['name']}: "
                             f"{render.escape(item['detail'])}")
    sys.exit(report["exit_code"])


# -- template -------------------------------------------------------------------------------

@cli.group()
def template() -> None:
    """E2B sandbox templates with a pinned agent version (recommended for production)."""


@template.command("build")
@click.option("--claude-version", default=None, metavar="X.Y.Z",
              help="Claude Code version to install (default: the version sandqueue pins).")
@click.option("--name", default=None,
              help="Template name (default: sandqueue-claude-code-X-Y-Z).")
@click.option("--base", default="mcp-gateway", show_default=True,
              help="Template to start from (must have the MCP gateway).")
@click.option("--cpu", "cpu_count", type=click.IntRange(1, 64), help="vCPUs per sandbox.")
@click.option("--memory-mb", type=click.IntRange(256), help="Memory per sandbox in MB.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@handle_errors
def template_build(claude_version: str | None, name: str | None, base: str,
                   cpu_count: int | None, memory_mb: int | None, as_json: bool) -> None:
    """Build an E2B template with a pinned Claude Code (needs E2B_API_KEY); then set
    SANDQUEUE_TEMPLATE to its name on every worker."""
    from worker.agent import make_agent
    from worker.agent.claude_code import PINNED_VERSION
    from worker.sandbox.e2b import build_template

    settings = load_settings()
    if settings.e2b_api_key is None:
        raise errors.ConfigError("E2B_API_KEY is not set: building a template needs E2B")
    version = claude_version or PINNED_VERSION
    recipe = make_agent(settings).template_recipe(version, base)
    name = name or f"sandqueue-claude-code-{version.replace('.', '-')}"
    render.err.print(f"building {name} (Claude Code {version} on {base})...")
    try:
        info = build_template(recipe, name, settings, cpu_count=cpu_count, memory_mb=memory_mb,
                              on_log=None if as_json else render.err.print)
    except (errors.InvalidTask, errors.ConfigError):
        raise
    except errors.SandqueueError as e:
        render.err.print(f"[red]error:[/] {e.message}")
        sys.exit(EXIT_UNREACHABLE)
    if as_json:
        render.print_json({**info, "claude_version": version})
        return
    render.out.print(f"built {name} ({info['template_id']}); on every worker set "
                     f"SANDQUEUE_TEMPLATE={name}")


# -- demo ---------------------------------------------------------------------------------

@cli.command()
@click.option("--prompt", default=None, help="Prompt of the example task.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@handle_errors
def demo(prompt: str | None, as_json: bool) -> None:
    """Start Redis (if REDIS_URL is unset) and a worker, run an example task, stop them."""
    from producer.demo import run_demo

    sys.exit(run_demo(prompt, as_json))


from producer.cli_http import apikey, serve  # noqa: E402  (the HTTP API's commands)

cli.add_command(serve)
cli.add_command(apikey)


def main() -> None:
    cli(prog_name="sandqueue")


if __name__ == "__main__":
    main()
