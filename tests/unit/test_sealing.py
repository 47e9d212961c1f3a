"""Inline per-task secrets are sealed before Redis and opened only on workers."""

from __future__ import annotations

import pytest

from sandqueue import errors
from sandqueue.sealing import PREFIX, Sealer, generate_key, seal_mcp
from worker.secrets import resolve_mcp

TOKEN = "ghp_inline_user_token_123456"


def test_inline_values_are_sealed_and_opened_with_the_same_keys() -> None:
    key = generate_key()
    sealed = seal_mcp({"githubOfficial": {"githubPersonalAccessToken": TOKEN}}, Sealer(key))
    value = sealed["githubOfficial"]["githubPersonalAccessToken"]
    assert value.startswith(PREFIX) and TOKEN not in value
    resolved, secrets = resolve_mcp(sealed, {}, Sealer(key))
    assert resolved["githubOfficial"]["githubPersonalAccessToken"] == TOKEN
    assert TOKEN in secrets


def test_env_references_are_not_sealed() -> None:
    sealed = seal_mcp({"notion": {"internalIntegrationToken": "${NOTION}"}}, Sealer(generate_key()))
    assert sealed["notion"]["internalIntegrationToken"] == "${NOTION}"


def test_rotation_new_key_first_still_opens_old_values() -> None:
    old, new = generate_key(), generate_key()
    sealed = seal_mcp({"notion": {"internalIntegrationToken": TOKEN}}, Sealer(old))
    resolved, _ = resolve_mcp(sealed, {}, Sealer(f"{new},{old}"))
    assert resolved["notion"]["internalIntegrationToken"] == TOKEN


def test_a_worker_without_the_key_fails_with_mcp_config_and_says_why() -> None:
    sealed = seal_mcp({"notion": {"internalIntegrationToken": TOKEN}}, Sealer(generate_key()))
    with pytest.raises(errors.McpConfigError, match="SANDQUEUE_SECRET_KEYS"):
        resolve_mcp(sealed, {}, Sealer(generate_key()))
    with pytest.raises(errors.McpConfigError, match="SANDQUEUE_SECRET_KEYS"):
        resolve_mcp(sealed, {}, Sealer(None))


def test_without_keys_a_secret_looking_inline_value_is_refused() -> None:
    with pytest.raises(errors.InvalidTask, match=r"\$\{ENV_NAME\}"):
        seal_mcp({"githubOfficial": {"githubPersonalAccessToken": TOKEN}}, Sealer(None))


def test_without_keys_a_harmless_inline_value_passes() -> None:
    mcp = {"aks": {"accessLevel": "readonly", "azureDir": "/a", "kubeconfig": "/k"}}
    assert seal_mcp(mcp, Sealer(None)) == mcp


def test_an_invalid_key_is_a_config_error() -> None:
    with pytest.raises(errors.ConfigError, match="keygen"):
        Sealer("not-a-key")
