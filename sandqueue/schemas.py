"""Typed answers: the JSON Schema a task's final answer must satisfy (`output_schema`).

Producers check the schema itself when a task is submitted (`check_output_schema`), so a
broken schema is the submitter's error at once, not an `output_invalid` after a paid run;
workers validate the agent's answer against it (`problems`). Both sides use `jsonschema`
with the validator the schema's own `$schema` names (Draft 2020-12 when it names none).

Two rules beyond the meta-schema, each for a reason:
- the top level describes an object: agents that support structured output natively return
  it as the input of a synthetic tool (Claude Code's `StructuredOutput` tool, see
  research/claude-code-facts.md §7), and tool inputs are objects; it is also what gives a
  batch's CSV output its columns (`columns`);
- `$ref`s point inside the schema (`#...`): a worker never fetches a URL a task names.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import jsonschema
import referencing
import referencing.exceptions
from jsonschema.exceptions import SchemaError, ValidationError

MAX_OUTPUT_SCHEMA_BYTES = 64 * 1024
"""Claude Code takes the schema as one command-line argument (`--json-schema`); Linux caps
one argument at 128 KiB (MAX_ARG_STRLEN), so this leaves room, and it keeps messages small."""
MAX_PROBLEMS = 10
MAX_DEPTH = 64
"""Nesting of objects and lists in a schema: deeper is refused, not a recursion error."""


def _no_remote(uri: str) -> referencing.Resource[Any]:
    raise referencing.exceptions.NoSuchResource(ref=uri)


_LOCAL_ONLY: referencing.Registry[Any] = referencing.Registry(retrieve=_no_remote)  # type: ignore[call-arg]
"""Without an explicit registry, jsonschema falls back to fetching remote `$ref`s over the
network (a deprecated default): the worker must not fetch what a task names."""


def schema_of(value: Any) -> Any:
    """A pydantic model class becomes its JSON Schema (`model_json_schema()`); anything
    else is taken as a schema already."""
    to_schema = getattr(value, "model_json_schema", None)
    if isinstance(value, type) and callable(to_schema):
        return to_schema()
    return value


def check_output_schema(schema: Any) -> dict[str, Any]:
    """The schema if it is usable as an `output_schema`, else ValueError saying why."""
    if not isinstance(schema, dict):
        raise ValueError("must be a JSON Schema object (a JSON object, or from Python a "
                         "pydantic model class)")
    if _depth(schema) > MAX_DEPTH:
        raise ValueError(f"nests objects and lists over {MAX_DEPTH} levels deep")
    if not isinstance(schema.get("$schema", ""), str):
        raise ValueError("$schema must be a meta-schema URI, e.g. "
                         "https://json-schema.org/draft/2020-12/schema")
    size = len(json.dumps(schema, ensure_ascii=False).encode("utf-8", "surrogatepass"))
    if size > MAX_OUTPUT_SCHEMA_BYTES:
        raise ValueError(f"is {size} bytes of JSON, over the {MAX_OUTPUT_SCHEMA_BYTES}-byte "
                         "limit; describe fewer fields or move $defs you do not use")
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        validator.check_schema(schema)
    except SchemaError as e:
        where = _path(e.absolute_path)
        raise ValueError(f"is not a valid JSON Schema: {where}: {e.message}") from None
    if schema.get("type") != "object":
        raise ValueError('must describe a JSON object at the top level ("type": "object"), '
                         "e.g. {\"type\": \"object\", \"properties\": {\"items\": {\"type\": "
                         "\"array\"}}}: agents return structured answers as objects")
    remote = sorted(_remote_refs(schema))
    if remote:
        raise ValueError(f"$ref must point inside the schema (#/...), not {remote[0]!r}: "
                         "workers never fetch schemas; inline it under $defs")
    return schema


def _depth(value: Any) -> int:
    """How deep objects and lists nest (iteratively: the input may be hostile)."""
    deepest, todo = 0, [(value, 1)]
    while todo:
        item, level = todo.pop()
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            if level <= MAX_DEPTH:
                children = item.values() if isinstance(item, dict) else item
                todo.extend((child, level + 1) for child in children)
    return deepest


def _remote_refs(value: Any) -> Iterable[str]:
    if isinstance(value, dict):
        ref = value.get("$ref")
        if isinstance(ref, str) and not ref.startswith("#"):
            yield ref
        for item in value.values():
            yield from _remote_refs(item)
    elif isinstance(value, list):
        for item in value:
            yield from _remote_refs(item)


def problems(schema: dict[str, Any], instance: Any) -> list[str]:
    """What is wrong with `instance` under `schema`, as `where: what` lines (at most ten);
    empty when it is valid. `format` is asserted (dates, emails, ...), not only noted."""
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    validator = cls(schema, registry=_LOCAL_ONLY, format_checker=cls.FORMAT_CHECKER)
    try:
        found = sorted(validator.iter_errors(instance), key=lambda e: list(e.absolute_path))
    except referencing.exceptions.Unresolvable as e:
        return [f"$: the schema's reference {e} cannot be resolved"]
    except RecursionError:
        return ["$: the answer nests too deeply to be checked"]
    return [_line(e) for e in found[:MAX_PROBLEMS]]


def _line(error: ValidationError) -> str:
    message = error.message
    if len(message) > 300:
        message = message[:300] + "..."
    return f"{_path(error.absolute_path)}: {message}"


def _path(parts: Iterable[Any]) -> str:
    """`$.items[2].name`: where in the answer (or the schema) a problem is."""
    out = "$"
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def columns(schema: dict[str, Any]) -> list[str]:
    """The schema's top-level properties in the order it declares them: a CSV's columns."""
    properties = schema.get("properties")
    return list(properties) if isinstance(properties, dict) else []
