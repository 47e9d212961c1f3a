"""Prompts and agent output stay out of Celery's task events and log lines.

Task events (what Flower shows) and Celery's own log records carry a task's arguments and a
repr of its return value. Here the argument is the prompt with its MCP config, and the
return value holds the agent's output, which may quote private data. So the events and logs
of a sandqueue task carry placeholders for the arguments and only the result's status.
Producers already send `argsrepr="(agent task)"`; a message from any other sender (plain
`send_task`, another language) is treated the same on receipt.
"""

from __future__ import annotations

import logging
import re
from typing import Any

from celery.exceptions import Reject

ARGS_REPR = "(agent task)"
KWARGS_REPR = "{}"

_STATUS = re.compile(r"""['"]status['"]: ['"]([a-z_]+)['"]""")
_CATEGORY = re.compile(r"""['"]category['"]: ['"]([a-z_]+)['"]""")


def summarize(result_repr: Any) -> str:
    """`{'task_id': ..., 'status': 'failed', ... 'category': 'auth' ...}` -> the status
    (and error category) only, which is all a monitor needs."""
    text = str(result_repr)
    status = _STATUS.search(text)
    category = _CATEGORY.search(text)
    parts = [m.group(1) for m in (status, category) if m is not None]
    return f"(agent result: {', '.join(parts)})" if parts else "(agent result)"


class TraceLogFilter(logging.Filter):
    """For Celery's task trace log (`celery.app.trace`):

    - a task's return value is logged as its status only (it holds the agent's output);
    - a `Reject` loses its traceback: here it is an expected path, never a fault (a
      stopping worker hands its tasks back, a task over a per-key limit steps aside), and
      Celery's one line (task, id, reason) says all there is.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, dict):
            context = record.args
            if "return_value" in context:
                context["return_value"] = summarize(context["return_value"])
            for name, placeholder in (("args", ARGS_REPR), ("kwargs", KWARGS_REPR)):
                if name in context:
                    context[name] = placeholder
        if record.exc_info and isinstance(record.exc_info[1], Reject):
            record.exc_info = None
            record.exc_text = None
        return True


def install_log_filters() -> None:
    trace_log = logging.getLogger("celery.app.trace")
    if not any(isinstance(f, TraceLogFilter) for f in trace_log.filters):
        trace_log.addFilter(TraceLogFilter())
