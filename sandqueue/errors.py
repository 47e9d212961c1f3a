"""One exception root, two branches: retryable and permanent.

    SandqueueError
    ├── ConfigError                 settings or CLI usage are wrong (exit code 2)
    ├── RetryableError              a fresh attempt (new sandbox) may succeed
    │   ├── RateLimited             E2B or the model API answered 429       rate_limited
    │   ├── SandboxUnavailable      E2B 5xx / timeouts / sandbox unreachable sandbox_unavailable
    │   ├── GatewayTimeout          MCP gateway not answering in time       gateway_timeout
    │   ├── McpUnavailable          Claude Code saw the gateway not connected mcp_unavailable
    │   ├── ModelUnavailable        model API overloaded / 5xx              model_unavailable
    │   ├── AgentStalled            no output for the stall timeout         agent_stalled
    │   ├── AgentNoResult           CLI ended without a result event        agent_no_result
    │   ├── RepoUnavailable         the task's git host unreachable / 5xx   repo_unavailable
    │   └── WorkerStopping          this worker stops or lost the task's lease worker_lost
    └── PermanentError              retrying cannot help
        ├── InvalidTask             the task fails validation               invalid_task
        │   └── SandboxFileNotFound a file asked of the sandbox is not there  invalid_task
        ├── AuthError               a key or the MCP gateway token refused  auth
        ├── McpConfigError          bad MCP config, unresolvable ${ENV}     mcp_config
        ├── AgentMissing            the agent CLI is not in the template    agent_missing
        ├── AgentError              the agent reported an error result      agent_error
        ├── MaxTurns                the agent used up its max_turns         max_turns
        ├── BudgetExceeded          the task's max_cost_usd was reached     budget_exceeded
        ├── OutputInvalid           the answer failed output_schema, also   output_invalid
        │                           after one repair turn
        ├── DeadlineExceeded        the task's timeout_s ran out            timeout
        └── Cancelled               somebody cancelled the task             cancelled

SDK errors are translated into this tree at the boundary (`worker/sandbox/e2b.py`) with
`raise ... from e`; every message says what to change where there is something to change.
"""

from __future__ import annotations

from pydantic import ValidationError

from sandqueue.contract import ErrorCategory, TaskError


def describe(e: ValidationError, whole: str = "task") -> str:
    """A pydantic error as the user needs it: where (`mcp.notion.token`) and what, for at
    most ten problems, in one line. Used by producers and workers alike."""
    parts = []
    for err in e.errors()[:10]:
        where = ".".join(str(p) for p in err["loc"]) or whole
        parts.append(f"{where}: {err['msg'].removeprefix('Value error, ')}")
    return "; ".join(parts)


class SandqueueError(Exception):
    category: ErrorCategory = ErrorCategory.INTERNAL
    retryable: bool = False

    def __init__(self, message: str, *, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s

    def to_error(self) -> TaskError:
        return TaskError(category=self.category, message=self.message, retryable=self.retryable)


class ConfigError(SandqueueError):
    """Settings or usage are wrong; the process should stop with exit code 2."""


class RetryableError(SandqueueError):
    retryable = True


class PermanentError(SandqueueError):
    retryable = False


class RateLimited(RetryableError):
    category = ErrorCategory.RATE_LIMITED


class SandboxUnavailable(RetryableError):
    category = ErrorCategory.SANDBOX_UNAVAILABLE


class CommandTimedOut(SandboxUnavailable):
    """A command in the sandbox outlived the timeout it was run with (E2B ends its stream
    with DEADLINE_EXCEEDED, raised by the SDK, not an exit code). A sandbox problem unless
    the caller knows better (a clone whose git server never answers: RepoUnavailable)."""


class GatewayTimeout(RetryableError):
    category = ErrorCategory.GATEWAY_TIMEOUT


class McpUnavailable(RetryableError):
    category = ErrorCategory.MCP_UNAVAILABLE


class ModelUnavailable(RetryableError):
    category = ErrorCategory.MODEL_UNAVAILABLE


class AgentStalled(RetryableError):
    category = ErrorCategory.AGENT_STALLED


class AgentNoResult(RetryableError):
    category = ErrorCategory.AGENT_NO_RESULT


class RepoUnavailable(RetryableError):
    """Cloning the task's `repo` failed on the network (DNS, connect, reset, 5xx): the
    host may answer next time. Refused credentials or a missing ref are permanent."""

    category = ErrorCategory.REPO_UNAVAILABLE


class WorkerStopping(RetryableError):
    """The worker shuts down (or lost the lease): the task goes back to the queue.

    Never stored as a result by the worker that raised it; the next delivery decides, by the
    side-effect rule, whether the task runs again or ends `failed`/`worker_lost`.
    """

    category = ErrorCategory.WORKER_LOST


class WorkerLost(PermanentError):
    """A re-delivered task is not re-run because its agent had already made tool calls."""

    category = ErrorCategory.WORKER_LOST


class InvalidTask(PermanentError):
    category = ErrorCategory.INVALID_TASK


class SandboxFileNotFound(InvalidTask):
    """A path asked of the sandbox (a file to read, a directory to list) does not exist."""


class AuthError(PermanentError):
    category = ErrorCategory.AUTH


class McpConfigError(PermanentError):
    category = ErrorCategory.MCP_CONFIG


class AgentError(PermanentError):
    category = ErrorCategory.AGENT_ERROR


class AgentMissing(PermanentError):
    """The sandbox's template has no agent CLI for the sandbox user: every attempt would
    fail the same way until the deployment uses a template that has it."""

    category = ErrorCategory.AGENT_MISSING


class MaxTurns(PermanentError):
    """The agent stopped at the task's max_turns: a retry would stop there again."""

    category = ErrorCategory.MAX_TURNS


class BudgetExceeded(PermanentError):
    category = ErrorCategory.BUDGET_EXCEEDED


class DeadlineExceeded(PermanentError):
    category = ErrorCategory.TIMEOUT


class Cancelled(PermanentError):
    category = ErrorCategory.CANCELLED


class OutputInvalid(PermanentError):
    """The agent's final answer did not satisfy the task's `output_schema`, also after the
    one repair turn that told it what was wrong: another run would cost as much and
    likely fail the same way. The raw answer stays in the result's `result`."""

    category = ErrorCategory.OUTPUT_INVALID


def describe_output(problems: list[str], answered: str | None) -> str:
    """Why an answer was refused, as the user needs it: the schema's complaints (`$.where:
    what`, at most ten, as `describe` lists a task's) and the start of the raw answer."""
    shown = "; ".join(problems[:10]) or "no JSON answer"
    said = (answered or "").strip()
    quoted = f" (the answer began: {said[:200]!r})" if said else " (the answer was empty)"
    return f"the answer does not satisfy output_schema: {shown}{quoted}"
