"""`sandqueue template build`: a template with a pinned Claude Code, through the real `e2b`
template builder. Only `Template.build` (which would upload and poll E2B's API) is replaced,
by a subclass that binds its arguments to the SDK's real signature and keeps what would be
sent: the template as the SDK serialises it (`Template.to_json`)."""

from __future__ import annotations

import inspect
import json
from typing import Any, ClassVar

import e2b
import pytest
from e2b.template.types import BuildInfo

from sandqueue import errors
from sandqueue.settings import Settings
from worker.agent.claude_code import NPM_PACKAGE, PINNED_VERSION, ClaudeCodeAgent
from worker.sandbox.e2b import build_template

SETTINGS = Settings(_env_file=None, e2b_api_key="e2b_test_key")  # type: ignore[call-arg]


class RecordingTemplate(e2b.Template):
    builds: ClassVar[list[dict[str, Any]]] = []
    fail_with: ClassVar[BaseException | None] = None

    @classmethod
    def build(cls, template: Any, name: str | None = None, **kwargs: Any) -> BuildInfo:  # type: ignore[override]
        bound = inspect.signature(e2b.Template.build).bind(template, name, **kwargs)
        cls.builds.append({"steps": json.loads(e2b.Template.to_json(template)),
                           **bound.arguments})
        if cls.fail_with is not None:
            raise cls.fail_with
        return BuildInfo(template_id="tpl123", build_id="b456", name=name or "", alias="")


@pytest.fixture(autouse=True)
def _reset() -> None:
    RecordingTemplate.builds = []
    RecordingTemplate.fail_with = None


def agent() -> ClaudeCodeAgent:
    return ClaudeCodeAgent()


def test_the_build_installs_the_pinned_version_and_checks_it_as_the_sandbox_user() -> None:
    info = build_template(agent().template_recipe("2.1.230"), "sandqueue-claude", SETTINGS,
                          cpu_count=2, memory_mb=2048, template_cls=RecordingTemplate)
    assert info == {"template_id": "tpl123", "build_id": "b456", "name": "sandqueue-claude"}
    [build] = RecordingTemplate.builds
    assert build["steps"]["fromTemplate"] == "mcp-gateway"
    assert build["steps"]["steps"] == [
        {"type": "RUN", "args": [f"npm install -g {NPM_PACKAGE}@2.1.230", "root"],
         "force": False},
        {"type": "RUN", "args": ["claude --version", "user"], "force": False},
    ]
    assert build["cpu_count"] == 2 and build["memory_mb"] == 2048
    assert build["opts"]["api_key"] == "e2b_test_key"


def test_the_default_is_the_pinned_version() -> None:
    build_template(agent().template_recipe(), "t", SETTINGS, template_cls=RecordingTemplate)
    assert f"@{PINNED_VERSION}" in RecordingTemplate.builds[0]["steps"]["steps"][0]["args"][0]


def test_a_version_that_is_not_semver_is_refused_before_any_build() -> None:
    with pytest.raises(errors.ConfigError, match=r"X\.Y\.Z"):
        agent().template_recipe("latest; rm -rf /")


@pytest.mark.parametrize(("raised", "kind"), [
    (e2b.BuildException("claude: command not found"), errors.ConfigError),
    (e2b.AuthenticationException("Invalid API key"), errors.AuthError),
    (e2b.RateLimitException("429"), errors.RateLimited),
])
def test_build_failures_are_translated(raised: BaseException,
                                       kind: type[errors.SandqueueError]) -> None:
    RecordingTemplate.fail_with = raised
    with pytest.raises(kind) as e:
        build_template(agent().template_recipe(), "t", SETTINGS, template_cls=RecordingTemplate)
    assert e.value.__cause__ is raised


def test_the_cli_needs_an_e2b_key_and_says_which_template_to_set(
        monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from producer.cli import cli

    refused = CliRunner().invoke(cli, ["template", "build"])
    assert refused.exit_code == 2 and "E2B_API_KEY" in refused.stderr

    monkeypatch.setenv("E2B_API_KEY", "e2b_test_key")
    assert build_template.__kwdefaults__ is not None
    monkeypatch.setitem(build_template.__kwdefaults__, "template_cls", RecordingTemplate)
    done = CliRunner().invoke(cli, ["template", "build", "--claude-version", "2.1.230",
                                    "--json"])
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout) == {"template_id": "tpl123", "build_id": "b456",
                                       "name": "sandqueue-claude-code-2-1-230",
                                       "claude_version": "2.1.230"}
    assert "@2.1.230" in RecordingTemplate.builds[0]["steps"]["steps"][0]["args"][0]
