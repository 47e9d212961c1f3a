"""`sandqueue serve` (the HTTP API) and `sandqueue apikey` (its keys).

Kept apart from `producer/cli.py` and light to import: FastAPI and uvicorn are imported by
`serve` when it runs, so `import producer.cli` stays cheap. Exit codes as in cli.py.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from functools import wraps
from typing import Any, TypeVar

import click
import redis

from producer import render
from producer.apikeys import ApiKeys, parse_env_names, parse_scopes
from sandqueue import errors
from sandqueue.sealing import Sealer
from sandqueue.settings import Settings, load_settings

F = TypeVar("F", bound=Callable[..., Any])


def _errors(fn: F) -> F:
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except errors.ConfigError as e:
            render.err.print(f"[red]error:[/] {e.message}")
            sys.exit(2)
        except redis.RedisError as e:
            render.err.print(f"[red]error:[/] cannot reach Redis ({type(e).__name__}); check "
                             "REDIS_URL and that Redis is running")
            sys.exit(3)

    return wrapper  # type: ignore[return-value]


def _settings(ctx: click.Context) -> Settings:
    overrides = {k: v for k, v in (ctx.find_root().obj or {}).get("overrides", {}).items()
                 if v is not None}
    return load_settings(**overrides)


def _keys(ctx: click.Context) -> ApiKeys:
    settings = _settings(ctx)
    return ApiKeys(redis.Redis.from_url(settings.redis_url, socket_connect_timeout=5,
                                        socket_timeout=10))


@click.command()
@click.option("--host", envvar="SANDQUEUE_API_HOST", show_envvar=True, default=None,
              help="Address to listen on (default 127.0.0.1).")
@click.option("--port", envvar="SANDQUEUE_API_PORT", show_envvar=True, type=int, default=None,
              help="Port (default 8080).")
@click.option("--workers", type=click.IntRange(1, 64), default=1, show_default=True,
              help="Server processes (each stateless over Redis).")
@click.pass_context
@_errors
def serve(ctx: click.Context, host: str | None, port: int | None, workers: int) -> None:
    """Serve the HTTP API (/v1, OpenAPI at /openapi.json, docs at /docs)."""
    import uvicorn

    settings = _settings(ctx)
    # uvicorn's worker processes build their own app from the environment.
    os.environ["REDIS_URL"] = settings.redis_url
    uvicorn.run("producer.http.app:create_app", factory=True,
                host=host or settings.api_host, port=port or settings.api_port,
                workers=workers, log_level=settings.log_level.lower(),
                # Open event streams end at shutdown instead of holding it up.
                timeout_graceful_shutdown=5, proxy_headers=True)


@click.group()
def apikey() -> None:
    """API keys of the HTTP API: create (printed once), list, revoke."""


@apikey.command("create")
@click.option("--tenant", required=True, help="Tenant the key's tasks belong to.")
@click.option("--scopes", default="submit,read,cancel", show_default=True,
              help="Comma-separated: submit, read, cancel, admin (every tenant).")
@click.option("--expires", "expires_days",
              # not nan or inf (which compare as in range): a key that would never expire
              type=click.FloatRange(min=0, min_open=True, max=36500),
              help="Days until the key stops working (default: never).")
@click.option("--allow-env", default="", metavar="NAME,...",
              help="${NAME} references its tasks may use (default: none).")
@click.option("--rate-limit", "rate", type=click.IntRange(1),
              help="Submits per minute for the tenant (default SANDQUEUE_API_SUBMIT_RATE_PER_MIN).")
@click.option("--max-queued", type=click.IntRange(1),
              help="Unfinished tasks the tenant may have at once (default: no limit).")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@_errors
def apikey_create(ctx: click.Context, tenant: str, scopes: str, expires_days: float | None,
                  allow_env: str, rate: int | None, max_queued: int | None,
                  as_json: bool) -> None:
    """Make a key and print it once: only its hash is kept."""
    sealer = Sealer(_settings(ctx).secret_keys)
    record, key, webhook = _keys(ctx).create(tenant, scopes=parse_scopes(scopes),
                                             expires_days=expires_days,
                                             allow_env=parse_env_names(allow_env),
                                             submit_rate_per_min=rate, sealer=sealer,
                                             max_queued=max_queued)
    if as_json:
        render.print_json({**record.public(), "key": key, "webhook_secret": webhook})
        return
    render.out.print(key)
    render.err.print(f"key {record.id} for tenant {tenant} ({', '.join(sorted(record.scopes))})"
                     "; store it now, it is not shown again")
    if webhook:
        render.err.print(f"webhook signing secret (shown once): {webhook}")
    else:
        render.err.print("no webhook secret: SANDQUEUE_SECRET_KEYS is unset, so this key's "
                         "tasks cannot use callback_url")


@apikey.command("list")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
@_errors
def apikey_list(ctx: click.Context, as_json: bool) -> None:
    """Every key: id, tenant, scopes, state (never the key)."""
    found = _keys(ctx).list()
    if as_json:
        render.print_json([k.public() for k in found])
        return
    now = time.time()
    for k in found:
        state = (k.refusal(now) and ("revoked" if k.revoked else "expired")) or "active"
        used = time.strftime("%Y-%m-%d %H:%M", time.gmtime(k.last_used_at)) \
            if k.last_used_at else "never"
        render.out.print(f"{k.id}  {k.tenant:<20} {','.join(sorted(k.scopes)):<28} {state:<8}"
                         f" last used {used}")


@apikey.command("revoke")
@click.argument("key_id")
@click.pass_context
@_errors
def apikey_revoke(ctx: click.Context, key_id: str) -> None:
    """Stop a key working at once (by its id, as `apikey list` shows)."""
    if not _keys(ctx).revoke(key_id):
        render.err.print(f"[red]error:[/] no API key {key_id!r}; see `sandqueue apikey list`")
        sys.exit(2)
    render.out.print(f"revoked {key_id}")
