"""The producer side: what apps and people call to submit agent tasks and get results.

    from producer import submit
    result = submit("Say hello").wait(timeout=300)

Imports neither worker code nor the `e2b` SDK.
"""

from producer.api import (
    Client,
    RedisUnavailable,
    TaskHandle,
    WaitTimeout,
    get_task,
    submit,
)
from producer.taskinfo import TaskInfo
from sandqueue.contract import AgentResult, AgentTask, RetryPolicy, TaskStatus
from sandqueue.errors import InvalidTask

__all__ = [
    "AgentResult",
    "AgentTask",
    "Client",
    "InvalidTask",
    "RedisUnavailable",
    "RetryPolicy",
    "TaskHandle",
    "TaskInfo",
    "TaskStatus",
    "WaitTimeout",
    "get_task",
    "submit",
]
