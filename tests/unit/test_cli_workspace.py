"""`sandqueue submit --repo/--ref/--repo-token/--file/--collect`: what reaches the task."""

from __future__ import annotations

import base64
import json
from pathlib import Path

from sandqueue.contract import TaskMessage
from tests.unit.test_cli_parsing import _Broker, _submit, broker  # noqa: F401  (fixture)


def test_repo_files_and_collect_reach_the_task(broker: _Broker, tmp_path: Path) -> None:  # noqa: F811
    text = tmp_path / "notes.md"
    text.write_text("naïve notes\n")
    blob = tmp_path / "image.png"
    blob.write_bytes(b"\x89PNG\r\n\x1a\n\xff\x00")
    result = _submit("fix it", "--repo", "https://github.com/acme/api.git", "--ref", "v1.2",
                     "--repo-depth", "0", "--repo-token", "${GITHUB_TOKEN}",
                     "--file", str(text), "--file", f"{blob}:assets/logo.png",
                     "--collect", "out/**", "--collect", "*.log")
    assert result.exit_code == 0, result.output
    task = TaskMessage.model_validate(broker.celery.calls[0]["args"][0]).task
    assert task.repo is not None
    assert (task.repo.url, task.repo.ref, task.repo.depth, task.repo.token) == (
        "https://github.com/acme/api.git", "v1.2", 0, "${GITHUB_TOKEN}")
    assert [(f.path, f.encoding, f.data()) for f in task.files] == [
        ("notes.md", "text", "naïve notes\n".encode()),
        ("assets/logo.png", "base64", blob.read_bytes())]
    assert task.collect == ["out/**", "*.log"]
    assert base64.b64decode(task.files[1].content) == blob.read_bytes()


def test_bad_workspace_options_exit_2_and_submit_nothing(broker: _Broker,  # noqa: F811
                                                         tmp_path: Path) -> None:
    cases = [
        (["--ref", "main"], "need --repo URL"),
        (["--file", str(tmp_path / "missing.txt")], "no such local file"),
        (["--repo", "https://github.com/a/b.git", "--repo-token", "ghp_inline"],
         "must be a ${NAME} reference"),
        (["--collect", "../up.txt"], "relative path"),
        (["--repo", "https://user:pw@github.com/a/b.git"], "must not carry credentials"),
    ]
    for args, message in cases:
        result = _submit("x", "--json", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in json.loads(result.stdout)["message"], result.stdout
    assert broker.celery.calls == []


# -- batches: one task per repository ----------------------------------------------------------


def test_batch_lines_get_their_own_repo_and_the_default_token(tmp_path: Path) -> None:
    from producer.batch import load_inputs
    from tests.unit.test_batch_input import _prepare

    source = tmp_path / "repos.csv"
    source.write_text("id,repo,ref\napi,https://github.com/acme/api.git,main\n"
                      "web,https://github.com/acme/web.git,\nnone,,\n")
    inputs = load_inputs(source, prepare=_prepare, template="Lint {id}", defaults={
        "repo": {"token": "${GITHUB_TOKEN}"}, "collect": ["*.log"]})
    repos = {i.key: i.task.repo for i in inputs}
    api, web = repos["api"], repos["web"]
    assert api is not None and web is not None and repos["none"] is None
    assert (api.url, api.ref, api.token) == ("https://github.com/acme/api.git", "main",
                                             "${GITHUB_TOKEN}")
    assert (web.url, web.ref, web.token) == ("https://github.com/acme/web.git", None,
                                             "${GITHUB_TOKEN}")
    assert all(i.task.collect == ["*.log"] for i in inputs)

    jsonl = tmp_path / "repos.jsonl"
    jsonl.write_text(json.dumps({"id": "a", "prompt": "p", "repo": "https://x.example/a.git"})
                     + "\n")
    (only,) = load_inputs(jsonl, prepare=_prepare, defaults={"repo": {"token": "${T}"}})
    assert only.task.repo is not None and only.task.repo.token == "${T}"
