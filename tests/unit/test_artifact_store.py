"""The artifact store contract: the local directory and S3 (moto's server on loopback) stores
pass the same tests."""

from __future__ import annotations

import hashlib
import io
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from sandqueue.artifacts import (
    ArtifactDamaged,
    ArtifactError,
    ArtifactLimitExceeded,
    ArtifactLimits,
    ArtifactNotFound,
    ArtifactStore,
    LocalStore,
    S3Store,
    make_store,
    verified,
)
from sandqueue.contract import ArtifactRef
from sandqueue.settings import Settings

SECRET_KEY = "moto-secret-" + "k" * 20
LIMITS = ArtifactLimits(max_file_bytes=1000, max_task_bytes=2500, max_task_files=4)


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """moto's S3 in server mode: a real HTTP endpoint on a free loopback port."""
    moto_server = pytest.importorskip("moto.server")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _s3_store(endpoint: str, limits: ArtifactLimits) -> S3Store:
    import boto3

    bucket = f"b-{uuid.uuid4().hex[:12]}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="AKIDMOTO", aws_secret_access_key=SECRET_KEY)
    client.create_bucket(Bucket=bucket)
    return S3Store(bucket, prefix="sq/", client=client, limits=limits)


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> ArtifactStore:
    if request.param == "local":
        return LocalStore(tmp_path / "artifacts", LIMITS)
    return _s3_store(request.getfixturevalue("s3_endpoint"), LIMITS)


def test_put_then_get_list_delete_round_trip(store: ArtifactStore) -> None:
    data = bytes(range(256)) * 3
    ref = store.put("task-1", "files/out/a.bin", data, "application/octet-stream")
    assert ref.size == len(data)
    assert ref.sha256 == hashlib.sha256(data).hexdigest()
    assert not ref.truncated and ref.original_size is None
    assert (ref.path or ref.url)
    assert store.get("task-1", "files/out/a.bin") == data
    store.put("task-1", "repo.diff", b"diff --git a b\n", "text/x-diff")
    listed = store.list("task-1")
    assert [r.name for r in listed] == ["files/out/a.bin", "repo.diff"]
    assert listed[0] == ref
    assert listed[1].content_type == "text/x-diff"
    assert store.list("another-task") == []
    assert store.delete("task-1", "repo.diff") == 1
    assert store.delete("task-1", "repo.diff") == 0
    assert store.delete("task-1") == 1
    assert store.list("task-1") == []


def test_put_from_a_stream_and_replace_by_name(store: ArtifactStore) -> None:
    store.put("t", "a.txt", io.BytesIO(b"first"))
    ref = store.put("t", "a.txt", io.BytesIO(b"second"), "text/plain")
    assert store.get("t", "a.txt") == b"second"
    assert [r.sha256 for r in store.list("t")] == [ref.sha256]


def test_a_file_over_the_per_file_limit_is_truncated_and_says_so(store: ArtifactStore) -> None:
    data = b"x" * 999 + b"y" * 1500
    ref = store.put("t", "big.log", data, original_size=len(data))
    assert ref.truncated and ref.size == 1000 and ref.original_size == len(data)
    assert store.get("t", "big.log") == data[:1000]
    assert ref.sha256 == hashlib.sha256(data[:1000]).hexdigest()
    listed = store.list("t")[0]
    assert listed.truncated and listed.original_size == len(data)


def test_a_stream_over_the_limit_is_truncated_even_without_its_size(
        store: ArtifactStore) -> None:
    ref = store.put("t", "stream.bin", io.BytesIO(b"z" * 5000))
    assert ref.truncated and ref.size == 1000 and ref.original_size is None


def test_the_per_task_byte_budget_truncates_what_no_longer_fits(store: ArtifactStore) -> None:
    store.put("t", "a", b"a" * 1000)
    store.put("t", "b", b"b" * 1000)
    ref = store.put("t", "c", b"c" * 1000)
    assert ref.truncated and ref.size == 500 and ref.original_size is None
    assert sum(r.size for r in store.list("t")) == LIMITS.max_task_bytes


def test_the_per_task_count_limit_refuses_more_files(store: ArtifactStore) -> None:
    for i in range(4):
        store.put("t", f"f{i}", b"1")
    with pytest.raises(ArtifactLimitExceeded, match="limit 4"):
        store.put("t", "f4", b"1")
    store.put("t", "f0", b"replacing one is not one more")


def test_missing_artifacts_and_bad_names_are_clear_errors(store: ArtifactStore) -> None:
    with pytest.raises(ArtifactNotFound, match="no artifact 'nope'"):
        store.get("t", "nope")
    for bad in ("../escape", "/abs", "a//b", "a/./b", ""):
        with pytest.raises(ArtifactError, match="relative path"):
            store.put("t", bad, b"x")
    with pytest.raises(ArtifactError, match="cannot name artifacts"):
        store.put("../t", "a", b"x")


def test_local_store_never_leaves_a_half_written_file(tmp_path: Path) -> None:
    store = LocalStore(tmp_path, LIMITS)

    class Broken(io.RawIOBase):
        def readable(self) -> bool:
            return True

        def readinto(self, buffer: bytearray) -> int:  # type: ignore[override]
            raise OSError("the sandbox went away mid-read")

    with pytest.raises(OSError):
        store.put("t", "a", Broken())  # type: ignore[arg-type]
    assert store.list("t") == []
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]


def test_s3_store_from_settings_keeps_the_secret_out_of_refs_and_logs(
        s3_endpoint: str, caplog: pytest.LogCaptureFixture) -> None:
    import boto3

    caplog.set_level(logging.DEBUG)
    boto3.client("s3", endpoint_url=s3_endpoint, region_name="us-east-1",
                 aws_access_key_id="AKIDMOTO",
                 aws_secret_access_key=SECRET_KEY).create_bucket(Bucket="from-settings")
    settings = Settings(artifact_store="s3", s3_endpoint_url=s3_endpoint,
                        s3_bucket="from-settings", s3_region="us-east-1",
                        s3_access_key_id="AKIDMOTO", s3_secret_access_key=SECRET_KEY)
    store = make_store(settings)
    ref = store.put("t", "a.txt", b"hello", "text/plain")
    assert ref.url == "s3://from-settings/sandqueue/t/a.txt"
    assert SECRET_KEY not in ref.model_dump_json()
    assert SECRET_KEY not in repr(settings)
    assert SECRET_KEY not in caplog.text
    assert isinstance(store, S3Store)
    assert store.presigned_url("t", "a.txt").startswith(s3_endpoint)


def test_s3_store_without_a_bucket_is_a_config_error() -> None:
    from sandqueue.errors import ConfigError

    with pytest.raises(ConfigError, match="SANDQUEUE_S3_BUCKET"):
        make_store(Settings(artifact_store="s3", s3_region="us-east-1"))


def test_compose_shares_the_local_store_and_has_minio_under_the_s3_profile() -> None:
    import yaml

    services = yaml.safe_load((Path(__file__).parents[2] / "docker-compose.yml")
                              .read_text())["services"]
    for name in ("worker", "api"):  # writers and readers must see the same directory
        assert services[name]["environment"]["SANDQUEUE_ARTIFACT_DIR"] == "/artifacts"
        assert "artifacts:/artifacts" in services[name]["volumes"]
    assert services["minio"]["profiles"] == ["s3"]
    assert services["minio-bucket"]["profiles"] == ["s3"]
    assert "mb --ignore-existing local/sandqueue" in services["minio-bucket"]["entrypoint"][-1]


def test_download_checks_the_sha256_the_result_lists(tmp_path: Path) -> None:
    from producer.api import download

    store = LocalStore(tmp_path / "store", LIMITS)
    good = store.put("t", "files/out/a.txt", b"as collected")
    bad = store.put("t", "b.txt", b"original")
    assert bad.path is not None
    Path(bad.path).write_bytes(b"tampered")
    out = tmp_path / "out"
    assert download(store, "t", [good], out) == [out / "files/out/a.txt"]
    assert (out / "files/out/a.txt").read_bytes() == b"as collected"
    with pytest.raises(ArtifactError, match="do not match the size and sha256"):
        download(store, "t", [good, bad], out, ["b.txt"])
    assert not (out / "b.txt").exists()
    with pytest.raises(ArtifactNotFound, match=r"no artifact c\.txt"):
        download(store, "t", [good, bad], out, ["c.txt"])


def test_check_reports_an_s3_bucket_workers_could_not_write_to(s3_endpoint: str) -> None:
    """`sandqueue check` names a missing bucket (exit 2) instead of saying all is well while
    every task's artifacts end up as warnings."""
    from producer.check import run_checks

    store = _s3_store(s3_endpoint, LIMITS)
    options = {"redis_url": "redis://127.0.0.1:1/0", "artifact_store": "s3",
               "s3_endpoint_url": s3_endpoint, "s3_region": "us-east-1",
               "s3_access_key_id": "AKIDMOTO", "s3_secret_access_key": SECRET_KEY}
    report = run_checks({**options, "s3_bucket": "no-such-bucket-here"})
    (item,) = [c for c in report["checks"] if c["name"] == "artifacts"]
    assert item["state"] == "fail" and "no-such-bucket-here" in item["detail"]
    assert report["exit_code"] == 2 and SECRET_KEY not in str(report)
    report = run_checks({**options, "s3_bucket": store.bucket})
    (item,) = [c for c in report["checks"] if c["name"] == "artifacts"]
    assert item["state"] == "ok", item


def test_a_verified_read_holds_back_the_last_chunk_of_a_damaged_copy() -> None:
    # What HTTP downloads rely on: a reader never gets every byte of a copy that fails the
    # check, so its Content-Length is not met and no client takes it for the artifact
    data = bytes(range(256)) * 40
    ref = ArtifactRef(name="a.bin", size=len(data), sha256=hashlib.sha256(data).hexdigest())
    assert b"".join(verified(io.BytesIO(data), ref, chunk_size=1000)) == data
    damaged = data[:-1] + b"x"
    got: list[bytes] = []
    with pytest.raises(ArtifactDamaged, match=r"a\.bin"):
        for chunk in verified(io.BytesIO(damaged), ref, chunk_size=1000):
            got.append(chunk)
    assert 0 < len(b"".join(got)) < len(data)
    with pytest.raises(ArtifactDamaged):  # shorter (a truncated copy) is damaged too
        b"".join(verified(io.BytesIO(data[:-10]), ref, chunk_size=1000))
    longer: list[bytes] = []  # and longer: refused before a byte past the size goes out
    with pytest.raises(ArtifactDamaged):
        for chunk in verified(io.BytesIO(data + b"more"), ref, chunk_size=1000):
            longer.append(chunk)
    assert len(b"".join(longer)) < len(data)


def test_a_download_brings_back_the_intact_artifacts_and_names_the_damaged(
        tmp_path: Path) -> None:
    from producer.api import download

    store = LocalStore(tmp_path / "store")
    refs = [store.put("t-1", name, name.encode() * 10) for name in ("a.txt", "b.txt", "c.txt")]
    store.put("t-1", "a.txt", b"X" * 50)  # changed in the store after the result listed it
    with pytest.raises(ArtifactDamaged, match=r"a\.txt.*2 other artifact\(s\) downloaded"):
        download(store, "t-1", refs, tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["b.txt", "c.txt"]
    assert (tmp_path / "out" / "c.txt").read_bytes() == b"c.txt" * 10
