"""The artifact store: where the files a task brings back are kept, behind one small interface.

Results in Redis only ever list artifacts (`ArtifactRef`: name, size, sha256, content type,
path or URL); the bytes go to a store:

    ArtifactStore                 put / get / open / list / delete, limits enforced in put
    ├── LocalStore                a directory (default; one machine, the demo, tests)
    └── S3Store                   S3-compatible object storage (fleets): boto3, any endpoint

Limits (`ArtifactLimits`): per file, bytes; per task, bytes and count. A file over a limit
is stored truncated and its ref says so (`truncated`, `original_size`); a file beyond the
task's count is refused with `ArtifactLimitExceeded`, which callers record as a warning.
Never silent.

Layout, in both stores: `<task_id>/<name>` for the bytes, the ref's other fields beside them
(a JSON sidecar locally, object metadata in S3), so `list` needs no index of its own.
"""

from __future__ import annotations

import abc
import hashlib
import io
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from sandqueue.contract import ArtifactRef
from sandqueue.errors import ConfigError, SandqueueError

if TYPE_CHECKING:
    from sandqueue.settings import Settings

CHUNK = 1024 * 1024
_TASK_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,199}\Z")
_NAME_PART = re.compile(r"^[^\x00-\x1f/\\]{1,255}\Z")


class ArtifactError(SandqueueError):
    """The store failed or was asked for something it cannot do."""


class ArtifactNotFound(ArtifactError):
    pass


class ArtifactDamaged(ArtifactError):
    """The stored bytes are not those the result lists (their sha256 differs): retrying the
    read cannot mend that."""


class ArtifactLimitExceeded(ArtifactError):
    """The task already has as many artifacts, or bytes, as the limits allow."""


@dataclass(frozen=True)
class ArtifactLimits:
    max_file_bytes: int = 10 * 1024 * 1024
    max_task_bytes: int = 100 * 1024 * 1024
    max_task_files: int = 200


def check_task_id(task_id: str) -> str:
    if not _TASK_ID.match(task_id):
        raise ArtifactError(f"task id {task_id[:80]!r} cannot name artifacts "
                            "(letters, digits, . _ : -)")
    return task_id


def check_name(name: str) -> str:
    """Artifact names are relative paths (`files/src/a.py`) with no way out of the task."""
    parts = name.split("/")
    if len(name) > 1024 or not all(_NAME_PART.match(p) and p not in (".", "..")
                                   for p in parts):
        raise ArtifactError(f"artifact name {name[:80]!r} must be a relative path of "
                            "plain parts (no empty, . or .. parts, no control characters)")
    return name


def _as_stream(data: bytes | BinaryIO) -> BinaryIO:
    return io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data


class ArtifactStore(abc.ABC):
    """Where artifacts live. Every method is safe to call from many threads at once."""

    kind: str

    def __init__(self, limits: ArtifactLimits | None = None) -> None:
        self.limits = limits or ArtifactLimits()

    def put(self, task_id: str, name: str, data: bytes | BinaryIO,
            content_type: str = "application/octet-stream", *,
            original_size: int | None = None) -> ArtifactRef:
        """Store `data` (bytes or a binary stream, read once) as the task's artifact `name`,
        replacing one of that name; truncated to what the limits leave. `original_size`:
        the file's full size, when the caller knows it (e.g. it read only a prefix)."""
        check_task_id(task_id)
        check_name(name)
        existing = self._sizes(task_id)
        existing.pop(name, None)
        if len(existing) >= self.limits.max_task_files:
            raise ArtifactLimitExceeded(
                f"{name}: not stored, the task already has {len(existing)} artifacts "
                f"(limit {self.limits.max_task_files})")
        budget = self.limits.max_task_bytes - sum(existing.values())
        cap = max(0, min(self.limits.max_file_bytes, budget))
        with tempfile.SpooledTemporaryFile(max_size=CHUNK) as spool:
            size, digest, more = _copy_capped(_as_stream(data), spool, cap)
            spool.seek(0)
            truncated = bool(more) or (original_size is not None and original_size > size)
            ref = ArtifactRef(name=name, size=size, sha256=digest, content_type=content_type,
                              truncated=truncated,
                              original_size=original_size if truncated else None)
            return self._write(task_id, ref, spool)  # type: ignore[arg-type]

    def _sizes(self, task_id: str) -> dict[str, int]:
        """The task's artifacts and their sizes: what the limits count."""
        return {r.name: r.size for r in self.list(task_id)}

    def get(self, task_id: str, name: str) -> bytes:
        with self.open(task_id, name) as stream:
            return stream.read()

    @abc.abstractmethod
    def _write(self, task_id: str, ref: ArtifactRef, stream: BinaryIO) -> ArtifactRef:
        """Store the (already capped) bytes and the ref; return the ref with its location."""

    @abc.abstractmethod
    def open(self, task_id: str, name: str) -> BinaryIO:
        """A binary stream of the artifact; ArtifactNotFound when there is none."""

    @abc.abstractmethod
    def list(self, task_id: str) -> list[ArtifactRef]:
        """The task's artifacts, sorted by name ([] for a task with none)."""

    @abc.abstractmethod
    def delete(self, task_id: str, name: str | None = None) -> int:
        """Delete one artifact, or all of the task's (name None); return how many."""


def verified(stream: BinaryIO, ref: ArtifactRef, chunk_size: int = CHUNK) -> Iterator[bytes]:
    """The stream's bytes in chunks, checked against the size and sha256 its result lists.

    The last chunk is held back until the check passes: on a mismatch ArtifactDamaged is
    raised instead of it, so a reader (a file being written, an HTTP body with its
    Content-Length) never ends up with the whole of a damaged or replaced copy. Closes the
    stream."""
    digest, size, held = hashlib.sha256(), 0, b""
    damaged = ArtifactDamaged(f"{ref.name}: the stored bytes do not match the size and sha256 "
                              "the result lists (changed or damaged in the store)")
    with stream:
        while chunk := stream.read(chunk_size):
            digest.update(chunk)
            size += len(chunk)
            if size > ref.size:  # longer: said before a byte beyond the listed size goes out
                raise damaged
            if held:
                yield held
            held = chunk
    if size != ref.size or digest.hexdigest() != ref.sha256:
        raise damaged
    if held:
        yield held


def _copy_capped(src: BinaryIO, dst: BinaryIO, cap: int) -> tuple[int, str, int]:
    """Copy at most `cap` bytes; return (copied, sha256 of them, bytes seen beyond cap).

    The bytes beyond the cap are counted (to record the original size) but only up to one
    more chunk: a huge stream is not read to its end just to be measured."""
    digest = hashlib.sha256()
    copied = 0
    while copied < cap:
        chunk = src.read(min(CHUNK, cap - copied))
        if not chunk:
            return copied, digest.hexdigest(), 0
        digest.update(chunk)
        dst.write(chunk)
        copied += len(chunk)
    beyond = len(src.read(CHUNK))
    return copied, digest.hexdigest(), beyond


class LocalStore(ArtifactStore):
    """Artifacts in a directory: `<root>/<task_id>/data/<name>` and `.../meta/<name>.json`."""

    kind = "local"

    def __init__(self, root: str | os.PathLike[str],
                 limits: ArtifactLimits | None = None) -> None:
        super().__init__(limits)
        self.root = Path(root).expanduser().resolve()

    def _paths(self, task_id: str, name: str) -> tuple[Path, Path]:
        base = self.root / check_task_id(task_id)
        return base / "data" / check_name(name), base / "meta" / f"{name}.json"

    def _write(self, task_id: str, ref: ArtifactRef, stream: BinaryIO) -> ArtifactRef:
        data, meta = self._paths(task_id, ref.name)
        ref = ref.model_copy(update={"path": str(data)})
        for target in (data, meta):
            target.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(data, stream)
        _atomic_write(meta, io.BytesIO(ref.model_dump_json().encode()))
        return ref

    def open(self, task_id: str, name: str) -> BinaryIO:
        data, meta = self._paths(task_id, name)
        missing = (f"task {task_id} has no artifact {name!r} in {self.root} (the workers "
                   "that ran it must write to this directory: share it, or use "
                   "SANDQUEUE_ARTIFACT_STORE=s3)")
        if not meta.is_file():
            raise ArtifactNotFound(missing)
        try:
            return data.open("rb")
        except FileNotFoundError as e:
            raise ArtifactNotFound(missing) from e

    def list(self, task_id: str) -> list[ArtifactRef]:
        meta_dir = self.root / check_task_id(task_id) / "meta"
        refs = [ArtifactRef.model_validate_json(p.read_bytes())
                for p in meta_dir.rglob("*.json") if p.is_file()]
        return sorted(refs, key=lambda r: r.name)

    def delete(self, task_id: str, name: str | None = None) -> int:
        if name is None:
            count = len(self.list(task_id))
            shutil.rmtree(self.root / check_task_id(task_id), ignore_errors=True)
            return count
        data, meta = self._paths(task_id, name)
        found = meta.is_file()
        for path in (meta, data):
            path.unlink(missing_ok=True)
        return int(found)


def _atomic_write(path: Path, stream: BinaryIO) -> None:
    """Write to a temporary file beside `path`, then rename: a reader never sees half."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as out:
            shutil.copyfileobj(stream, out, CHUNK)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class S3Store(ArtifactStore):
    """Artifacts in an S3-compatible bucket (AWS, MinIO, R2, ...), key `<prefix><task>/<name>`.

    Results carry `s3://bucket/key`, not presigned URLs: a presigned URL is a bearer
    credential that would sit in Redis for as long as the result does and expires before
    it (SigV4: 7 days at most). Downloads go through the store (`sandqueue artifacts`, the
    handle, the HTTP API), with the reader's own credentials and the API's tenant check;
    `presigned_url` makes a short-lived link on demand.
    """

    kind = "s3"

    def __init__(self, bucket: str, *, prefix: str = "", client: Any = None,
                 limits: ArtifactLimits | None = None, **client_options: Any) -> None:
        super().__init__(limits)
        if not bucket:
            raise ConfigError("SANDQUEUE_S3_BUCKET is not set; the s3 artifact store needs "
                              "a bucket")
        self.bucket = bucket
        self.prefix = prefix
        if client is None:
            import boto3  # only a fleet with an S3 store needs boto3

            client = boto3.client("s3", **client_options)
        self.client = client

    def _key(self, task_id: str, name: str = "") -> str:
        return f"{self.prefix}{check_task_id(task_id)}/{name}"

    def _write(self, task_id: str, ref: ArtifactRef, stream: BinaryIO) -> ArtifactRef:
        key = self._key(task_id, ref.name)
        ref = ref.model_copy(update={"url": f"s3://{self.bucket}/{key}"})
        meta = {"sha256": ref.sha256, "truncated": "1" if ref.truncated else "0",
                "original-size": str(ref.original_size or "")}
        with _s3_errors(f"storing {ref.name}"):
            self.client.upload_fileobj(stream, self.bucket, key, ExtraArgs={
                "ContentType": ref.content_type, "Metadata": meta})
        return ref

    def open(self, task_id: str, name: str) -> BinaryIO:
        with _s3_errors(f"reading {name}"):
            try:
                obj = self.client.get_object(Bucket=self.bucket, Key=self._key(task_id, name))
            except self.client.exceptions.NoSuchKey as e:
                raise ArtifactNotFound(f"task {task_id} has no artifact {name!r}") from e
        return obj["Body"]  # type: ignore[no-any-return]

    def list(self, task_id: str) -> list[ArtifactRef]:
        base = self._key(task_id)
        refs = []
        with _s3_errors(f"listing the artifacts of {task_id}"):
            for key in self._keys(base):
                head = self.client.head_object(Bucket=self.bucket, Key=key)
                meta = head.get("Metadata", {})
                refs.append(ArtifactRef(
                    name=key[len(base):], size=head["ContentLength"],
                    sha256=meta.get("sha256", ""), url=f"s3://{self.bucket}/{key}",
                    content_type=head.get("ContentType", "application/octet-stream"),
                    truncated=meta.get("truncated") == "1",
                    original_size=int(meta["original-size"])
                    if meta.get("original-size") else None))
        return sorted(refs, key=lambda r: r.name)

    def _keys(self, prefix: str) -> Iterator[str]:
        yield from self._objects(prefix)

    def _objects(self, prefix: str) -> dict[str, int]:
        objects = {}
        pages = self.client.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=prefix)
        for page in pages:
            for item in page.get("Contents", []):
                objects[item["Key"]] = item["Size"]
        return objects

    def _sizes(self, task_id: str) -> dict[str, int]:
        """One LIST (no HEAD per object): put() asks this every time."""
        base = self._key(task_id)
        with _s3_errors(f"listing the artifacts of {task_id}"):
            return {key[len(base):]: size for key, size in self._objects(base).items()}

    def delete(self, task_id: str, name: str | None = None) -> int:
        keys = ([self._key(task_id, check_name(name))] if name is not None
                else list(self._keys(self._key(task_id))))
        found = 0
        with _s3_errors(f"deleting the artifacts of {task_id}"):
            for key in keys:
                if name is not None:
                    try:
                        self.client.head_object(Bucket=self.bucket, Key=key)
                    except self.client.exceptions.ClientError:
                        continue
                self.client.delete_object(Bucket=self.bucket, Key=key)
                found += 1
        return found

    def presigned_url(self, task_id: str, name: str, expires_s: int = 3600) -> str:
        return str(self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(task_id, name)},
            ExpiresIn=expires_s))

@contextmanager
def _s3_errors(doing: str) -> Iterator[None]:
    """botocore errors as ArtifactError, naming what failed and never the credentials."""
    try:
        yield
    except ArtifactError:
        raise
    except Exception as e:
        if type(e).__module__.startswith(("botocore", "boto3", "s3transfer")):
            raise ArtifactError(f"artifact store: {doing}: {e}") from e
        raise


def make_store(settings: Settings) -> ArtifactStore:
    """The store the settings ask for (SANDQUEUE_ARTIFACT_STORE)."""
    limits = ArtifactLimits(max_file_bytes=settings.artifact_max_file_bytes,
                            max_task_bytes=settings.artifact_max_task_bytes,
                            max_task_files=settings.artifact_max_task_files)
    if settings.artifact_store == "local":
        return LocalStore(settings.artifact_dir, limits)
    options: dict[str, Any] = {"endpoint_url": settings.s3_endpoint_url,
                               "region_name": settings.s3_region}
    if settings.s3_access_key_id and settings.s3_secret_access_key:
        options["aws_access_key_id"] = settings.s3_access_key_id
        options["aws_secret_access_key"] = settings.s3_secret_access_key.get_secret_value()
    return S3Store(settings.s3_bucket or "", prefix=settings.s3_prefix, limits=limits,
                   **options)


def guess_type(name: str) -> str:
    import mimetypes

    if name.endswith((".diff", ".patch")):
        return "text/x-diff"
    return mimetypes.guess_type(name)[0] or "application/octet-stream"
