"""The task's repo, files and collect fields: what is accepted, and what each refusal says."""

from __future__ import annotations

import base64

import pytest
from pydantic import ValidationError

from sandqueue.contract import MAX_INPUT_FILES_BYTES, AgentTask
from sandqueue.errors import describe


def refusal(**fields: object) -> str:
    with pytest.raises(ValidationError) as caught:
        AgentTask(prompt="p", **fields)  # type: ignore[arg-type]
    return describe(caught.value)


def test_accepted_forms() -> None:
    task = AgentTask(prompt="p", repo="ssh://git@github.com/a/b.git",
                     files=[{"path": "a/b.txt", "content": "x"},
                            {"path": "c.bin", "content": base64.b64encode(b"\0\1").decode(),
                             "encoding": "base64"}],
                     collect=["**/*.py", "out/[a-c]?.txt"])
    assert task.repo is not None and task.repo.depth == 1 and task.repo.ref is None
    assert [f.data() for f in task.files] == [b"x", b"\0\1"]
    for ref in ("main", "v1.2.3", "feature/x-y", "0" * 40, "release@2026"):
        assert AgentTask(prompt="p", repo={"url": "https://h/r.git", "ref": ref}).repo


@pytest.mark.parametrize(("fields", "message"), [
    ({"repo": "ext::sh -c touch% /tmp/x"}, "repo.url: repo.url must be an https://"),
    ({"repo": "-uhttps://h/r"}, "repo.url must be an https://"),
    ({"repo": "https://tok@github.com/a/b"}, "must not carry credentials"),
    ({"repo": {"url": "https://h/r", "ref": "--upload-pack=x"}}, "repo.ref: repo.ref"),
    ({"repo": {"url": "https://h/r", "ref": "a..b"}}, "no .."),
    ({"repo": {"url": "https://h/r", "token": "ghp_abc"}}, "${GITHUB_TOKEN}"),
    ({"repo": {"url": "https://h/r", "depth": -1}}, "repo.depth"),
    ({"files": [{"path": "/etc/x", "content": ""}]}, "files.0.path"),
    ({"files": [{"path": "a", "content": ""}, {"path": "a", "content": ""}]}, "same path"),
    ({"files": [{"path": "a", "content": "x" * (MAX_INPUT_FILES_BYTES + 1)}]},
     "put large inputs in a repository"),
    ({"files": [{"path": f"f{i}", "content": ""} for i in range(51)]}, "at most 50"),
    ({"collect": ["a/../../b"]}, "collect pattern"),
    ({"collect": [""]}, "collect.0"),
])
def test_refusals_say_what_is_wrong(fields: dict[str, object], message: str) -> None:
    assert message in refusal(**fields)


@pytest.mark.parametrize("pattern", ["../*", "/etc/**", "a/../../*.txt"])
def test_a_refused_collect_pattern_is_quoted_as_given(pattern: str) -> None:
    """The refusal names the pattern the user wrote, not a rewritten one ('../x')."""
    assert repr(pattern) in refusal(collect=[pattern])


def test_too_many_input_files_says_the_limit_and_what_to_do() -> None:
    said = refusal(files=[{"path": f"f{i}.txt", "content": "x"} for i in range(51)])
    assert "51 input files, at most 50 allowed" in said and "repo" in said
