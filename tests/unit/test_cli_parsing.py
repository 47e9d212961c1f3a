"""The CLI's parsing of --mcp-config / --env / prompts, and `submit`'s exit codes."""

from __future__ import annotations

import io
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fakeredis
import pytest
from click.testing import CliRunner, Result

from producer.api import Client
from producer.cli import cli, parse_mcp, parse_pairs, read_prompt
from sandqueue import errors
from sandqueue.contract import TASK_NAME, TaskMessage

# -- parse_mcp --------------------------------------------------------------------------------


def test_names_alone_give_empty_configs() -> None:
    assert parse_mcp(("notion", "amazonBedrockAgentcore"), ()) == {
        "notion": {}, "amazonBedrockAgentcore": {}}


def test_settings_are_grouped_by_server_and_env_references_kept() -> None:
    mcp = parse_mcp(("notion",), ("notion.internalIntegrationToken=${NOTION_TOKEN}",
                                  "githubOfficial.githubPersonalAccessToken=${GH}"))
    assert mcp == {"notion": {"internalIntegrationToken": "${NOTION_TOKEN}"},
                   "githubOfficial": {"githubPersonalAccessToken": "${GH}"}}


@pytest.mark.parametrize(
    ("item", "server", "key", "value"),
    [
        ("jetbrains.port=63342", "jetbrains", "port", 63342),
        ("jetbrains.port=${JB_PORT}", "jetbrains", "port", "${JB_PORT}"),
        ("redis.ssl=true", "redis", "ssl", True),
        ("redis.ssl=False", "redis", "ssl", False),
        ("redis.ssl=1", "redis", "ssl", True),
        ("redis.ssl=no", "redis", "ssl", False),
        ("filesystem.paths=/a, /b ,,/c", "filesystem", "paths", ["/a", "/b", "/c"]),
        ("filesystem.paths=${DATA_DIRS}", "filesystem", "paths", "${DATA_DIRS}"),
        ("textToGraphql.modelTemperature=0.5", "textToGraphql", "modelTemperature", 0.5),
        ("notion.internalIntegrationToken=a=b=c", "notion", "internalIntegrationToken", "a=b=c"),
        ("notion.internalIntegrationToken=", "notion", "internalIntegrationToken", ""),
        ("unknownServer.port=42", "unknownServer", "port", "42"),
    ],
)
def test_values_are_coerced_by_the_catalog_type(item: str, server: str, key: str,
                                                value: Any) -> None:
    parsed = parse_mcp((), (item,))[server][key]
    assert parsed == value
    assert type(parsed) is type(value)


@pytest.mark.parametrize("item", ["jetbrains.port=http", "redis.ssl=maybe", "jetbrains.port=1.5"])
def test_values_that_do_not_fit_the_type_are_refused(item: str) -> None:
    with pytest.raises(errors.InvalidTask, match=r"--mcp-config (jetbrains\.port|redis\.ssl)"):
        parse_mcp((), (item,))


def test_custom_github_servers_take_run_cmd_install_cmd_and_envs() -> None:
    mcp = parse_mcp((), ("github/acme/tools.js.run_cmd=npx -y .",
                         "github/acme/tools.js.install_cmd=npm ci",
                         "github/acme/tools.js.envs.API_KEY=${ACME_KEY}",
                         "github/acme/tools.js.envs.MODE=a=b"))
    assert mcp == {"github/acme/tools.js": {"run_cmd": "npx -y .", "install_cmd": "npm ci",
                                            "envs": {"API_KEY": "${ACME_KEY}", "MODE": "a=b"}}}


@pytest.mark.parametrize("item", ["notion", "notion=x", "", "=x", "notion.token"])
def test_malformed_items_are_refused_with_an_example(item: str) -> None:
    with pytest.raises(errors.InvalidTask) as exc:
        parse_mcp((), (item,))
    assert "NAME.key=value" in exc.value.message


# -- parse_pairs ------------------------------------------------------------------------------


def test_pairs_split_at_the_first_equals_sign() -> None:
    assert parse_pairs(("A=1", "B=x=y", "C=", "A=2"), "--env") == {"A": "2", "B": "x=y",
                                                                   "C": ""}


@pytest.mark.parametrize("item", ["A", "=1", ""])
def test_malformed_pairs_name_the_flag(item: str) -> None:
    with pytest.raises(errors.InvalidTask, match=r"--label .*KEY=VALUE"):
        parse_pairs((item,), "--label")


# -- read_prompt ------------------------------------------------------------------------------


def test_inline_prompt_is_taken_as_is() -> None:
    assert read_prompt("  hello $(x) `y`  ") == "  hello $(x) `y`  "


def test_prompt_from_a_file(tmp_path: Path) -> None:
    path = tmp_path / "prompt.md"
    path.write_bytes("Résumé ✓\n\n  indented\n".encode())
    assert read_prompt(f"@{path}") == "Résumé ✓\n\n  indented\n"


def test_prompt_file_keeps_its_line_endings(tmp_path: Path) -> None:
    # The prompt reaches the agent byte for byte; stdin already keeps \r\n, a file must too.
    path = tmp_path / "prompt.txt"
    path.write_bytes(b"line one\r\nline two\rend")
    assert read_prompt(f"@{path}") == "line one\r\nline two\rend"


def test_missing_prompt_file_is_an_invalid_task(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    with pytest.raises(errors.InvalidTask) as exc:
        read_prompt(f"@{missing}")
    assert str(missing) in exc.value.message
    assert "No such file" in exc.value.message


def test_prompt_file_that_is_not_utf8_is_an_invalid_task(tmp_path: Path) -> None:
    path = tmp_path / "binary.bin"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(errors.InvalidTask, match=str(path)):
        read_prompt(f"@{path}")


def test_dash_reads_stdin(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", io.StringIO("from stdin\r\nline 2"))
    assert read_prompt("-") == "from stdin\r\nline 2"


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_no_prompt_at_a_terminal_says_how_to_give_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.stdin", _Tty(""))
    with pytest.raises(errors.InvalidTask, match="@file"):
        read_prompt(None)


# -- `sandqueue submit` -------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _one_line(text: str) -> str:
    return " ".join(text.split())


@dataclass
class _Sent:
    calls: list[dict[str, Any]] = field(default_factory=list)

    def send_task(self, name: str, **kwargs: Any) -> None:
        kwargs.pop("producer", None)
        self.calls.append({"name": name, **kwargs})

    @property
    def amqp(self) -> Any:
        """Celery's message layer as the pipelined publisher uses it: route, build, send."""
        calls = self.calls

        class _Router:
            def route(self, options: dict[str, Any], *_: Any) -> dict[str, Any]:
                return {"queue": options["queue"]}

        class _Amqp:
            router = _Router()

            def create_task_message(self, task_id: str, name: str, args: list[Any],
                                    kwargs: dict[str, Any], **_: Any) -> dict[str, Any]:
                return {"name": name, "args": args, "task_id": task_id}

            def send_task_message(self, producer: Any, name: str, message: dict[str, Any],
                                  **options: Any) -> None:
                calls.append({**message, **options})

        return _Amqp()

    @contextmanager
    def producer_or_acquire(self) -> Iterator[Any]:
        """Celery's pipelined publishing: a producer whose batch() groups sends."""

        class _Producer:
            @contextmanager
            def batch(self, max_size: int) -> Iterator[None]:
                yield

            def maybe_declare(self, queue: Any) -> None:
                return None

        yield _Producer()


@dataclass
class _Broker:
    redis: fakeredis.FakeRedis
    celery: _Sent


@pytest.fixture
def broker(monkeypatch: pytest.MonkeyPatch) -> Iterator[_Broker]:
    """Redis and Celery replaced by fakes that record what a submit writes and sends."""
    fake = _Broker(fakeredis.FakeRedis(), _Sent())
    monkeypatch.setattr(Client, "redis", property(lambda self: fake.redis))
    monkeypatch.setattr(Client, "celery", property(lambda self: fake.celery))
    yield fake
    fake.redis.close()


def _submit(*args: str, redis_url: str | None = None, stdin: str | None = None) -> Result:
    url = redis_url or f"redis://127.0.0.1:{_free_port()}/0"
    return CliRunner().invoke(cli, ["--redis-url", url, "submit", *args], input=stdin)


def test_submit_sends_the_validated_task(broker: _Broker) -> None:
    result = _submit("hello 'world' $(x)", "--mcp", "jetbrains", "--mcp-config",
                     "jetbrains.port=63342", "--env", "SIM_LATENCY_S=0", "--label", "team=a",
                     "--max-attempts", "2")
    assert result.exit_code == 0, result.output
    [call] = broker.celery.calls
    assert call["name"] == TASK_NAME
    message = TaskMessage.model_validate(call["args"][0])
    assert message.task.prompt == "hello 'world' $(x)"
    assert message.task.mcp == {"jetbrains": {"port": 63342}}
    assert message.task.envs == {"SIM_LATENCY_S": "0"}
    assert message.task.labels == {"team": "a"}
    assert message.task.retry.max_attempts == 2
    assert result.stdout.strip() == call["task_id"]


def test_submit_reads_the_prompt_from_stdin(broker: _Broker) -> None:
    # (CliRunner's stdin translates \r\n, unlike a real pipe: see test_dash_reads_stdin)
    result = _submit(stdin="piped\n  prompt ✓ $(x)\n")
    assert result.exit_code == 0, result.output
    assert broker.celery.calls[0]["args"][0]["task"]["prompt"] == "piped\n  prompt ✓ $(x)\n"


def test_invalid_task_exits_2_and_submits_nothing(broker: _Broker) -> None:
    result = _submit("hello", "--mcp", "githubOffical")
    assert result.exit_code == 2
    assert result.stdout == ""
    stderr = _one_line(result.stderr)
    assert "unknown MCP server 'githubOffical'" in stderr
    assert "githubOfficial" in stderr
    assert broker.celery.calls == []
    assert broker.redis.keys("*") == []


def test_invalid_task_is_refused_before_redis_is_contacted() -> None:
    # Nothing listens on the port: reaching Redis would exit 3, validation exits 2 first.
    result = _submit("hello", "--mcp", "notoin")
    assert result.exit_code == 2, result.output
    assert "did you mean notion" in _one_line(result.stderr)


def test_inline_secret_without_sealing_keys_is_refused(broker: _Broker) -> None:
    result = _submit("hello", "--mcp", "notion", "--mcp-config",
                     "notion.internalIntegrationToken=ntn_plaintext_secret")
    assert result.exit_code == 2
    stderr = _one_line(result.stderr)
    assert "mcp.notion.internalIntegrationToken" in stderr
    assert "would travel through Redis in clear" in stderr
    assert "${ENV_NAME}" in stderr and "SANDQUEUE_SECRET_KEYS" in stderr
    assert "ntn_plaintext_secret" not in stderr
    assert broker.celery.calls == []


def test_missing_prompt_file_exits_2(tmp_path: Path) -> None:
    result = _submit(f"@{tmp_path / 'nope.md'}")
    assert result.exit_code == 2
    assert "cannot read prompt file" in _one_line(result.stderr)


def test_unreachable_redis_exits_3_with_a_clear_message() -> None:
    url = f"redis://127.0.0.1:{_free_port()}/0"
    result = _submit("hello", redis_url=url)
    assert result.exit_code == 3, result.output
    stderr = _one_line(result.stderr)
    assert f"cannot reach Redis at {url}" in stderr
    assert "REDIS_URL" in stderr
    assert result.stdout == ""
