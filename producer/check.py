"""`sandqueue check`: is this machine ready to submit and run tasks?"""

from __future__ import annotations

from typing import Any

import redis

from sandqueue import errors
from sandqueue.settings import Settings, load_settings, mask_url


def _item(name: str, state: str, detail: str) -> dict[str, str]:
    return {"name": name, "state": state, "detail": detail}


def _check_e2b(settings: Settings) -> dict[str, str]:
    if settings.e2b_api_key is None:
        return _item("e2b", "warn", "E2B_API_KEY not set: workers run simulated sandboxes")
    import e2b  # only when keys are set: producers otherwise never load the SDK

    try:
        paginator = e2b.Sandbox.list(limit=1, api_key=settings.e2b_api_key.get_secret_value(),
                                     request_timeout=10)
        paginator.next_items()
    except e2b.AuthenticationException as e:
        return _item("e2b", "fail", f"E2B refused the key ({e}); check E2B_API_KEY")
    except Exception as e:
        return _item("e2b", "unreachable", f"cannot reach E2B ({type(e).__name__}: {e})")
    return _item("e2b", "ok", "API key accepted")


_STORE_REFUSED = ("NoSuchBucket", "AccessDenied", "InvalidAccessKeyId",
                  "SignatureDoesNotMatch", "InvalidBucketName")


def _check_artifacts(settings: Settings) -> dict[str, str]:
    """The store workers write collected files and transcripts to: a wrong bucket would
    otherwise show only as warnings in every result, the files lost."""
    from sandqueue.artifacts import ArtifactError, make_store

    if settings.artifact_store == "local":
        return _item("artifacts", "ok", f"local directory {settings.artifact_dir} (workers and "
                     "readers must share it)")
    where = f"s3://{settings.s3_bucket}/{settings.s3_prefix}"
    try:
        make_store(settings).list("sandqueue-check")
    except ArtifactError as e:
        state = "fail" if any(c in e.message for c in _STORE_REFUSED) else "unreachable"
        return _item("artifacts", state, f"{where}: {e.message}; check SANDQUEUE_S3_BUCKET, "
                     "SANDQUEUE_S3_ENDPOINT_URL and the S3 credentials")
    return _item("artifacts", "ok", f"{where} readable")


def run_checks(overrides: dict[str, Any]) -> dict[str, Any]:
    checks: list[dict[str, str]] = []
    try:
        settings = load_settings(**overrides)
    except errors.ConfigError as e:
        return {"ok": False, "exit_code": 2, "checks": [_item("settings", "fail", e.message)]}
    checks.append(_item("settings", "ok",
                        f"deadline default {settings.default_timeout_s:.0f}s < max "
                        f"{settings.max_timeout_s:.0f}s < sandbox lifetime "
                        f"{settings.sandbox_lifetime_s}s < visibility "
                        f"{settings.visibility_timeout_s}s"))
    if settings.provider == "sim":
        checks.append(_item("provider", "warn", "sim: SIMULATED sandboxes and agent"))
    else:
        checks.append(_item("provider", "ok", "e2b"))
    try:
        client = redis.Redis.from_url(settings.redis_url, socket_connect_timeout=3,
                                      socket_timeout=3)
        version = client.info("server").get("redis_version", "?")
        checks.append(_item("redis", "ok", f"{mask_url(settings.redis_url)} (Redis {version})"))
    except redis.RedisError as e:
        checks.append(_item("redis", "unreachable", f"{mask_url(settings.redis_url)}: {e}"))
    checks.append(_check_e2b(settings))
    checks.append(_check_artifacts(settings))
    if settings.anthropic_api_key is None:
        state = "fail" if settings.provider == "e2b" else "warn"
        checks.append(_item("anthropic", state, "ANTHROPIC_API_KEY not set (workers need it)"))
    else:
        checks.append(_item("anthropic", "ok", "ANTHROPIC_API_KEY set"))
    states = {c["state"] for c in checks}
    exit_code = 2 if "fail" in states else 3 if "unreachable" in states else 0
    for c in checks:
        if c["state"] == "unreachable":
            c["state"] = "fail"
    return {"ok": exit_code == 0, "exit_code": exit_code, "provider": settings.provider,
            "checks": checks}
