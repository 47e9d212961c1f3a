"""The one typed settings object. Reads the environment and `.env`; everything else receives it.

Names: `REDIS_URL`, `E2B_API_KEY` and `ANTHROPIC_API_KEY` as the ecosystem spells them, and
`SANDQUEUE_<FIELD>` for the rest (e.g. `SANDQUEUE_CONCURRENCY=100`). Units are in the names.
Every field is listed in the README's configuration table; `tests/unit/test_settings.py`
checks that the table and this class agree.
"""

from __future__ import annotations

from functools import cached_property
from typing import Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from sandqueue.errors import ConfigError


def _alias(name: str) -> AliasChoices:
    return AliasChoices(f"SANDQUEUE_{name}", name)


REDIS_URL_EXAMPLE = "redis://127.0.0.1:6379/0 (with a password: redis://:PASSWORD@HOST:6379/0)"
MASKED = "**"


def mask_url(url: str) -> str:
    """The URL with its password shown as `**`, as Celery's worker banner shows it.

    Every message and log line that names a Redis URL goes through here: a password in
    `REDIS_URL` (the userinfo part or a `?password=` query) must never be printed."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user, sep, _password = userinfo.partition(":")
        netloc = f"{user}{':' + MASKED if sep else ''}@{host}"
    query = "&".join(f"{k}={MASKED if k.lower() == 'password' else v}"
                     for k, v in parse_qsl(parts.query, keep_blank_values=True))
    if netloc == parts.netloc and "password" not in parts.query.lower():
        return url
    return f"{parts.scheme}://{netloc}{parts.path}{'?' + query if query else ''}"


def redis_url_problem(url: str) -> str | None:
    """What is wrong with a Redis URL, or None. Checked here so that a typo is a clear
    configuration error, not a traceback from redis-py or a worker that cannot start."""
    try:
        parts = urlsplit(url)
        port = parts.port
        query = dict(parse_qsl(parts.query))
    except ValueError:  # urllib: a port out of range or not a number
        return "the port must be a number from 1 to 65535"
    if parts.scheme not in ("redis", "rediss", "unix"):
        return "the scheme must be redis://, rediss:// or unix://"
    if parts.scheme == "unix":
        return None if parts.path else "unix:// needs the socket's path, e.g. unix:///run/redis.sock"
    if not parts.hostname:
        return "it names no host"
    if port is not None and not 1 <= port <= 65535:
        return f"port {port} is out of range 1-65535"
    db = query.get("db", parts.path.strip("/") or "0")
    if not db.isdigit():
        return f"the database {db!r} is not a number (the path is /DB, e.g. /0)"
    return None


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SANDQUEUE_",
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        populate_by_name=True,
    )

    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=_alias("REDIS_URL"),
        description="Redis for the broker, results, events and limits",
        repr=False,  # it may hold a password
    )
    e2b_api_key: SecretStr | None = Field(
        None, validation_alias=_alias("E2B_API_KEY"), description="E2B API key (workers)"
    )
    anthropic_api_key: SecretStr | None = Field(
        None,
        validation_alias=_alias("ANTHROPIC_API_KEY"),
        description="given to Claude Code inside each sandbox (workers)",
    )
    claude_code_oauth_token: SecretStr | None = Field(
        None,
        validation_alias=_alias("CLAUDE_CODE_OAUTH_TOKEN"),
        description="alternative to ANTHROPIC_API_KEY: a `claude setup-token` token (workers)",
    )
    infra_backoff_s: float = Field(
        1.0, ge=0, description="first backoff of an infrastructure retry (before the agent "
        "ran), doubled per retry")
    infra_backoff_max_s: float = Field(
        30.0, ge=0, description="longest backoff between infrastructure retries; they go on "
        "until the task's deadline")
    sandbox: Literal["auto", "e2b", "sim"] = Field(
        "auto", description="sandbox provider; auto = e2b when E2B_API_KEY is set, else sim"
    )
    agent: str = Field("claude-code", min_length=1,
                       description="agent adapter workers run (worker/agent/__init__.py)")
    queue: str = Field("sandqueue", description="default queue tasks are sent to / consumed from")
    concurrency: int = Field(50, ge=1, le=2000, description="tasks in flight per worker process")
    pool: Literal["threads", "prefork", "solo"] = Field(
        "threads", description="Celery pool; threads suits tasks that mostly wait"
    )
    result_expires_s: int = Field(7 * 86400, ge=60, description="how long results are kept")
    default_timeout_s: float = Field(
        1800, gt=0, description="task deadline when a task sets no timeout_s"
    )
    max_timeout_s: float = Field(3300, gt=0, description="largest timeout_s a task may ask for")
    sandbox_lifetime_s: int = Field(
        3600, gt=0, description="longest sandbox life your E2B plan allows (Hobby 1 h, Pro 24 h)"
    )
    sandbox_grace_s: int = Field(
        60, ge=0, description="sandbox outlives the task deadline by this much, then E2B reaps it"
    )
    visibility_timeout_s: int = Field(
        7200, gt=0, description="Redis broker re-delivers an unacknowledged task after this"
    )
    stall_timeout_s: float = Field(
        300, gt=0, description="stop an agent that prints nothing for this long"
    )
    gateway_ready_timeout_s: float = Field(
        60, gt=0, description="how long to wait for the MCP gateway to answer"
    )
    e2b_request_timeout_s: float = Field(60, gt=0, description="timeout of one E2B API request")
    backoff_scale: float = Field(
        1.0, ge=0, description="multiplies every retry backoff; 0 turns backoff off (tests)"
    )
    template: str | None = Field(
        None, description="E2B template; unset = the SDK's mcp-gateway template"
    )
    sandbox_user: str = Field("user", description="sandbox user that runs Claude Code (not root)")
    claude_command: str = Field("claude", description="Claude Code executable in the sandbox")
    sim_latency_s: float = Field(0.5, ge=0, description="sim: how long the scripted agent runs")
    sim_create_latency_s: float = Field(0.1, ge=0, description="sim: sandbox creation time")
    log_level: str = Field("INFO", description="worker and CLI log level")
    lease_ttl_s: float = Field(
        15, gt=1, description="a running task's lease; a dead worker's tasks return after this"
    )
    recover_interval_s: float = Field(
        5, gt=0, description="how often workers look for tasks of dead workers"
    )
    reap_interval_s: float = Field(
        60, gt=0, description="how often workers kill sandboxes no task owns any more"
    )
    shutdown_grace_s: float = Field(
        30, ge=0, description="on SIGTERM, running tasks get this long before being handed back"
    )
    max_live_sandboxes: int | None = Field(
        None, ge=1, description="sandboxes alive at once, fleet-wide; unset = 20 with e2b "
        "(Hobby plan; Pro 100), unlimited in sim"
    )
    max_creates_per_s: float | None = Field(
        None, gt=0, description="sandbox creations per second, fleet-wide; unset = 1 with e2b "
        "(Hobby; Pro 5), unlimited in sim"
    )
    key_limits: str | None = Field(
        None, description="running tasks per key, e.g. label.tenant=5,credential=2,"
        "anthropic_key=50"
    )
    events_max_len: int = Field(1000, ge=10, description="events kept per task (Redis stream)")
    task_events: bool = Field(
        False, description="workers send Celery task events (for Flower), without args or "
        "results"
    )
    health_file: str | None = Field(
        None, description="worker: a file touched every few seconds while it is healthy "
        "(maintenance running, Redis reachable); `python -m worker.health` checks it"
    )
    api_host: str = Field("127.0.0.1", description="`sandqueue serve`: address to listen on")
    api_port: int = Field(8080, ge=1, le=65535, description="`sandqueue serve`: port")
    api_max_body_bytes: int = Field(
        1_048_576, ge=1024, description="HTTP API: largest request body (413 above it)"
    )
    api_max_batch_bytes: int = Field(
        64 * 1_048_576, ge=1024, description="HTTP API: largest batch body (413 above it)"
    )
    api_submit_rate_per_min: int = Field(
        600, ge=1, description="HTTP API: tasks a tenant may submit per minute unless its "
        "API key says otherwise (429 above it)"
    )
    api_heartbeat_s: float = Field(
        15, gt=0, description="HTTP API: SSE comment sent this often so proxies keep it open"
    )
    api_max_streams: int = Field(
        1000, ge=1, description="HTTP API: event streams and long-polls one `serve` process "
        "holds open at once (they share one Redis reader); 503 above it"
    )
    api_max_wait_s: float = Field(
        60, gt=0, description="HTTP API: longest `?wait=` a result long-poll may ask for"
    )
    webhook_allow_private: bool = Field(
        False, description="allow callback URLs on loopback, private or link-local "
        "addresses (SSRF guard off: only for tests and trusted networks)"
    )
    webhook_retry_for_s: float = Field(
        3600, ge=0, description="a failing callback is retried with backoff for this long"
    )
    webhook_timeout_s: float = Field(10, gt=0, description="timeout of one callback POST")
    webhook_backoff_s: float = Field(
        2, ge=0, description="first callback retry delay, doubled per attempt (max 5 min)"
    )
    webhook_secret: SecretStr | None = Field(
        None, description="HMAC key that signs the completion webhooks of batches run from "
        "the CLI or the Python API (`--callback-url`); HTTP batches use their API key's"
    )
    signing_keys: SecretStr | None = Field(
        None, description="comma-separated secrets; producers sign task messages with the "
        "first, workers refuse messages not signed with one of them (sandqueue/signing.py)"
    )
    metrics_port: int = Field(
        0, ge=0, le=65535, description="worker: serve Prometheus metrics on this port (one "
        "per worker process; 0 = off). `sandqueue serve` has /metrics on its own port"
    )
    metrics_host: str = Field(
        "127.0.0.1", description="worker: address the metrics port listens on (0.0.0.0 for a "
        "Prometheus on another host or pod)"
    )
    metrics_token: SecretStr | None = Field(
        None, description="`sandqueue serve`: when set, /metrics asks for `Authorization: "
        "Bearer <token>` (it names tenants and their costs); unset = open"
    )
    metrics_max_tenants: int = Field(
        100, ge=1, le=10_000, description="distinct tenant label values per process in "
        "metrics; further tenants are counted as `_other`"
    )
    tracing: Literal["off", "otlp", "console"] = Field(
        "off", description="OpenTelemetry traces: off (nothing set up, no network), otlp "
        "(needs the `otlp` extra) or console"
    )
    tracing_endpoint: str | None = Field(
        None, description="OTLP/HTTP traces endpoint, e.g. http://collector:4318/v1/traces; "
        "unset = the exporter's OTEL_EXPORTER_OTLP_* variables or its default"
    )
    secret_keys: str | None = Field(
        None,
        description="comma-separated Fernet keys; the first encrypts inline secrets, all "
        "decrypt (rotation); `sandqueue keygen` makes one",
        repr=False,
    )
    allow_clear_secrets: bool = Field(
        False, description="development only: let inline MCP values and credential-looking "
        "envs travel through Redis in clear when no SECRET_KEYS are set (producers warn)"
    )

    # -- artifacts and workspaces (issue 12)
    artifact_store: Literal["local", "s3"] = Field(
        "local", description="where collected files and diffs go: a local directory or "
        "S3-compatible object storage")
    artifact_dir: str = Field(
        "~/.sandqueue/artifacts", description="local artifact store: its directory (workers "
        "write, the CLI and HTTP API read it: one machine or a shared volume)")
    artifact_max_file_bytes: int = Field(
        10 * 1024 * 1024, ge=1, description="largest artifact; a larger file is stored "
        "truncated and its entry says so")
    artifact_max_task_bytes: int = Field(
        100 * 1024 * 1024, ge=1, description="artifact bytes per task; beyond, files are "
        "truncated (recorded)")
    artifact_max_task_files: int = Field(
        200, ge=1, description="artifacts per task; files beyond are not stored (a warning "
        "in the result names them)")
    collect_timeout_s: float = Field(
        45, gt=0, description="longest time spent bringing files back from a sandbox "
        "(also after a timeout, so keep it below SANDQUEUE_SANDBOX_GRACE_S)")
    clone_timeout_s: float = Field(300, gt=0, description="longest `repo` clone")
    s3_endpoint_url: str | None = Field(
        None, description="s3 artifact store: endpoint (MinIO, R2, ...); unset = AWS")
    s3_bucket: str | None = Field(None, description="s3 artifact store: bucket")
    s3_region: str | None = Field(None, description="s3 artifact store: region")
    s3_prefix: str = Field("sandqueue/", description="s3 artifact store: key prefix")
    s3_access_key_id: str | None = Field(
        None, repr=False, description="s3 artifact store: access key id; unset = boto3's "
        "usual chain (AWS_* variables, instance role)")
    s3_secret_access_key: SecretStr | None = Field(
        None, description="s3 artifact store: secret access key")
    # -- end of artifacts and workspaces

    @field_validator("redis_url")
    @classmethod
    def _redis_url_valid(cls, value: str) -> str:
        problem = redis_url_problem(value)
        if problem is not None:
            raise ConfigError(
                f"REDIS_URL {mask_url(value)!r} is not a usable Redis URL: {problem}; "
                f"set it like REDIS_URL={REDIS_URL_EXAMPLE}"
            )
        return value

    @model_validator(mode="after")
    def _timeouts_ordered(self) -> Settings:
        # agent deadline < sandbox lifetime < broker visibility timeout: otherwise E2B kills
        # a sandbox mid-task, or Redis hands a running task to a second worker.
        if self.default_timeout_s > self.max_timeout_s:
            raise ConfigError(
                f"SANDQUEUE_DEFAULT_TIMEOUT_S ({self.default_timeout_s}) is above "
                f"SANDQUEUE_MAX_TIMEOUT_S ({self.max_timeout_s}); lower it or raise the maximum"
            )
        if self.max_timeout_s >= self.sandbox_lifetime_s:
            raise ConfigError(
                f"SANDQUEUE_MAX_TIMEOUT_S ({self.max_timeout_s}) must be below "
                f"SANDQUEUE_SANDBOX_LIFETIME_S ({self.sandbox_lifetime_s}), the longest a "
                "sandbox may live on your E2B plan"
            )
        if self.sandbox_lifetime_s >= self.visibility_timeout_s:
            raise ConfigError(
                f"SANDQUEUE_SANDBOX_LIFETIME_S ({self.sandbox_lifetime_s}) must be below "
                f"SANDQUEUE_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s}), or Redis "
                "re-delivers running tasks and they run twice"
            )
        if self.tracing == "otlp" and not _otlp_installed():
            raise ConfigError(
                "SANDQUEUE_TRACING=otlp needs the OTLP exporter: pip install "
                "'sandqueue[otlp]' (or set SANDQUEUE_TRACING=off or console)"
            )
        if self.metrics_port and self.pool == "prefork":
            raise ConfigError(
                "SANDQUEUE_METRICS_PORT needs the threads or solo pool: with prefork the tasks "
                "run in child processes the port cannot see. Use SANDQUEUE_POOL=threads (one "
                "process holds hundreds of tasks), or run one worker per container"
            )
        return self

    @property
    def signing_keys_value(self) -> str | None:
        return self.signing_keys.get_secret_value() if self.signing_keys else None

    @cached_property
    def provider(self) -> Literal["e2b", "sim"]:
        """The sandbox provider in force: sim only when asked for or when E2B has no key."""
        if self.sandbox == "auto":
            return "e2b" if self.e2b_api_key else "sim"
        return self.sandbox

    @property
    def live_sandbox_limit(self) -> int | None:
        if self.max_live_sandboxes is not None:
            return self.max_live_sandboxes
        return 20 if self.provider == "e2b" else None

    @property
    def create_rate_limit(self) -> float | None:
        if self.max_creates_per_s is not None:
            return self.max_creates_per_s
        return 1.0 if self.provider == "e2b" else None

    def deadline_for(self, timeout_s: float | None) -> float:
        """Seconds a task may run, given what it asked for."""
        asked = timeout_s if timeout_s is not None else self.default_timeout_s
        return min(asked, self.max_timeout_s)


def _otlp_installed() -> bool:
    from importlib.util import find_spec

    try:
        return find_spec("opentelemetry.exporter.otlp.proto.http") is not None
    except ModuleNotFoundError:  # not even its parent package
        return False


def load_settings(**overrides: object) -> Settings:
    """Build settings, turning pydantic's validation error into a ConfigError with the fix."""
    from pydantic import ValidationError

    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as e:
        problems = "; ".join(
            f"SANDQUEUE_{'_'.join(str(p) for p in err['loc']).upper() or 'SETTINGS'}: {err['msg']}"
            for err in e.errors()
        )
        raise ConfigError(f"invalid configuration: {problems}") from e
