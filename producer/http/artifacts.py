"""/v1/tasks/{id}/artifacts: the files a task brought back, listed and downloaded.

Only what the task's stored result lists can be downloaded, and only by its tenant (the
same 404 as the other task routes for someone else's task): the store itself is never
addressed by a name the caller makes up. The bytes are streamed from the artifact store
(sandqueue/artifacts.py) with their sha256 as the ETag, and checked against it as they go.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from producer.api import Client
from producer.http import records
from producer.http.auth import Caller, require
from producer.http.problems import Problem, not_found
from producer.http.tasks import ERRORS
from sandqueue.artifacts import ArtifactError, ArtifactNotFound, verified
from sandqueue.contract import AgentResult, ArtifactRef

router = APIRouter(prefix="/v1/tasks", tags=["artifacts"], responses=ERRORS)


def _refs(request: Request, caller: Caller, task_id: str) -> list[ArtifactRef]:
    client: Client = request.app.state.client
    records.owned_record(client, caller, task_id)
    stored = records.read_result(client, task_id)
    if stored is None:
        raise Problem(409, "not_finished", f"task {task_id} has not finished; its artifacts "
                      "are listed when it has")
    return AgentResult.model_validate(stored).artifacts


@router.get("/{task_id}/artifacts", response_model=list[ArtifactRef],
            responses={409: {"description": "the task has not finished"}})
def list_artifacts(request: Request, task_id: str,
                   caller: Annotated[Caller, Depends(require("read"))]) -> list[ArtifactRef]:
    """The task's artifacts as its result lists them (name, size, sha256, content type)."""
    return _refs(request, caller, task_id)


@router.get("/{task_id}/artifacts/{name:path}", response_class=StreamingResponse,
            responses={200: {"content": {"application/octet-stream": {}}},
                       409: {"description": "the task has not finished"}})
def download_artifact(request: Request, task_id: str, name: str,
                      caller: Annotated[Caller, Depends(require("read"))]) -> Any:
    """One artifact's bytes (`name` as listed, e.g. `repo.diff`, `files/out/report.md`)."""
    ref = next((r for r in _refs(request, caller, task_id) if r.name == name), None)
    if ref is None:
        raise not_found(f"artifact {name!r} of task {task_id}")
    store = request.app.state.client.artifact_store
    try:
        stream = store.open(task_id, name)
    except ArtifactNotFound as e:
        raise Problem(404, "not_found", f"artifact {name!r} of task {task_id} is listed by its "
                      "result but gone from the artifact store (expired or deleted)") from e
    except ArtifactError as e:
        raise Problem(503, "artifact_store_unavailable", e.message) from e

    def chunks() -> Iterator[bytes]:
        # A copy that no longer matches the result's sha256 ends the response short of its
        # Content-Length (the server logs why): no client takes it for the artifact.
        yield from verified(stream, ref, 256 * 1024)

    filename = quote(name.rsplit("/", 1)[-1])
    return StreamingResponse(chunks(), media_type=ref.content_type, headers={
        "Content-Length": str(ref.size), "ETag": f'"{ref.sha256}"',
        "Content-Disposition": f"attachment; filename*=UTF-8''{filename}"})
