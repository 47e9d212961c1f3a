"""Typed answers for any agent: ask for JSON, check the answer, word the one repair turn.

The runner (`worker/agent/runner.py`) calls these around the agent's runs; nothing here knows
a particular agent. An agent whose version takes a JSON Schema itself (Claude Code's
`--json-schema`, `Agent.native_output_schema`) gets it through `Turn.output_schema` and
reports the parsed value (`AgentRun.structured_output`); any other agent is asked in its
system prompt for JSON only, and its final text is parsed. Either way the answer is checked
here with `jsonschema` (which also asserts `format`, which Claude Code treats as an
annotation only: research/claude-code-facts.md §7), so "valid" means the same for every agent.
"""

from __future__ import annotations

import json
import re
from typing import Any

from sandqueue import schemas
from sandqueue.contract import AgentTask
from worker.agent.base import AgentRun

_FENCED = re.compile(r"^```(?:json|JSON)?[ \t]*\n(.*)\n```$", re.S)


def instruct(task: AgentTask, schema: dict[str, Any]) -> AgentTask:
    """The task with the system-prompt instruction an agent without native structured
    output gets: answer with one JSON value satisfying the schema, nothing else."""
    ask = ("When you have finished, your final message must be exactly one JSON object, with "
           "no other text and no code fence, that satisfies this JSON Schema:\n"
           + json.dumps(schema, ensure_ascii=False))
    system = f"{task.append_system_prompt}\n\n{ask}" if task.append_system_prompt else ask
    return task.model_copy(update={"append_system_prompt": system})


def answer_of(run: AgentRun) -> tuple[Any, str | None]:
    """(the answer's JSON value, None) or (None, why there is none). The agent's own
    structured value wins; else the final text, whole or as the one fenced block in it."""
    if run.has_structured_output:
        return run.structured_output, None
    text = (run.final_text or "").strip()
    if not text:
        return None, "the agent gave no final answer"
    fenced = _FENCED.match(text)
    for candidate in (text, fenced.group(1) if fenced else None):
        if candidate is None:
            continue
        try:
            return json.loads(candidate), None
        except (ValueError, RecursionError):
            continue
    return None, "the final answer is not JSON"


def judge(run: AgentRun, schema: dict[str, Any]) -> list[str]:
    """What is wrong with the run's answer (empty: it is valid, and now `run.output`).

    An answer given as a structured value and an empty text keeps that value as the raw
    text, so a refused answer can still be read in the result."""
    value, missing = answer_of(run)
    if run.has_structured_output and not (run.final_text or "").strip():
        run.final_text = json.dumps(run.structured_output, ensure_ascii=False)
    if missing is not None:
        return [f"$: {missing}"]
    found = schemas.problems(schema, value)
    if not found:
        run.output = value
    return found


def refused(run: AgentRun) -> str | None:
    """The answer as it was judged, for the error that refuses it: the agent's structured
    value when it gave one (the text beside it is not the answer), else its final text."""
    if run.has_structured_output:
        return json.dumps(run.structured_output, ensure_ascii=False)
    return run.final_text


def repair_prompt(problems: list[str]) -> str:
    """The one follow-up message that tells the agent what was wrong with its answer."""
    listed = "\n".join(f"- {p}" for p in problems)
    return ("Your final answer does not satisfy the required JSON Schema:\n"
            f"{listed}\n"
            "Give your final answer again, corrected: one JSON object that satisfies the "
            "schema, and nothing else.")
