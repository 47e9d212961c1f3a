"""Sizes of each section, full and quick: bounded so the whole run takes a few minutes."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Sizes:
    # 1. overhead
    overhead_pools: tuple[tuple[str, int], ...] = (("threads", 50), ("prefork", 2))
    overhead_tasks: int = 3000
    overhead_rounds: int = 2
    trace_tasks: int = 20
    profile: bool = True
    profile_tasks: int = 1500
    # 2. density
    density_levels: tuple[int, ...] = (50, 100, 200, 500)
    density_waves: int = 4
    task_s: float = 2.0
    create_s: float = 0.5
    prefork_processes: int = 4
    prefork_load_level: int = 200
    prefork_window_s: float = 20.0
    # 3. enqueue
    enqueue_tasks: int = 10_000
    enqueue_rounds: int = 2
    enqueue_references: bool = True
    producer_profile_tasks: int = 2000
    # 4. latency
    latency_concurrency: int = 50
    latency_duration_s: float = 15.0
    latency_probe_tasks: int = 1000
    latency_task_s: float = 2.0
    extra: dict[str, object] = field(default_factory=dict)


FULL = Sizes()
QUICK = Sizes(
    overhead_pools=(("threads", 50),),
    overhead_tasks=300,
    overhead_rounds=1,
    trace_tasks=10,
    profile=False,
    profile_tasks=300,
    density_levels=(50, 200),
    density_waves=2,
    prefork_window_s=3.0,
    enqueue_tasks=1000,
    enqueue_rounds=1,
    enqueue_references=False,
    producer_profile_tasks=300,
    latency_duration_s=2.0,
    latency_probe_tasks=150,
)
