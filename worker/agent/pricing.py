"""Estimate what a run has cost so far from the token usage the stream reports.

Claude Code reports `total_cost_usd` only in its final event, so a run that is killed or
hangs would otherwise count as free. Per-million-token list prices by model family; an
unknown model is priced as Sonnet. The final event's own figure replaces the estimate.
"""

from __future__ import annotations

# (input, output, cache write, cache read) USD per million tokens
PRICES: dict[str, tuple[float, float, float, float]] = {
    "opus": (15.0, 75.0, 18.75, 1.5),
    "sonnet": (3.0, 15.0, 3.75, 0.3),
    "haiku": (1.0, 5.0, 1.25, 0.1),
}


def estimate_usd(model: str | None, usage: dict[str, int]) -> float:
    family = next((f for f in PRICES if model and f in model.lower()), "sonnet")
    p_in, p_out, p_cw, p_cr = PRICES[family]
    return (
        usage.get("input_tokens", 0) * p_in
        + usage.get("output_tokens", 0) * p_out
        + usage.get("cache_creation_input_tokens", 0) * p_cw
        + usage.get("cache_read_input_tokens", 0) * p_cr
    ) / 1_000_000
