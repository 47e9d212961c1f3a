"""The task/result contract: what a producer sends and what a worker answers.

Both sides import this one module; it depends on pydantic and the catalog snapshot only, so
an app can submit tasks without pulling in Celery workers or the `e2b` SDK. Workers validate
every message again on receipt: nothing coming out of the broker is trusted.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sandqueue import catalog, schemas

CONTRACT_VERSION = 1
TASK_NAME = "sandqueue.run_agent_task"
"""The Celery task name; producers send by name and never import the worker."""

MAX_PROMPT_BYTES = 256 * 1024
MAX_SYSTEM_PROMPT_BYTES = 64 * 1024
MAX_TIMEOUT_S = 24 * 3600
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
RESERVED_ENVS = frozenset({"ANTHROPIC_API_KEY", "CLAUDE_CODE_OAUTH_TOKEN", "E2B_API_KEY", "HOME",
                           "PATH", "USER"})
"""Sandbox variables the worker sets itself; a task may not override them."""
SESSION_ENVS = frozenset({"CLAUDE_CONFIG_DIR", "CLAUDE_CODE_PROJECT_DIR_NAME"})
"""Variables that move where Claude Code keeps its session transcripts (`$CLAUDE_CONFIG_DIR/
projects/...`, or a fixed project folder name: research/claude-code-facts.md §7, D
sessions.md): the worker saves the transcript from its documented place for follow-up
turns, so a task that moved it would silently lose them."""

Label = Annotated[str, Field(max_length=256)]
TraceHeader = Annotated[str, Field(max_length=64)]
TraceValue = Annotated[str, Field(max_length=512)]


class TaskStatus(StrEnum):
    SUBMITTING = "submitting"
    """Recorded by a producer that has not yet confirmed publishing it (see producer/outbox)."""
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    UNKNOWN = "unknown"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset(
    {TaskStatus.SUCCEEDED, TaskStatus.FAILED, TaskStatus.TIMED_OUT, TaskStatus.CANCELLED}
)


class ErrorCategory(StrEnum):
    """Why a task failed. Each maps to one exception class in `sandqueue.errors`."""

    INVALID_TASK = "invalid_task"
    AUTH = "auth"
    MCP_CONFIG = "mcp_config"
    RATE_LIMITED = "rate_limited"
    SANDBOX_UNAVAILABLE = "sandbox_unavailable"
    GATEWAY_TIMEOUT = "gateway_timeout"
    MCP_UNAVAILABLE = "mcp_unavailable"
    MODEL_UNAVAILABLE = "model_unavailable"
    AGENT_STALLED = "agent_stalled"
    AGENT_NO_RESULT = "agent_no_result"
    REPO_UNAVAILABLE = "repo_unavailable"
    AGENT_ERROR = "agent_error"
    AGENT_MISSING = "agent_missing"
    MAX_TURNS = "max_turns"
    WORKER_LOST = "worker_lost"
    BUDGET_EXCEEDED = "budget_exceeded"
    TIMEOUT = "timeout"
    CANCELLED = "cancelled"
    INTERNAL = "internal"
    OUTPUT_INVALID = "output_invalid"


class RetryPolicy(BaseModel):
    """How often a transient failure is retried (each retry is a fresh sandbox)."""

    model_config = ConfigDict(extra="forbid")

    max_attempts: int = Field(3, ge=1, le=20)
    backoff_s: float = Field(2.0, ge=0, le=600, description="first backoff, doubled per retry")
    backoff_max_s: float = Field(60.0, ge=0, le=3600)
    retry_after_side_effects: bool = Field(
        False,
        description="retry even after the agent made a tool call (its effects may repeat)",
    )


AGENT_OPTIONS = ("model", "max_turns", "allowed_tools", "disallowed_tools",
                 "append_system_prompt")
"""The task fields only the agent adapter interprets (tool names: `mcp:<tool>` for the
MCP gateway's tools, the agent's own names for its built-in tools)."""


# -- workspace in and out (issue 12): what a task brings into its sandbox and takes back --
MAX_INPUT_FILES = 50
MAX_INPUT_FILES_BYTES = 512 * 1024
"""Inline input files ride in the task message: larger inputs belong in `repo`."""
MAX_COLLECT_PATTERNS = 50
_REF = re.compile(r"^(?!-)(?!.*\.\.)[A-Za-z0-9._/@+-]{1,255}\Z")
_REPO_URL = re.compile(r"^(https?|ssh|git|file)://[^\s]+\Z")
_ENV_REFERENCE = re.compile(r"^\$\{([A-Za-z_][A-Za-z0-9_]*)\}\Z")


def workspace_path(value: str, what: str) -> str:
    """A path relative to the agent's working directory, with no way out of it."""
    parts = value.split("/")
    if (not value or value.startswith("/") or "\\" in value or "\x00" in value
            or any(p in ("", ".", "..") for p in parts)):
        raise ValueError(f"{what} {value!r} must be a relative path inside the working "
                         "directory (no leading /, no . or .. parts, no empty parts)")
    return value


class RepoSpec(BaseModel):
    """A git repository cloned into the sandbox before the agent starts; the agent then
    works in it, and `git diff` of what it changed comes back as the `repo.diff` artifact."""

    model_config = ConfigDict(extra="forbid")

    url: str = Field(..., max_length=2048, description="https://, ssh://, git:// or file://")
    ref: str | None = Field(None, description="branch, tag or full commit id; default: the "
                            "remote's HEAD")
    depth: int = Field(1, ge=0, le=1_000_000, description="commits of history; 0 = all")
    token: str | None = Field(
        None, max_length=200, description="`${ENV}` naming a variable on the workers that "
        "holds an HTTPS token; sent as an HTTP header for the fetch only")
    username: str = Field("x-access-token", min_length=1, max_length=100,
                          description="user name the token is sent with (GitHub: "
                          "x-access-token; GitLab: oauth2)")

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        if not _REPO_URL.match(value):
            raise ValueError("repo.url must be an https://, http://, ssh://, git:// or "
                             "file:// URL, e.g. https://github.com/owner/name.git")
        if re.match(r"^https?://[^/@]*@", value):
            raise ValueError("repo.url must not carry credentials; put the token in a "
                             "worker environment variable and set repo.token to ${NAME}")
        return value

    @field_validator("ref")
    @classmethod
    def _ref(cls, value: str | None) -> str | None:
        if value is not None and not _REF.match(value):
            raise ValueError(f"repo.ref {value!r} is not a branch, tag or commit name "
                             "(letters, digits, . _ / @ + -; no leading - and no ..)")
        return value

    @field_validator("token")
    @classmethod
    def _token(cls, value: str | None) -> str | None:
        if value is not None and not _ENV_REFERENCE.match(value):
            raise ValueError("repo.token must be a ${NAME} reference to an environment "
                             "variable set on the workers, e.g. ${GITHUB_TOKEN}: the token "
                             "itself must not travel through Redis")
        return value


class InputFile(BaseModel):
    """A small file written into the agent's working directory before the run."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(..., max_length=1024)
    content: str
    encoding: Literal["text", "base64"] = "text"

    @field_validator("path")
    @classmethod
    def _path(cls, value: str) -> str:
        return workspace_path(value, "files[].path")

    @model_validator(mode="after")
    def _decodable(self) -> InputFile:
        self.data()
        return self

    def data(self) -> bytes:
        if self.encoding == "text":
            return self.content.encode("utf-8", "surrogatepass")
        try:
            return base64.b64decode(self.content, validate=True)
        except (binascii.Error, ValueError) as e:
            raise ValueError(f"files: {self.path} is not valid base64 ({e})") from e


class ArtifactRef(BaseModel):
    """One file a task produced, as the result lists it: never the bytes, only where they
    are (`path` in a local store, `url` in object storage) and how to check them."""

    model_config = ConfigDict(extra="ignore")

    name: str
    size: int = Field(..., description="bytes stored")
    sha256: str = Field(..., description="of the bytes stored")
    content_type: str = "application/octet-stream"
    path: str | None = None
    url: str | None = None
    truncated: bool = Field(False, description="the stored bytes are a prefix of the file")
    original_size: int | None = Field(None, description="the file's size, when truncated")
# -- end of workspace in and out


class AgentTask(BaseModel):
    """One agent run: a prompt plus the MCP servers the agent may use."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=False)

    prompt: str
    mcp: dict[str, dict[str, Any]] = Field(default_factory=dict)
    # -- agent options (AGENT_OPTIONS): what the agent adapter turns into its own flags
    # (worker/agent/claude_code.py); kept flat on the wire so messages stay compatible.
    model: str | None = Field(None, max_length=200)
    max_turns: int | None = Field(None, ge=1, le=10_000)
    allowed_tools: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=500
    )
    disallowed_tools: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        default_factory=list, max_length=500
    )
    append_system_prompt: str | None = None
    # -- end of agent options
    timeout_s: float | None = Field(
        None, gt=0, le=MAX_TIMEOUT_S, description="whole-task deadline, all attempts included"
    )
    template: str | None = Field(None, min_length=1, max_length=200)
    envs: dict[str, Annotated[str, Field(max_length=32_768)]] = Field(
        default_factory=dict, max_length=200
    )
    labels: dict[Label, Label] = Field(default_factory=dict, max_length=64)
    idempotency_key: str | None = Field(None, min_length=1, max_length=255)
    retry: RetryPolicy = Field(default_factory=RetryPolicy)
    max_cost_usd: float | None = Field(None, gt=0, le=10_000)
    callback_url: str | None = Field(
        None, min_length=8, max_length=2048,
        description="http(s) URL the result is POSTed to when the task ends (signed)")
    callback_secret: str | None = Field(
        None, min_length=16, max_length=4096, repr=False,
        description="HMAC key of the callback signature; sealed before it reaches Redis "
        "(the HTTP API sets it from the API key)")
    # -- typed answers and follow-up turns (issue 12): see sandqueue/schemas.py and
    # worker/agent/typed.py; the agent runner, not the adapter, interprets these.
    output_schema: dict[str, Any] | None = Field(
        None, description="JSON Schema (top level an object) the final answer must satisfy; "
        "the parsed answer is the result's `output`. From Python also a pydantic model class")
    parent_id: str | None = Field(
        None, min_length=1, max_length=255,
        description="continue this earlier task's agent conversation (a follow-up turn)")
    with_files: bool = Field(
        False, description="with parent_id: also restore the parent's repository and "
        "collected files into the new sandbox")
    # -- end of typed answers and follow-up turns

    @field_validator("output_schema", mode="before")
    @classmethod
    def _output_schema_valid(cls, value: Any) -> Any:
        """A pydantic model class becomes its schema; the schema must pass its meta-schema."""
        value = schemas.schema_of(value)
        return schemas.check_output_schema(value) if value is not None else None

    @model_validator(mode="after")
    def _files_need_a_parent(self) -> AgentTask:
        if self.with_files and self.parent_id is None:
            raise ValueError("with_files restores a parent task's files: give parent_id too "
                             "(--continue TASK_ID)")
        return self

    # -- workspace in and out (issue 12)
    repo: RepoSpec | None = None
    files: list[InputFile] = Field(default_factory=list, max_length=MAX_INPUT_FILES)
    collect: list[Annotated[str, Field(min_length=1, max_length=1024)]] = Field(
        default_factory=list, max_length=MAX_COLLECT_PATTERNS,
        description="glob patterns, relative to the working directory, of files brought "
        "back as artifacts when the agent ends (also after a failure or timeout)")

    @field_validator("repo", mode="before")
    @classmethod
    def _repo_shorthand(cls, value: Any) -> Any:
        return {"url": value} if isinstance(value, str) else value

    @field_validator("files", mode="before")
    @classmethod
    def _files_counted(cls, value: Any) -> Any:
        """Before pydantic's own count check, to say what to do instead."""
        if isinstance(value, list) and len(value) > MAX_INPUT_FILES:
            raise ValueError(f"{len(value)} input files, at most {MAX_INPUT_FILES} allowed; "
                             "put more in a repository (repo), or an archive in one file")
        return value

    @field_validator("files")
    @classmethod
    def _files_bounded(cls, value: list[InputFile]) -> list[InputFile]:
        total = sum(len(f.data()) for f in value)
        if total > MAX_INPUT_FILES_BYTES:
            raise ValueError(f"files total {total} bytes, over the {MAX_INPUT_FILES_BYTES}-"
                             "byte limit; put large inputs in a repository (repo)")
        paths = [f.path for f in value]
        if len(set(paths)) != len(paths):
            raise ValueError("files: two files have the same path")
        return value

    @field_validator("collect")
    @classmethod
    def _collect_relative(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:  # checked as a path with its wildcards made plain; refused as written
                workspace_path(pattern.replace("**", "x").replace("*", "x"), "collect pattern")
            except ValueError:
                raise ValueError(f"collect pattern {pattern!r} must be a relative path inside "
                                 "the working directory (no leading /, no . or .. parts, "
                                 "no empty parts)") from None
        return value
    # -- end of workspace in and out

    @field_validator("prompt")
    @classmethod
    def _prompt_size(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("prompt is empty; give the agent something to do")
        size = len(value.encode("utf-8", "surrogatepass"))
        if size > MAX_PROMPT_BYTES:
            raise ValueError(
                f"prompt is {size} bytes, over the {MAX_PROMPT_BYTES}-byte limit; "
                "put large inputs in a file the agent can fetch instead"
            )
        return value

    @field_validator("append_system_prompt")
    @classmethod
    def _system_prompt_size(cls, value: str | None) -> str | None:
        size = len(value.encode("utf-8", "surrogatepass")) if value is not None else 0
        if size > MAX_SYSTEM_PROMPT_BYTES:
            raise ValueError(f"append_system_prompt is over {MAX_SYSTEM_PROMPT_BYTES} bytes")
        return value

    @field_validator("mcp")
    @classmethod
    def _mcp_known(cls, value: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        if len(value) > 50:
            raise ValueError("at most 50 MCP servers per task")
        for name, config in value.items():
            catalog.validate_server(name, config)
        return value

    @field_validator("envs")
    @classmethod
    def _env_names(cls, value: dict[str, str]) -> dict[str, str]:
        for name in value:
            if not ENV_NAME.match(name):
                raise ValueError(f"envs: {name!r} is not a valid environment variable name")
            if name in RESERVED_ENVS:
                raise ValueError(f"envs: {name} is set by the worker and cannot be overridden")
            if name in SESSION_ENVS:
                raise ValueError(f"envs: {name} would move the agent's session transcripts, "
                                 "which the worker saves from ~/.claude/projects for "
                                 "follow-up turns; leave it out")
        return value

    @field_validator("callback_url")
    @classmethod
    def _callback_scheme(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/?#\s]+", value, re.I):
            raise ValueError("callback_url must be an http:// or https:// URL with a host")
        return value

    @model_validator(mode="after")
    def _tools_disjoint(self) -> AgentTask:
        both = set(self.allowed_tools) & set(self.disallowed_tools)
        if both:
            raise ValueError(f"tools both allowed and disallowed: {sorted(both)}")
        return self


def session_store_key(task_id: str) -> str:
    """Where a task's session transcripts are kept in the artifact store: beside its
    artifacts, not among them (they are the agent's state for follow-ups, not files the
    task brought back, and are not served as artifacts)."""
    return f"{task_id}:session"


class ParentSession(BaseModel):
    """The session a follow-up task continues, as the producer found it at submit: the
    parent's session id and saved transcript (an artifact of the parent task), and the
    directory its agent ran in (the transcript's place depends on it)."""

    model_config = ConfigDict(extra="forbid")

    task_id: str = Field(..., min_length=1, max_length=255)
    session_id: str = Field(..., min_length=1, max_length=128)
    transcript: str = Field(..., min_length=1, max_length=1024,
                            description="artifact name of the transcript")
    sha256: str = Field(..., min_length=64, max_length=64)
    cwd: str | None = Field(None, max_length=1024)
    # with task.with_files: what of the parent's workspace to bring back
    files: list[str] = Field(default_factory=list, max_length=10_000,
                             description="artifact names of its collected files (`files/...`)")
    diff: str | None = Field(None, description="artifact name of its repo's diff")
    repo_commit: str | None = Field(None, max_length=64,
                                    description="the commit its diff applies to")


class TaskMessage(BaseModel):
    """What travels through the broker: the task plus what the producer knew when it sent it."""

    model_config = ConfigDict(extra="forbid")

    v: Literal[1] = CONTRACT_VERSION
    task: AgentTask
    submitted_at: float = Field(default_factory=time.time)
    sig: str | None = Field(None, max_length=128,
                            description="HMAC of the message (sandqueue/signing.py), if signed")
    trace: dict[TraceHeader, TraceValue] | None = Field(
        None, max_length=4, description="W3C trace context of the producer's span "
        "(sandqueue/tracing.py), when it traces")
    parent: ParentSession | None = Field(
        None, description="with task.parent_id: the session to continue (set by the producer)")


class TaskError(BaseModel):
    category: ErrorCategory
    message: str
    retryable: bool


class Timings(BaseModel):
    """Seconds spent per phase; sandbox and agent phases are those of the last attempt."""

    queued_s: float | None = None
    sandbox_create_s: float | None = None
    gateway_ready_s: float | None = None
    agent_run_s: float | None = None
    total_s: float | None = None


class McpServerStatus(BaseModel):
    name: str
    status: str


class ToolCallCount(BaseModel):
    name: str
    count: int


class AttemptRecord(BaseModel):
    """One attempt of a task: where it ran, how it ended, and whether its sandbox is gone.

    `outcome` is `succeeded`, an error category (`rate_limited`, `timeout`, ...),
    `handed_back` (its worker stopped and put the task back on the queue), `worker_lost`
    (its worker died or lost the lease mid-attempt) or `running` (not finished yet).
    `sandbox_killed` is True only when a kill was confirmed (`killed_by`: `worker` or
    `reaper`), None when nobody knows (the worker died and no reaper has reported yet).
    """

    model_config = ConfigDict(extra="ignore")

    attempt: int
    delivery: int | None = None
    worker: str | None = None
    sandbox_id: str | None = None
    outcome: str = "running"
    error: str | None = None
    retried: bool = False
    sandbox_killed: bool | None = None
    killed_by: str | None = None
    agent_ran: bool = False
    """The agent process started in this attempt (else it failed before: an infrastructure
    retry, which does not count against `retry.max_attempts`)."""
    started_at: float | None = None
    ended_at: float | None = None


class AgentResult(BaseModel):
    """The structured outcome of one task, as stored in the Redis result backend."""

    model_config = ConfigDict(extra="ignore")

    task_id: str
    status: TaskStatus
    result: str | None = Field(None, description="the agent's final text")
    is_error: bool | None = None
    subtype: str | None = None
    num_turns: int | None = None
    total_cost_usd: float | None = None
    usage: dict[str, Any] = Field(default_factory=dict)
    session_id: str | None = None
    agent_version: str | None = Field(None, description="the agent CLI's version, as it said")
    # -- typed answers and follow-up turns (issue 12)
    output: Any = Field(None, description="the final answer parsed as JSON and valid under "
                        "the task's output_schema (None without a schema, or when invalid)")
    agent_turns: int = Field(0, description="prompts the agent answered in the last attempt's "
                             "session: 1, or 2 when a repair turn followed an invalid answer")
    parent_id: str | None = Field(None, description="the task this one continued")
    transcript: ArtifactRef | None = Field(
        None, description="the agent's session transcript, saved for follow-up turns")
    agent_cwd: str | None = Field(None, description="the directory the agent ran in")
    # -- end of typed answers and follow-up turns
    timings: Timings = Field(default_factory=Timings)
    attempts: int = 0
    """Sandboxes tried (every attempt, across deliveries)."""
    agent_runs: int = 0
    """Attempts in which the agent ran: what `retry.max_attempts` bounds."""
    infra_retries: int = 0
    """Attempts retried because the infrastructure failed before the agent ran (sandbox
    creation 429/5xx/timeouts, E2B unreachable, gateway not ready): no side effects, so
    they are retried with backoff for as long as the deadline allows."""
    attempt_log: list[AttemptRecord] = Field(
        default_factory=list, description="every attempt, across deliveries, in order"
    )
    sandbox_id: str | None = None
    mcp_servers: list[McpServerStatus] = Field(default_factory=list)
    mcp_tools: list[str] = Field(default_factory=list,
                                 description="tools the MCP gateway listed before the run")
    tool_calls: list[ToolCallCount] = Field(default_factory=list)
    error: TaskError | None = None
    simulated: bool = False
    labels: dict[str, str] = Field(default_factory=dict)
    timeout_s_requested: float | None = Field(
        None, description="the task's timeout_s as submitted (None: the worker's default)"
    )
    timeout_s_applied: float | None = Field(
        None, description="the deadline the worker ran the task under, in seconds"
    )
    warnings: list[str] = Field(
        default_factory=list, description="what the worker changed or doubted, e.g. a clamp"
    )
    # -- workspace out (issue 12)
    artifacts: list[ArtifactRef] = Field(
        default_factory=list, description="files brought back: collected, the repo's diff")
    repo_commit: str | None = Field(None, description="the commit the repo was checked out at")
    # -- end of workspace out
    finished_at: float = Field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return self.status is TaskStatus.SUCCEEDED

    @property
    def tool_call_total(self) -> int:
        return sum(t.count for t in self.tool_calls)
