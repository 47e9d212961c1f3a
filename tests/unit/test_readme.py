"""The README is a contract with users: its settings table and commands must stay true."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

from click.testing import CliRunner

from producer.cli import cli
from sandqueue.contract import ErrorCategory

ROOT = Path(__file__).resolve().parents[2]


def _settings_table_module():  # type: ignore[no-untyped-def]
    spec = importlib.util.spec_from_file_location("settings_table",
                                                  ROOT / "scripts" / "settings_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_settings_table_matches_the_settings_class() -> None:
    """Given the Settings class, the README's table is exactly what the script renders."""
    module = _settings_table_module()
    readme = (ROOT / "README.md").read_text()
    assert module.render(readme) == readme, "run: python scripts/settings_table.py --write"


def test_every_cli_command_in_the_readme_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    used = set(re.findall(r"^sandqueue ([a-z]+)", readme, flags=re.M))
    assert used, "the README shows no sandqueue commands"
    runner = CliRunner()
    for command in sorted(used):
        outcome = runner.invoke(cli, [command, "--help"])
        assert outcome.exit_code == 0, f"sandqueue {command} --help failed: {outcome.output}"


def test_readme_names_exactly_two_setup_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("## ", 1)[0]
    commands = re.findall(r"^make (\w+)", quick, flags=re.M)
    assert commands == ["demo", "test"]
    makefile = (ROOT / "Makefile").read_text()
    for target in commands:
        assert re.search(rf"^{target}:", makefile, flags=re.M), target


def test_readme_did_you_mean_examples_are_what_the_cli_suggests() -> None:
    """`(typo` → `name)` examples: the typo is not a catalog server (`github` is one, so it
    gets no suggestion) and the suggestion is among those the CLI gives for it."""
    from sandqueue import catalog

    readme = (ROOT / "README.md").read_text()
    examples = re.findall(r"`([\w/-]+)` → `([\w/-]+)`", readme)
    assert examples, "the README shows no did-you-mean example"
    names = catalog.server_names()
    for typo, suggested in examples:
        assert typo not in names, f"`{typo}` is itself a catalog server"
        assert suggested in catalog.closest(typo, names), (typo, suggested)


def test_readme_states_the_prompt_size_limit() -> None:
    from sandqueue.contract import MAX_PROMPT_BYTES

    readme = " ".join((ROOT / "README.md").read_text().split())
    assert f"A prompt may be up to {MAX_PROMPT_BYTES // 1024} KiB" in readme


def test_readme_error_table_names_every_category() -> None:
    """Every category a result can carry is explained to users, `internal` included."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("| category | meaning | retried |", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"^\| `([a-z_]+)` \|", table, flags=re.M))
    assert listed == {c.value for c in ErrorCategory}


def test_the_typescript_example_long_polls_the_result_after_the_result_event() -> None:
    """A worker publishes the `result` event just before it stores the result, so a plain
    GET right after the event can still answer 202 (pending): the example must wait."""
    readme = (ROOT / "README.md").read_text()
    example = readme.split("```ts", 1)[1].split("```", 1)[0]
    fetches = re.findall(r"fetch\(`\$\{API\}(/v1/tasks/\$\{id\}/result[^`]*)`", example)
    assert fetches and all("?wait=" in f for f in fetches), fetches
