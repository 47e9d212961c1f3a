"""`python -m worker.health`: is this machine's worker alive? For container healthchecks.

The worker's maintenance thread rewrites `SANDQUEUE_HEALTH_FILE` each time it has renewed
its leases in Redis (every few seconds). A fresh file means the process runs, that thread
is not stuck and Redis answers; a stale or missing one means none of that is known. Exit 0
healthy, 1 unhealthy, 2 not configured. Reads only the file: no Redis round trip, no Celery
broadcast, so a busy fleet does not pay for every container's check.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from sandqueue.errors import ConfigError
from sandqueue.settings import load_settings

DEFAULT_MAX_AGE_S = 30.0
"""Six lease renewals (at most every 5 s): a worker this late is stuck or cut off."""


def check(path: str | None, max_age_s: float, now: float | None = None) -> tuple[int, str]:
    """(exit code, one line saying why)."""
    if not path:
        return 2, "SANDQUEUE_HEALTH_FILE is not set: the worker writes no heartbeat to check"
    target = Path(path)
    try:
        beat = json.loads(target.read_text())
        beat_at = float(beat["beat_at"])
    except FileNotFoundError:
        return 1, (f"no heartbeat at {path}: the worker has not started (or not become "
                   "ready) yet")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return 1, f"unreadable heartbeat at {path}: {type(e).__name__}: {e}"
    age = (time.time() if now is None else now) - beat_at
    worker = beat.get("worker", "?")
    if age > max_age_s:
        return 1, (f"worker {worker}: last heartbeat {age:.0f}s ago (over {max_age_s:g}s): "
                   "its maintenance thread is stuck or Redis is unreachable")
    return 0, f"worker {worker}: healthy (heartbeat {age:.1f}s ago)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.health", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--max-age", type=float, default=DEFAULT_MAX_AGE_S,
                        help="seconds after which a heartbeat is stale (default %(default)s)")
    args = parser.parse_args(argv)
    try:
        path = load_settings().health_file
    except ConfigError as e:
        print(f"unhealthy: {e.message}", file=sys.stderr)
        return 2
    code, why = check(path, args.max_age)
    print(why, file=sys.stdout if code == 0 else sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
