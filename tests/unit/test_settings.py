"""Settings: environment names, provider choice, timeout ordering, secrets kept out of sight."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import AliasChoices, SecretStr

from sandqueue.celeryconf import celery_url
from sandqueue.errors import ConfigError
from sandqueue.settings import Settings, load_settings, mask_url, redis_url_problem

REPO = Path(__file__).resolve().parents[2]
SANDBOX_KEY = "e2b_test_key_0123456789"
MODEL_KEY = "sk-ant-test-0123456789"


def _settings(**fields: Any) -> Settings:
    return Settings(_env_file=None, **fields)  # type: ignore[call-arg]


def _env_names(field: str) -> list[str]:
    info = Settings.model_fields[field]
    if isinstance(info.validation_alias, AliasChoices):
        return [str(c) for c in info.validation_alias.choices]
    return [f"SANDQUEUE_{field.upper()}"]


# -- timeout ordering -------------------------------------------------------------------------


def test_defaults_are_consistent() -> None:
    s = _settings()
    assert s.default_timeout_s <= s.max_timeout_s < s.sandbox_lifetime_s < s.visibility_timeout_s


@pytest.mark.parametrize(
    ("fields", "names"),
    [
        ({"default_timeout_s": 2000, "max_timeout_s": 1000},
         ["SANDQUEUE_DEFAULT_TIMEOUT_S", "SANDQUEUE_MAX_TIMEOUT_S"]),
        ({"max_timeout_s": 3600, "sandbox_lifetime_s": 3600},
         ["SANDQUEUE_MAX_TIMEOUT_S", "SANDQUEUE_SANDBOX_LIFETIME_S"]),
        ({"max_timeout_s": 5000},
         ["SANDQUEUE_MAX_TIMEOUT_S", "SANDQUEUE_SANDBOX_LIFETIME_S"]),
        ({"sandbox_lifetime_s": 7200, "visibility_timeout_s": 7200},
         ["SANDQUEUE_SANDBOX_LIFETIME_S", "SANDQUEUE_VISIBILITY_TIMEOUT_S"]),
        ({"visibility_timeout_s": 600},
         ["SANDQUEUE_SANDBOX_LIFETIME_S", "SANDQUEUE_VISIBILITY_TIMEOUT_S"]),
    ],
    ids=["default-above-max", "max-equals-lifetime", "max-above-lifetime",
         "lifetime-equals-visibility", "visibility-below-lifetime"],
)
def test_misordered_timeouts_are_refused_naming_the_variables(fields: dict[str, Any],
                                                              names: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        _settings(**fields)
    for name in names:
        assert name in exc.value.message


def test_default_timeout_may_equal_the_maximum() -> None:
    s = _settings(default_timeout_s=3000, max_timeout_s=3000)
    assert s.default_timeout_s == s.max_timeout_s


def test_a_longer_plan_allows_longer_tasks() -> None:
    s = _settings(max_timeout_s=80000, sandbox_lifetime_s=86400, visibility_timeout_s=90000)
    assert s.deadline_for(50000) == 50000


def test_misordered_timeouts_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDQUEUE_MAX_TIMEOUT_S", "4000")
    with pytest.raises(ConfigError, match="SANDQUEUE_SANDBOX_LIFETIME_S"):
        load_settings()


def test_deadline_for_uses_the_default_and_caps_at_the_maximum() -> None:
    s = _settings(default_timeout_s=100, max_timeout_s=200)
    assert s.deadline_for(None) == 100
    assert s.deadline_for(50) == 50
    assert s.deadline_for(10_000) == 200


def test_invalid_value_becomes_a_config_error_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SANDQUEUE_CONCURRENCY", "lots")
    with pytest.raises(ConfigError) as exc:
        load_settings()
    assert "SANDQUEUE_CONCURRENCY" in exc.value.message


def test_invalid_choice_becomes_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDQUEUE_SANDBOX", "docker")
    with pytest.raises(ConfigError, match="SANDQUEUE_SANDBOX"):
        load_settings()


# -- provider choice --------------------------------------------------------------------------


def test_auto_is_sim_without_a_sandbox_key(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().provider == "sim"
    monkeypatch.setenv("E2B_API_KEY", "")
    assert load_settings().provider == "sim"


def test_auto_is_the_cloud_provider_with_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_API_KEY", SANDBOX_KEY)
    settings = load_settings()
    assert settings.provider == "e2b"
    assert settings.e2b_api_key is not None
    assert settings.e2b_api_key.get_secret_value() == SANDBOX_KEY


def test_explicit_sim_wins_over_a_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_API_KEY", SANDBOX_KEY)
    monkeypatch.setenv("SANDQUEUE_SANDBOX", "sim")
    assert load_settings().provider == "sim"


def test_provider_from_keyword_settings() -> None:
    assert _settings().provider == "sim"
    assert _settings(e2b_api_key=SANDBOX_KEY).provider == "e2b"
    assert _settings(e2b_api_key=SANDBOX_KEY, sandbox="sim").provider == "sim"


# -- environment names --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["REDIS_URL", "SANDQUEUE_REDIS_URL"])
def test_redis_url_is_read_under_both_names(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, "redis://db.internal:6380/4")
    assert load_settings().redis_url == "redis://db.internal:6380/4"


@pytest.mark.parametrize("name", ["ANTHROPIC_API_KEY", "SANDQUEUE_ANTHROPIC_API_KEY"])
def test_model_key_is_read_under_both_names(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    monkeypatch.setenv(name, MODEL_KEY)
    key = load_settings().anthropic_api_key
    assert key is not None and key.get_secret_value() == MODEL_KEY


def test_prefixed_names_set_the_other_fields(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SANDQUEUE_CONCURRENCY", "120")
    monkeypatch.setenv("SANDQUEUE_QUEUE", "agents")
    monkeypatch.setenv("SANDQUEUE_BACKOFF_SCALE", "0")
    s = load_settings()
    assert (s.concurrency, s.queue, s.backoff_scale) == (120, "agents", 0.0)


def test_dotenv_in_the_working_directory_is_read(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / ".env").write_text("SANDQUEUE_QUEUE=from-dotenv\nREDIS_URL=redis://x:1/0\n")
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.queue == "from-dotenv"
    assert s.redis_url == "redis://x:1/0"
    assert Settings(_env_file=None).queue == "sandqueue"  # type: ignore[call-arg]


def test_field_names_work_as_keywords() -> None:
    assert _settings(redis_url="redis://h:1/0").redis_url == "redis://h:1/0"


# -- secrets ------------------------------------------------------------------------------------


def test_keys_are_secret_strings_kept_out_of_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2B_API_KEY", SANDBOX_KEY)
    monkeypatch.setenv("ANTHROPIC_API_KEY", MODEL_KEY)
    s = load_settings()
    assert isinstance(s.e2b_api_key, SecretStr)
    assert isinstance(s.anthropic_api_key, SecretStr)
    for text in (repr(s), str(s), s.model_dump_json(), repr(s.model_dump())):
        assert SANDBOX_KEY not in text
        assert MODEL_KEY not in text


# -- documentation ------------------------------------------------------------------------------


def test_readme_documents_every_setting() -> None:
    readme = REPO / "README.md"
    if not readme.exists():
        pytest.skip("README.md is not written yet")
    text = readme.read_text()
    missing = [field for field in Settings.model_fields
               if not any(name in text for name in _env_names(field))]
    assert missing == [], f"settings missing from the README: {missing}"
    known = {name for field in Settings.model_fields for name in _env_names(field)}
    unknown = sorted(set(re.findall(r"\bSANDQUEUE_[A-Z][A-Z0-9_]*\b", text)) - known)
    assert unknown == [], f"the README names settings that do not exist: {unknown}"


# -- REDIS_URL ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("url", "masked"), [
    ("redis://user:PASSWORD@db.internal:6380/2", "redis://user:**@db.internal:6380/2"),
    ("rediss://:PASSWORD@db.internal/0", "rediss://:**@db.internal/0"),
    ("redis://user:p@ss:w0rd@h/0", "redis://user:**@h/0"),
    ("redis://h/0?password=PASSWORD&ssl_cert_reqs=none",
     "redis://h/0?password=**&ssl_cert_reqs=none"),
    ("unix://:PASSWORD@/run/redis.sock?db=1", "unix://:**@/run/redis.sock?db=1"),
    ("redis://user@h:1/0", "redis://user@h:1/0"),
    ("unix:///run/redis.sock", "unix:///run/redis.sock"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
])
def test_mask_url_hides_the_password_and_keeps_the_rest(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize("url", ["redis://127.0.0.1:6379/0", "rediss://user:pw@h.example:1/15",
                                 "redis://h", "redis://h:65535", "unix:///run/redis.sock?db=3",
                                 "redis://h/?db=2"])
def test_usable_redis_urls_are_accepted(url: str) -> None:
    assert redis_url_problem(url) is None
    assert _settings(redis_url=url).redis_url == url


@pytest.mark.parametrize(("url", "problem"), [
    ("notaurl", "scheme"), ("http://x", "scheme"), ("redis://127.0.0.1:99999/0", "port"),
    ("redis://127.0.0.1:0/0", "port"), ("redis://h:abc/0", "port"), ("redis://", "host"),
    ("redis://h/zero", "database"), ("redis://h/0?db=x", "database"), ("unix://", "path"),
])
def test_malformed_redis_urls_are_config_errors_naming_redis_url(url: str, problem: str
                                                                 ) -> None:
    with pytest.raises(ConfigError) as exc:
        _settings(redis_url=url)
    assert problem in exc.value.message
    assert "REDIS_URL" in exc.value.message and "redis://127.0.0.1:6379/0" in exc.value.message


def test_a_malformed_url_error_does_not_show_its_password(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setenv("REDIS_URL", "redis://u:SECRETPW@h:99999/0")
    with pytest.raises(ConfigError) as exc:
        load_settings(_env_file=None)
    assert "SECRETPW" not in exc.value.message and "u:**@h" in exc.value.message
    assert "SECRETPW" not in repr(_settings(redis_url="redis://u:SECRETPW@h/0"))


def test_a_unix_socket_url_is_spelled_for_celery() -> None:
    assert celery_url("unix:///run/redis.sock?db=3") == \
        "redis+socket:///run/redis.sock?virtual_host=3"
    assert celery_url("rediss://h:1/2") == "rediss://h:1/2"
