"""The worker side: Celery app and task, the pipeline, sandbox providers, the agent adapter.

Flow: `tasks.py` (decode a message) -> `pipeline.py` (attempts, deadline, retries) ->
`sandbox/` (a fresh E2B or simulated sandbox) -> `agent/` (Claude Code headless) -> result.
"""
