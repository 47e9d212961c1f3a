"""Celery and kombu, behind one door.

The only folder of `worker/` that imports `celery` or `kombu` (a test checks it), and the
composition root of a worker process: `app.py` builds the Celery app and, explicitly, the
process's `Runtime` with what it needs from the broker side; `tasks.py` is the thin task
that hands each delivery to it and maps its outcomes to Celery's; `recovery.py` puts dead
workers' deliveries back; `internals.py` holds every use of private Celery/kombu API;
`privacy.py` keeps prompts and agent output out of events and logs.
"""
