"""`python -m bench [overhead|density|enqueue|latency ...] [--quick] [--json [PATH]]`.

Runs the chosen sections (all by default), each against its own redis-server and real
worker processes, prints Markdown tables, and writes bench/out/report.md (and the JSON
results with --json). Not part of the test suite: timings on shared machines are noisy,
so the figures that matter are ratios measured side by side in the same run.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shlex
import signal
import sys
import time
import traceback
from dataclasses import replace
from pathlib import Path
from types import FrameType
from typing import Any

from bench import density, enqueue, harness, latency, machine, overhead, report
from bench.config import FULL, QUICK

SECTIONS = {"overhead": overhead.run, "density": density.run, "enqueue": enqueue.run,
            "latency": latency.run}


def _sigterm(_signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # so every `finally` stops its workers and redis-server


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("sections", nargs="*", choices=[*SECTIONS, []], metavar="SECTION",
                        help=f"any of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, < 1 min")
    parser.add_argument("--json", nargs="?", const=str(harness.OUT / "results.json"),
                        metavar="PATH", help="write results as JSON (default bench/out/"
                        "results.json)")
    parser.add_argument("--no-profile", action="store_true", help="skip the py-spy profiles")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.no_profile:
        sizes = replace(sizes, profile=False)
    chosen = args.sections or list(SECTIONS)

    signal.signal(signal.SIGTERM, _sigterm)
    atexit.register(harness.stop_all_workers)
    harness.OUT.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "machine": machine.describe(),
        "command": "python -m bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "mode": "quick" if args.quick else "full",
        "started_at": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "sections": {},
    }
    t_all = time.monotonic()
    for name in chosen:
        print(f"[bench] {name} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        try:
            section = SECTIONS[name](sizes)
        except KeyboardInterrupt:
            print("[bench] interrupted; workers and redis-server stopped", file=sys.stderr)
            return 130
        except Exception as e:  # one broken section must not lose the others' figures
            traceback.print_exc()
            section = {"error": f"{type(e).__name__}: {e}"}
        section["elapsed_s"] = round(time.monotonic() - t0, 1)
        results["sections"][name] = section
        print(f"[bench] {name} done in {section['elapsed_s']} s", file=sys.stderr, flush=True)
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["total_s"] = round(time.monotonic() - t_all, 1)

    text = report.render(results)
    print(text)
    (harness.OUT / "report.md").write_text(text + "\n")
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2) + "\n")
        print(f"[bench] results in {path}", file=sys.stderr)
    return 1 if any("error" in s for s in results["sections"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
