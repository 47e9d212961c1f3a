"""Inline per-task secrets are sealed before Redis and opened only on workers."""

from __future__ import annotations

from typing import Any

import pytest

from sandqueue import errors
from sandqueue.sealing import (
    PREFIX,
    Sealer,
    SecretPolicy,
    generate_key,
    is_sealed,
    looks_like_credential,
    seal_mcp,
)
from worker.credentials import resolve_envs, resolve_mcp

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


@pytest.mark.parametrize(("mcp", "where"), [
    # Names give no hint that these are secrets: every inline string is one.
    ({"databaseServer": {"databaseUrl": "postgres://admin:PASSWORD@db/app"}},
     "mcp.databaseServer.databaseUrl"),
    ({"aks": {"accessLevel": "readonly", "kubeconfig": "/k"}}, "mcp.aks.accessLevel"),
    ({"filesystem": {"paths": ["${DATA}", "/srv/data"]}}, r"mcp.filesystem.paths\[1\]"),
    ({"github/acme/tools": {"run_cmd": "npx .", "envs": {"DB_URL": "postgres://u:p@h/d"}}},
     "mcp.github/acme/tools.envs.DB_URL"),
])
def test_without_keys_every_inline_string_is_refused_naming_where(mcp: dict[str, Any],
                                                                   where: str) -> None:
    with pytest.raises(errors.InvalidTask, match=where) as exc:
        seal_mcp(mcp, Sealer(None))
    assert "SANDQUEUE_SECRET_KEYS" in exc.value.message
    assert "PASSWORD" not in exc.value.message and "/srv/data" not in exc.value.message


def test_with_keys_every_inline_string_is_sealed() -> None:
    key = generate_key()
    mcp = {"databaseServer": {"databaseUrl": "postgres://admin:PASSWORD@db/app"},
           "filesystem": {"paths": ["/srv/data", "${DATA}"]}}
    sealed = seal_mcp(mcp, Sealer(key))
    assert "PASSWORD" not in str(sealed) and "/srv/data" not in str(sealed)
    assert sealed["filesystem"]["paths"][1] == "${DATA}"
    assert resolve_mcp(sealed, {"DATA": "/d"}, Sealer(key))[0] == {
        "databaseServer": {"databaseUrl": "postgres://admin:PASSWORD@db/app"},
        "filesystem": {"paths": ["/srv/data", "/d"]}}


def test_without_keys_references_numbers_and_booleans_pass() -> None:
    mcp = {"jetbrains": {"port": 63342}, "redis": {"ssl": True},
           "notion": {"internalIntegrationToken": "${NOTION}"}}
    assert seal_mcp(mcp, Sealer(None)) == mcp


def test_custom_server_commands_stay_readable_and_its_envs_are_secrets() -> None:
    key = generate_key()
    config = {"run_cmd": "npx -y .", "install_cmd": "npm ci", "envs": {"API_KEY": "acme-999"}}
    assert seal_mcp({"github/acme/tools": {k: v for k, v in config.items() if k != "envs"}},
                    Sealer(None)) == {"github/acme/tools": {"run_cmd": "npx -y .",
                                                            "install_cmd": "npm ci"}}
    sealed = seal_mcp({"github/acme/tools": config}, Sealer(key))["github/acme/tools"]
    assert sealed["run_cmd"] == "npx -y ." and sealed["install_cmd"] == "npm ci"
    assert is_sealed(sealed["envs"]["API_KEY"])


def test_a_command_that_contains_a_credential_is_a_secret_as_a_whole() -> None:
    key = generate_key()
    mcp = {"github/acme/tools": {"run_cmd": f"npx . --token {CREDENTIALS[0]}"}}
    with pytest.raises(errors.InvalidTask, match=r"run_cmd contains what looks like a cred"):
        seal_mcp(mcp, Sealer(None))
    sealed = seal_mcp(mcp, Sealer(key))
    assert is_sealed(sealed["github/acme/tools"]["run_cmd"])
    assert resolve_mcp(sealed, {}, Sealer(key))[0] == mcp


def test_clear_values_are_allowed_only_by_the_development_setting_and_recorded() -> None:
    mcp = {"aks": {"accessLevel": "readonly", "kubeconfig": "/k", "azureDir": "/a"}}
    policy = SecretPolicy(Sealer(None), allow_clear=True)
    assert policy.mcp(mcp) == mcp
    assert policy.envs({"GH": CREDENTIALS[0]}) == {"GH": CREDENTIALS[0]}
    assert policy.sent_in_clear == ["mcp.aks.accessLevel", "mcp.aks.kubeconfig",
                                    "mcp.aks.azureDir", "envs.GH"]


# -- task envs: well-known credential formats -------------------------------------------------

CREDENTIALS = [
    "ghp_" + "a1B2" * 9,
    "gho_" + "Z9y8" * 9,
    "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz",
    "sk-ant-api03-" + "x" * 40,
    "sk-proj-" + "Ab3_" * 10,
    "sk-" + "A1b2C3d4" * 6,
    "AKIAIOSFODNN7EXAMPLE",
    "xoxb-123456789012-abcdefghijklmn",
    "-----BEGIN RSA PRIVATE KEY-----\nMIIE...\n-----END RSA PRIVATE KEY-----",
    "-----BEGIN OPENSSH PRIVATE KEY-----\nb3Bl\n",
    "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U",
    "Bearer abcdefghijklmnopqrstuvwxyz012345",
]
NOT_CREDENTIALS = [
    "0", "true", "agent:hang", "/usr/local/bin", "sk-short", "https://example.com/a?b=c",
    "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",  # a sha256
    "550e8400-e29b-41d4-a716-446655440000", "AKIA-not-a-key", "Bearer short",
    "task-ghp_", "ask-anthropic-later please",
]


@pytest.mark.parametrize("value", CREDENTIALS)
def test_envs_in_a_credential_format_are_refused_without_keys(value: str) -> None:
    with pytest.raises(errors.InvalidTask, match=r"envs\.TOKEN looks like a credential") as exc:
        SecretPolicy(Sealer(None)).envs({"SIM_LATENCY_S": "0", "TOKEN": value})
    assert value not in exc.value.message
    assert "${ENV_NAME}" in exc.value.message and "SANDQUEUE_SECRET_KEYS" in exc.value.message


@pytest.mark.parametrize("value", NOT_CREDENTIALS)
def test_ordinary_env_values_pass_in_clear(value: str) -> None:
    assert not looks_like_credential(value)
    assert SecretPolicy(Sealer(None)).envs({"X": value}) == {"X": value}


def test_credential_envs_are_sealed_with_keys_and_opened_on_the_worker() -> None:
    key = generate_key()
    envs = {"GH": CREDENTIALS[0], "SIM_TOOL_CALLS": "2", "REF": "${WORKER_TOKEN}"}
    sealed = SecretPolicy(Sealer(key)).envs(envs)
    assert is_sealed(sealed["GH"]) and CREDENTIALS[0] not in str(sealed)
    assert sealed["SIM_TOOL_CALLS"] == "2" and sealed["REF"] == "${WORKER_TOKEN}"
    opened, secrets = resolve_envs(sealed, {"WORKER_TOKEN": "wt-123456"}, Sealer(key))
    assert opened == {"GH": CREDENTIALS[0], "SIM_TOOL_CALLS": "2", "REF": "wt-123456"}
    assert sorted(secrets) == sorted([CREDENTIALS[0], "wt-123456"])  # for the redactor


def test_a_credential_env_sent_in_clear_is_still_a_secret_for_the_redactor() -> None:
    opened, secrets = resolve_envs({"GH": CREDENTIALS[3], "N": "1"}, {})
    assert opened == {"GH": CREDENTIALS[3], "N": "1"} and secrets == [CREDENTIALS[3]]


def test_an_env_reference_the_worker_cannot_resolve_says_which() -> None:
    with pytest.raises(errors.McpConfigError, match=r"envs.GH refers to \$\{NOPE\}"):
        resolve_envs({"GH": "${NOPE}"}, {"OTHER": "x"})


def test_an_invalid_key_is_a_config_error() -> None:
    with pytest.raises(errors.ConfigError, match="keygen"):
        Sealer("not-a-key")
