"""Claude Code's stream-json output, parsed as it arrives in arbitrary chunks."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from worker.agent.stream import LineBuffer, Transcript, parse_line

INIT = {"type": "system", "subtype": "init", "session_id": "s-1", "model": "claude",
        "tools": ["Bash", "Read", "mcp__gw__search", 7, None],
        "mcp_servers": [{"name": "gw", "status": "connected"},
                        {"name": "other", "status": "failed"}, "junk"]}


def _assistant(*blocks: dict[str, Any], usage: dict[str, Any] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": list(blocks)}
    if usage is not None:
        message["usage"] = usage
    return {"type": "assistant", "message": message}


def _text(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def _tool(name: str) -> dict[str, Any]:
    return {"type": "tool_use", "id": f"toolu_{name}", "name": name, "input": {"q": "ü"}}


RESULT = {"type": "result", "subtype": "success", "is_error": False, "num_turns": 4,
          "result": "Done — «ok» ✓\nsecond line", "total_cost_usd": 0.01,
          "usage": {"input_tokens": 1, "output_tokens": 2}}

EVENTS: list[dict[str, Any]] = [
    INIT,
    _assistant(_tool("Bash"), usage={"input_tokens": 100, "output_tokens": 20}),
    {"type": "user", "message": {"content": [{"type": "tool_result", "content": "x\ny"}]}},
    _assistant(_tool("mcp__gw__search"), _tool("Bash"),
               usage={"input_tokens": 50, "output_tokens": 5, "service_tier": "standard"}),
    _assistant({"type": "text", "text": "first"}, {"type": "text", "text": "日本語 last"},
               usage={"input_tokens": 1, "cache_read_input_tokens": 7}),
    RESULT,
]
NOISE = ["[simulated] Claude Code starting", "Warning: something odd", "{not json at all",
         "[1, 2, 3]", '"a json string"', '{"truncated": ']
TRANSCRIPT = (
    NOISE[0] + "\n\n"
    + json.dumps(EVENTS[0]) + "\n"
    + NOISE[1] + "\n"
    + "\n".join(json.dumps(e, ensure_ascii=False) for e in EVENTS[1:4]) + "\n"
    + "   \n" + "\n".join(NOISE[2:]) + "\n"
    + json.dumps(EVENTS[4], ensure_ascii=False) + "\n\n"
    + json.dumps(EVENTS[5], ensure_ascii=False) + "\n"
)


def _usage(t: Transcript) -> dict[str, int]:
    """Tokens so far, each model message counted once (as the agent runner sums them)."""
    total: dict[str, int] = {}
    for tokens in t.usage_by_message.values():
        for key, value in tokens.items():
            total[key] = total.get(key, 0) + value
    return total


def _parse(chunks: Iterable[str]) -> Transcript:
    buffer, transcript = LineBuffer(), Transcript()
    for chunk in chunks:
        for line in buffer.feed(chunk):
            transcript.feed_line(line)
    for line in buffer.close():
        transcript.feed_line(line)
    return transcript


def _summary(t: Transcript) -> tuple[Any, ...]:
    return (t.init, t.result, dict(t.tool_calls), t.last_text, t.noise_lines, t.events,
            _usage(t), t.mcp_servers, t.tools)


def _split(text: str, cuts: Iterable[int]) -> list[str]:
    points = sorted({0, len(text), *(c for c in cuts if 0 < c < len(text))})
    return [text[a:b] for a, b in itertools.pairwise(points)]


EXPECTED = _summary(_parse([TRANSCRIPT]))


def test_whole_transcript_is_understood() -> None:
    t = _parse([TRANSCRIPT])
    assert t.init == INIT
    assert t.result == RESULT
    assert dict(t.tool_calls) == {"Bash": 2, "mcp__gw__search": 1}
    assert t.last_text == "日本語 last"
    assert t.events == len(EVENTS)  # every JSON object counts, the user event too
    assert t.noise_lines == len(NOISE)  # blank and whitespace-only lines are not noise
    assert _usage(t) == {"input_tokens": 151, "output_tokens": 25,
                              "cache_read_input_tokens": 7}
    assert t.mcp_servers == [{"name": "gw", "status": "connected"},
                             {"name": "other", "status": "failed"}]
    assert t.tools == ["Bash", "Read", "mcp__gw__search"]


def test_every_single_split_point_gives_the_same_transcript() -> None:
    for cut in range(1, len(TRANSCRIPT)):
        assert _summary(_parse(_split(TRANSCRIPT, [cut]))) == EXPECTED, cut


def test_one_character_at_a_time_gives_the_same_transcript() -> None:
    assert _summary(_parse(TRANSCRIPT)) == EXPECTED


@given(st.lists(st.integers(min_value=1, max_value=len(TRANSCRIPT) - 1), max_size=60))
def test_random_splits_give_the_same_transcript(cuts: list[int]) -> None:
    assert _summary(_parse(_split(TRANSCRIPT, cuts))) == EXPECTED


@given(st.lists(st.text(alphabet=st.characters(blacklist_characters="\n"), max_size=40),
                max_size=20),
       st.lists(st.integers(min_value=0, max_value=2000), max_size=30))
def test_line_buffer_yields_exactly_the_lines_written(lines: list[str], cuts: list[int]) -> None:
    text = "".join(line + "\n" for line in lines)
    buffer = LineBuffer()
    out: list[str] = []
    for chunk in _split(text, cuts):
        out += buffer.feed(chunk)
    assert out == lines
    assert buffer.close() == []


def test_final_line_without_newline_is_parsed_on_close() -> None:
    buffer, transcript = LineBuffer(), Transcript()
    lines = buffer.feed("banner\n" + json.dumps(RESULT)[:10])
    assert lines == ["banner"]
    assert buffer.feed(json.dumps(RESULT)[10:]) == []
    last = buffer.close()
    assert last == [json.dumps(RESULT)]
    transcript.feed_line(last[0])
    assert transcript.result == RESULT
    assert buffer.close() == []  # nothing left the second time


def test_close_after_a_trailing_newline_yields_nothing() -> None:
    buffer = LineBuffer()
    assert buffer.feed('{"type":"x"}\n') == ['{"type":"x"}']
    assert buffer.close() == []


def test_overlong_line_is_dropped_and_the_lines_around_it_survive() -> None:
    # Given a buffer that keeps at most 100 characters of one line
    buffer = LineBuffer(max_line_chars=100)
    out = buffer.feed('{"type":"before"}\n')
    # When a 1000-character line arrives in 10-character chunks, then a good line
    for _ in range(100):
        out += buffer.feed("x" * 10)
    out += buffer.feed('\n{"type":"after"}\n')
    out += buffer.close()
    # Then no piece of the long line comes out as a line of its own, and it counts once
    assert out == ['{"type":"before"}', '{"type":"after"}']
    assert buffer.dropped_lines == 1


def test_overlong_line_never_holds_more_than_the_limit() -> None:
    buffer = LineBuffer(max_line_chars=1000)
    for _ in range(5000):
        buffer.feed("y" * 97)
        assert buffer._partial_len <= 1000
        assert sum(map(len, buffer._partial)) <= 1000
    assert buffer.dropped_lines >= 1


def test_line_of_exactly_the_limit_is_kept() -> None:
    buffer = LineBuffer(max_line_chars=10)
    assert buffer.feed("a" * 5) == []
    assert buffer.feed("b" * 5 + "\n") == ["aaaaabbbbb"]
    assert buffer.dropped_lines == 0


def test_parse_line_accepts_only_json_objects() -> None:
    assert parse_line('  {"type": "result"}  \r') == {"type": "result"}
    for noise in ["", "   ", "[1]", "42", "null", "{", "{}x", "text {\"a\":1}"]:
        assert parse_line(noise) is None, noise


def test_result_event_is_captured_and_the_last_one_wins() -> None:
    t = Transcript()
    t.feed_line(json.dumps({"type": "result", "subtype": "error_max_turns", "is_error": True}))
    t.feed_line(json.dumps(RESULT))
    assert t.result == RESULT


def test_tool_uses_are_counted_by_name() -> None:
    t = Transcript()
    for names in (["A"], ["B", "A"], ["A"]):
        t.apply(_assistant(*(_tool(n) for n in names)))
    t.apply(_assistant({"type": "tool_use"}))  # a block without a name still counts
    t.apply(_assistant("not a block", {"type": "text", "text": 3}))  # type: ignore[arg-type]
    assert dict(t.tool_calls) == {"A": 3, "B": 1, "?": 1}
    assert t.last_text is None


def test_usage_sums_integer_counts_of_assistant_messages_only() -> None:
    t = Transcript()
    t.apply(_assistant(usage={"input_tokens": 3, "output_tokens": 1, "tier": "x"}))
    t.apply(_assistant(usage={"input_tokens": 4}))
    t.apply({"type": "assistant", "message": {"usage": "not a dict"}})
    t.apply({"type": "user", "message": {"usage": {"input_tokens": 1000}}})
    t.apply(RESULT)  # the result's own usage is reported separately, not summed in
    assert _usage(t) == {"input_tokens": 7, "output_tokens": 1}


def test_init_fields_are_read_defensively() -> None:
    t = Transcript()
    assert t.mcp_servers == [] and t.tools == []
    t.apply({"type": "system", "subtype": "init", "mcp_servers": None, "tools": None})
    assert t.mcp_servers == [] and t.tools == []
    t.apply({"type": "system", "subtype": "other", "tools": ["X"]})
    assert t.tools == []  # only the init event describes the tools


def test_usage_repeated_per_content_block_is_counted_once_per_message_id() -> None:
    # One API response with three content blocks arrives as three assistant events sharing
    # the message id and the usage (code.claude.com/docs/en/agent-sdk/cost-tracking;
    # anthropics/claude-code#87303); the last copy carries the final output count.
    t = Transcript()
    first = {"input_tokens": 3, "cache_read_input_tokens": 22749, "output_tokens": 1}
    for block, usage in ((_text("thinking"), first), (_tool("Bash"), first),
                         (_tool("Read"), {**first, "output_tokens": 57})):
        t.apply({"type": "assistant", "message": {"id": "msg_01A", "content": [block],
                                                   "usage": usage}})
    t.apply({"type": "assistant", "message": {"id": "msg_01B", "content": [_text("done")],
                                               "usage": {"input_tokens": 10,
                                                         "output_tokens": 5}}})
    assert _usage(t) == {"input_tokens": 13, "cache_read_input_tokens": 22749,
                              "output_tokens": 62}
    assert dict(t.tool_calls) == {"Bash": 1, "Read": 1}
