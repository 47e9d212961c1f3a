"""Reading and listing sandbox files through the seam: E2B (the real SDK against the fake
envd) and the simulated sandbox behave the same."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest

from sandqueue import errors
from sandqueue.settings import Settings
from tests.fakes.e2b_sdk import FakeE2BCloud
from tests.unit.test_e2b_provider import make_provider, make_spec
from worker.sandbox.base import Sandbox, SandboxSpec
from worker.sandbox.sim import SimProvider

BLOB = bytes(range(256)) * 40 + "naïve 日本語".encode()


@pytest.fixture(params=["e2b", "sim"])
def sandbox(request: pytest.FixtureRequest) -> Iterator[Sandbox]:
    if request.param == "e2b":
        cloud = FakeE2BCloud(api_key="e2b_test_key", templates=("mcp-gateway",))
        box = make_provider(cloud).create(make_spec())
    else:
        settings = Settings(_env_file=None, sandbox="sim", sim_create_latency_s=0)  # type: ignore[call-arg]
        box = SimProvider(settings).create(SandboxSpec(
            task_id=str(uuid.uuid4()), attempt=1, lifetime_s=60, deadline_at=time.time() + 60))
    yield box
    box.kill()


def test_read_file_is_byte_exact_and_stops_at_max_bytes(sandbox: Sandbox) -> None:
    sandbox.write_file("/home/user/out/data.bin", BLOB)
    assert sandbox.read_file("/home/user/out/data.bin") == BLOB
    assert sandbox.read_file("/home/user/out/data.bin", max_bytes=100) == BLOB[:100]


def test_a_missing_file_is_file_not_found_not_a_bad_template(sandbox: Sandbox) -> None:
    with pytest.raises(errors.SandboxFileNotFound, match="no such file"):
        sandbox.read_file("/home/user/nope.txt")
    with pytest.raises(errors.SandboxFileNotFound):
        sandbox.list_files("/home/user/no-such-dir", depth=3)


def test_list_files_walks_to_the_depth_asked(sandbox: Sandbox) -> None:
    sandbox.write_file("/home/user/w/a.txt", b"abc")
    sandbox.write_file("/home/user/w/sub/b.txt", b"hello")
    sandbox.write_file("/home/user/w/sub/deeper/c.txt", b"x")
    deep = {e.path: (e.size, e.is_dir) for e in sandbox.list_files("/home/user/w", depth=5)}
    assert deep == {"/home/user/w/a.txt": (3, False), "/home/user/w/sub": (4096, True),
                    "/home/user/w/sub/b.txt": (5, False),
                    "/home/user/w/sub/deeper": (4096, True),
                    "/home/user/w/sub/deeper/c.txt": (1, False)}
    shallow = {e.path for e in sandbox.list_files("/home/user/w", depth=1)}
    assert shallow == {"/home/user/w/a.txt", "/home/user/w/sub"}


def test_a_killed_sandbox_is_unavailable_not_missing_files(sandbox: Sandbox) -> None:
    sandbox.write_file("/home/user/a.txt", b"abc")
    sandbox.kill()
    for call in (lambda: sandbox.read_file("/home/user/a.txt"),
                 lambda: sandbox.list_files("/home/user", depth=2)):
        with pytest.raises(errors.SandqueueError) as caught:
            call()
        assert not isinstance(caught.value, errors.SandboxFileNotFound)
        assert caught.value.retryable  # SandboxUnavailable, as for any call to a dead one


def test_files_written_before_and_after_a_listing_read_back(sandbox: Sandbox) -> None:
    """(The sim makes its disk on first listing: what was written before must be on it.)"""
    sandbox.write_file("/home/user/d/before.txt", b"before")
    assert [e.path for e in sandbox.list_files("/home/user/d", depth=1)] == [
        "/home/user/d/before.txt"]
    sandbox.write_file("/home/user/d/after.txt", b"after")
    assert sandbox.read_file("/home/user/d/before.txt") == b"before"
    assert sandbox.read_file("/home/user/d/after.txt", max_bytes=3) == b"aft"
    assert {e.path for e in sandbox.list_files("/home/user/d", depth=1)} == {
        "/home/user/d/before.txt", "/home/user/d/after.txt"}
