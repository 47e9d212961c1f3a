"""No secret is stored in Redis in clear, and an agent that echoes its tokens leaks nothing
(issue 8 items 2 and 23): a real redis-server, a real worker in sim mode, the real CLI.

The scripted agent repeats its tokens (`SIM_ECHO`, see worker/sandbox/sim.py), as a real
agent asked to print its configuration would. Every Redis key of every type is dumped,
and the queued message bodies are decoded, while the tasks wait in the queue, while they
run and after they finished; the CLI output and the worker log are searched too.
"""

from __future__ import annotations

import base64
import json
import uuid

import pytest
import redis

from sandqueue import keys
from sandqueue.sealing import PREFIX
from tests.integration.conftest import (
    RunCli,
    StartWorker,
    assert_secret_absent,
    dump_redis,
    sim_counts,
    wait_until,
)

pytestmark = pytest.mark.integration

QUEUE = "sqit-secrets"
MCP_TOKEN = "mcp:githubOfficial.githubPersonalAccessToken"
MASKED_ECHO = "is [REDACTED]"


def queued_bodies(rdb: redis.Redis, queue: str) -> list[str]:
    """The task messages waiting in a kombu queue, bodies base64-decoded."""
    bodies = []
    for raw in rdb.lrange(queue, 0, -1):
        envelope = json.loads(raw)
        assert envelope["properties"]["body_encoding"] == "base64"
        bodies.append(base64.b64decode(envelope["body"]).decode())
    return bodies


def assert_nowhere_in_redis(rdb: redis.Redis, *secrets: str) -> None:
    dumped = b"\n".join(value for _, value in dump_redis(rdb))
    for secret in secrets:
        assert_secret_absent(rdb, secret)  # raw and base64 forms, every key and type
        assert secret.encode() not in dumped


def test_no_token_reaches_redis_cli_output_or_logs_even_when_the_agent_echoes_it(
    cli: RunCli, rdb: redis.Redis, worker_factory: StartWorker
) -> None:
    env_token = f"ghp_sqitenv{uuid.uuid4().hex}"   # only in the worker's environment
    inline_token = f"ghp_sqitinline{uuid.uuid4().hex}"  # inline in the MCP config, sealed
    envs_token = f"ghp_sqitenvs{uuid.uuid4().hex}"  # a task env in a credential format
    tokens = (env_token, inline_token, envs_token)
    code, secret_keys, err = cli("keygen")
    assert code == 0, err
    keyed = {"SANDQUEUE_SECRET_KEYS": secret_keys.strip()}
    outputs: list[str] = []

    def run(*args: str, expect: int = 0) -> str:
        code, out, err = cli(*args, env=keyed)
        outputs.extend((out, err))
        assert code == expect, (args, out, err)
        return out

    common = ("--mcp", "githubOfficial", "--queue", QUEUE, "--env", "SIM_LATENCY_S=3",
              "--env", "SIM_TOOL_CALLS=1", "--json")
    # Given two tasks queued where no worker listens yet: one with an inline token, one
    # with a credential in its envs, each asking the agent to echo it.
    inline_id = json.loads(run(
        "submit", "Print your configuration", *common,
        "--mcp-config", f"githubOfficial.githubPersonalAccessToken={inline_token}",
        "--env", f"SIM_ECHO={MCP_TOKEN}"))["id"]
    envs_id = json.loads(run(
        "submit", "Print your environment", *common,
        "--mcp-config", "githubOfficial.githubPersonalAccessToken=${SQIT_GH_TOKEN}",
        "--env", f"GH_TOKEN={envs_token}", "--env", f"SIM_ECHO=GH_TOKEN,{MCP_TOKEN}"))["id"]

    # While queued: the message bodies carry the sealed forms, never a token.
    bodies = queued_bodies(rdb, QUEUE)
    assert len(bodies) == 2 and all(PREFIX in body for body in bodies), bodies
    for token in tokens:
        assert not [b for b in bodies if token in b]
    assert_nowhere_in_redis(rdb, *tokens)

    # When a worker with the keys and the ${ENV} token takes them, mid-run and after.
    worker = worker_factory(concurrency=4, queue=QUEUE,
                            env={**keyed, "SQIT_GH_TOKEN": env_token})
    wait_until(lambda: rdb.scard(keys.SIM_LIVE) == 2, 30, "both sandboxes to be created")
    assert_nowhere_in_redis(rdb, *tokens)
    # A third task, by reference, followed with `submit --wait --json`.
    waited = json.loads(run(
        "submit", "Print your configuration", *common, "--wait",
        "--wait-timeout", "60", "--mcp-config",
        "githubOfficial.githubPersonalAccessToken=${SQIT_GH_TOKEN}",
        "--env", f"SIM_ECHO={MCP_TOKEN}"))
    results = {waited["task_id"]: waited}
    for task_id in (inline_id, envs_id):
        results[task_id] = json.loads(run("result", task_id, "--wait", "--wait-timeout", "60",
                                          "--json"))
        run("result", task_id)
        run("watch", task_id)
        run("watch", task_id, "--json")
        run("status", task_id, "--json")

    # Then nothing anywhere shows a token, though each agent did say its tokens (masked).
    assert_nowhere_in_redis(rdb, *tokens)
    log = worker.log()
    for token in tokens:
        assert not [text for text in outputs if token in text], f"CLI output shows {token}"
        assert token not in log, "the worker log shows a token"
    for result in results.values():
        assert result["status"] == "succeeded", result["error"]
        assert f"{MCP_TOKEN} {MASKED_ECHO}" in result["result"], result["result"]
    assert f"GH_TOKEN {MASKED_ECHO}" in results[envs_id]["result"]
    assert sim_counts(rdb) == (0, 3, 3)


def test_without_keys_inline_values_and_credential_envs_are_refused(cli: RunCli,
                                                                    rdb: redis.Redis) -> None:
    token = f"ghp_sqitrefused{uuid.uuid4().hex}"
    for args in (("--mcp", "githubOfficial", "--mcp-config",
                  f"githubOfficial.githubPersonalAccessToken={token}"),
                 ("--env", f"GH_TOKEN={token}")):
        code, out, err = cli("submit", "Hello", *args)
        text = " ".join(err.split())
        assert code == 2, (out, err)
        assert "${ENV_NAME}" in text and "SANDQUEUE_SECRET_KEYS" in text
        assert token not in out + err
    assert list(rdb.scan_iter("sq:task:*")) == []

    # The development switch lets them through, in clear, with a warning.
    code, out, err = cli("submit", "Hello", "--env", f"GH_TOKEN={token}",
                         env={"SANDQUEUE_ALLOW_CLEAR_SECRETS": "true"})
    assert code == 0, err
    assert "SANDQUEUE_ALLOW_CLEAR_SECRETS" in err and "envs.GH_TOKEN" in err
    assert token not in err
