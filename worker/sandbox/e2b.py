"""The real sandbox provider: E2B cloud sandboxes with the Docker MCP gateway.

The only module that imports `e2b`. It uses the SDK 2.x synchronous API (one worker
thread per task, each mostly waiting) and translates every SDK exception into the
`sandqueue.errors` tree with `raise ... from e`, naming what to change where that helps.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import e2b
import httpx

from sandqueue import errors
from sandqueue.settings import Settings
from worker.sandbox.base import (
    META_APP,
    CommandResult,
    FileEntry,
    LiveSandbox,
    OutputCallback,
    RunningCommand,
    Sandbox,
    SandboxProvider,
    SandboxSpec,
    TemplateRecipe,
)
from worker.sandbox.mcp_preflight import Gateway, wait_ready

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = e2b.Sandbox.default_mcp_template
"""Has Claude Code and the MCP gateway installed; used even for tasks without MCP servers."""

def _idempotency_key(spec: SandboxSpec) -> str:
    """One key per task attempt: the SDK's own retries of a lost create get the same
    sandbox back, while another attempt (or task) never does. Hashed so that any task id
    fits E2B's rule (1-255 lowercase letters, digits, hyphens) without two colliding."""
    digest = hashlib.sha256(spec.task_id.encode()).hexdigest()[:40]
    return f"sq-{digest}-{spec.attempt}"


def translate(e: BaseException, doing: str) -> NoReturn:
    """Raise the sandqueue error for an SDK (or transport) exception, chained to it."""
    msg = f"{doing}: {e}"
    match e:
        case e2b.AuthenticationException():
            raise errors.AuthError(
                f"{doing}: E2B refused the API key ({e}); check E2B_API_KEY"
            ) from e
        case e2b.RateLimitException():
            raise errors.RateLimited(f"{doing}: E2B rate limit ({e})") from e
        case e2b.ServiceBusyException():
            raise errors.SandboxUnavailable(f"{doing}: E2B is busy ({e})") from e
        case e2b.TimeoutException():  # includes SandboxNotRunning/Unreachable
            raise errors.SandboxUnavailable(msg) from e
        case e2b.InvalidArgumentException():
            raise errors.InvalidTask(msg) from e
        case e2b.NotFoundException():
            raise errors.InvalidTask(
                f"{doing}: not found ({e}); check the task's template name"
            ) from e
        case e2b.SandboxException() if str(e).startswith("Failed to start MCP gateway"):
            raise errors.McpConfigError(
                f"{doing}: the MCP gateway did not start, which usually means a server "
                f"config is wrong (a bad token or missing key): {e}"
            ) from e
        case e2b.SandboxException() if e.status_code in (400, 404, 422):
            raise errors.InvalidTask(msg) from e
        case e2b.SandboxException() if e.status_code in (401, 403):
            raise errors.AuthError(f"{msg}; check E2B_API_KEY") from e
        case e2b.SandboxException() | httpx.TransportError() | OSError():
            raise errors.SandboxUnavailable(msg) from e
        case errors.SandqueueError():
            raise e
    raise errors.SandboxUnavailable(f"{doing}: unexpected {type(e).__name__}: {e}") from e


@contextmanager
def _sdk_errors(doing: str) -> Iterator[None]:
    try:
        yield
    except errors.SandqueueError:
        raise
    except Exception as e:
        translate(e, doing)


@contextmanager
def _file_errors(doing: str) -> Iterator[None]:
    """As `_sdk_errors`, except that a missing path is the caller's business (a glob that
    matched nothing, a file the agent did not write), not a bad template name."""
    try:
        yield
    except e2b.NotFoundException as e:
        raise errors.SandboxFileNotFound(f"{doing}: no such file or directory") from e
    except errors.SandqueueError:
        raise
    except Exception as e:
        translate(e, doing)


class E2BCommand(RunningCommand):
    def __init__(
        self, handle: e2b.CommandHandle, on_stdout: OutputCallback, on_stderr: OutputCallback
    ) -> None:
        self._handle = handle
        self._on_stdout = on_stdout
        self._on_stderr = on_stderr

    def wait(self) -> int:
        try:
            return self._handle.wait(on_stdout=self._on_stdout, on_stderr=self._on_stderr).exit_code
        except e2b.CommandExitException as e:
            return e.exit_code
        except Exception as e:
            translate(e, "waiting for the agent")

    def kill(self) -> None:
        try:
            self._handle.kill()
        except Exception as e:  # the stream may already be gone; the sandbox kill follows
            log.warning("could not kill command %s: %s", self._handle.pid, e)


class E2BSandbox(Sandbox):
    simulated = False

    def __init__(self, sdk: e2b.Sandbox, settings: Settings, http: httpx.Client) -> None:
        self._sdk = sdk
        self._settings = settings
        self._http = http
        self._killed = False
        self.sandbox_id = sdk.sandbox_id

    def mcp_url(self) -> str:
        return self._sdk.get_mcp_url()

    def mcp_token(self) -> str:
        with _sdk_errors("reading the MCP gateway token"):
            token = self._sdk.get_mcp_token()
        if not token:
            raise errors.McpUnavailable("the sandbox has no MCP gateway token")
        return token

    def wait_gateway_ready(self, timeout_s: float, servers: list[str]) -> list[str]:
        """An MCP client session against the gateway, as Claude Code will open it (same
        URL through E2B's edge, same bearer token), until `tools/list` lists tools: see
        worker/sandbox/mcp_preflight.py for why "it answers" is not "it is ready"."""
        gateway = Gateway(self._http, self.mcp_url(), self.mcp_token())
        return wait_ready(gateway, servers, timeout_s)

    def write_file(self, path: str, data: str | bytes) -> None:
        with _sdk_errors(f"writing {path}"):
            self._sdk.files.write(path, data, user=self._settings.sandbox_user)

    def run(self, cmd: str, *, timeout_s: float, envs: dict[str, str] | None = None,
            cwd: str | None = None) -> CommandResult:
        with _sdk_errors("running a command"):
            try:
                out = self._sdk.commands.run(cmd, user=self._settings.sandbox_user,
                                             timeout=timeout_s, envs=envs, cwd=cwd)
                return CommandResult(out.exit_code, out.stdout, out.stderr)
            except e2b.CommandExitException as e:
                return CommandResult(e.exit_code, e.stdout or "", e.stderr or "")
            except e2b.TimeoutException as e:
                # The stream's `timeout` passed (DEADLINE_EXCEEDED, e2b/envd/rpc.py); a
                # sandbox that died or cannot be reached is one of the subclasses instead.
                if isinstance(e, e2b.SandboxNotRunningException
                              | e2b.SandboxUnreachableException):
                    raise
                raise errors.CommandTimedOut(
                    f"running a command: it did not finish within {timeout_s:.0f}s") from e

    # -- workspace in and out (issue 12) -------------------------------------------------
    def read_file(self, path: str, max_bytes: int | None = None) -> bytes:
        """Streamed (`format="stream"`), so a huge file is read only up to `max_bytes`."""
        with _file_errors(f"reading {path}"):
            reader = self._sdk.files.read(path, format="stream",
                                          user=self._settings.sandbox_user)
            out = bytearray()
            try:
                for chunk in reader:
                    out += chunk
                    if max_bytes is not None and len(out) >= max_bytes:
                        del out[max_bytes:]
                        break
            finally:
                reader.close()
            return bytes(out)

    def list_files(self, path: str, depth: int) -> list[FileEntry]:
        with _file_errors(f"listing {path}"):
            entries = self._sdk.files.list(path, depth=depth, user=self._settings.sandbox_user)
        return [FileEntry(e.path, e.size, e.type == e2b.FileType.DIR) for e in entries
                if e.type in (e2b.FileType.FILE, e2b.FileType.DIR)]
    # -- end of workspace in and out

    def start(
        self,
        cmd: str,
        *,
        on_stdout: OutputCallback,
        on_stderr: OutputCallback,
        timeout_s: float,
        envs: dict[str, str] | None = None,
    ) -> RunningCommand:
        with _sdk_errors("starting the agent"):
            handle = self._sdk.commands.run(
                cmd,
                background=True,
                envs=envs,
                user=self._settings.sandbox_user,
                timeout=timeout_s,
                retain_output=False,
            )
        return E2BCommand(handle, on_stdout, on_stderr)

    def kill(self) -> None:
        if self._killed:
            return
        try:
            # False when already gone: gone either way. With the full API timeout: the
            # sandbox object keeps the create's request_timeout (cut to the time left before
            # the deadline) for all its control-plane calls.
            self._sdk.kill(request_timeout=self._settings.e2b_request_timeout_s)
            self._killed = True
            self.killed = True
        except Exception as e:
            # The sandbox still dies at its E2B timeout (derived from the task deadline).
            log.error("could not kill sandbox %s: %s", self.sandbox_id, e)


class E2BProvider(SandboxProvider):
    name = "e2b"
    simulated = False

    def __init__(self, settings: Settings, http: httpx.Client | None = None,
                 sdk: type[e2b.Sandbox] = e2b.Sandbox) -> None:
        if settings.e2b_api_key is None:
            raise errors.ConfigError(
                "SANDQUEUE_SANDBOX=e2b needs E2B_API_KEY; get one at e2b.dev/dashboard "
                "or set SANDQUEUE_SANDBOX=sim to run simulated"
            )
        self._settings = settings
        self._sdk = sdk
        self._api_key = settings.e2b_api_key.get_secret_value()
        self._http = http or httpx.Client()

    def _api(self, **extra: Any) -> dict[str, Any]:
        return {"api_key": self._api_key,
                "request_timeout": self._settings.e2b_request_timeout_s, **extra}

    def create(self, spec: SandboxSpec) -> Sandbox:
        template = spec.template or self._settings.template or DEFAULT_TEMPLATE
        with _sdk_errors("creating the sandbox"):
            sdk = self._sdk.create(
                template=template,
                timeout=spec.lifetime_s,
                metadata=spec.metadata(),
                envs=spec.envs,
                mcp=spec.mcp or None,  # type: ignore[arg-type]
                idempotency_key=_idempotency_key(spec),
                **self._api(request_timeout=min(spec.request_timeout_s,
                                                self._settings.e2b_request_timeout_s)),
            )
        return E2BSandbox(sdk, self._settings, self._http)

    def list_live(self) -> list[LiveSandbox]:
        found: list[LiveSandbox] = []
        with _sdk_errors("listing sandboxes"):
            paginator = self._sdk.list(
                query=e2b.SandboxQuery(metadata={META_APP: "1"}), **self._api()
            )
            while paginator.has_next:
                for info in paginator.next_items():
                    found.append(LiveSandbox(info.sandbox_id, dict(info.metadata),
                                             info.started_at))
        return found

    def kill(self, sandbox_id: str) -> bool:
        with _sdk_errors(f"killing sandbox {sandbox_id}"):
            return bool(self._sdk.kill(sandbox_id, **self._api()))




def build_template(recipe: TemplateRecipe, name: str, settings: Settings, *,
                   cpu_count: int | None = None, memory_mb: int | None = None,
                   on_log: Callable[[str], None] | None = None,
                   template_cls: type[e2b.Template] = e2b.Template) -> dict[str, str]:
    """Build (and wait for) an E2B template from an agent's recipe with the SDK's template
    builder; returns its ids. The check command runs as the sandbox user at build time, so
    a template whose agent is not on that user's PATH fails here, not in every task."""
    template = template_cls().from_template(recipe.base)
    if recipe.npm_global:
        template = template.npm_install(list(recipe.npm_global), g=True)
    if recipe.check_command:
        template = template.run_cmd(recipe.check_command, user=settings.sandbox_user)
    key = settings.e2b_api_key
    try:
        info = template_cls.build(
            template, name, cpu_count=cpu_count, memory_mb=memory_mb,
            on_build_logs=(lambda entry: on_log(str(entry))) if on_log else None,
            api_key=key.get_secret_value() if key else None)
    except e2b.BuildException as e:
        raise errors.ConfigError(f"building template {name!r} failed: {e}") from e
    except Exception as e:
        translate(e, f"building template {name!r}")
    return {"template_id": info.template_id, "build_id": info.build_id, "name": name}
