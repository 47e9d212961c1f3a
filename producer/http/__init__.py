"""The HTTP API (`sandqueue serve`): the producer's submit/follow/cancel over HTTP, for apps
in any language. Stateless over Redis: any number of replicas can run behind a load balancer.

Modules: `app.py` builds the ASGI app (health, body limit, error handlers); `auth.py` checks
API keys and scopes; `problems.py` turns errors into RFC 9457 problem details; `tasks.py`
the task routes; `sse.py` streams a task's events as Server-Sent Events.

Importing `producer` does not import this package (it needs FastAPI); the CLI's `serve`
command imports it when it runs.
"""
