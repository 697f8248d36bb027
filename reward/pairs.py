"""A preference pair as a reward model trains on it: both responses encoded with the reward model's own
tokenizer and chat template (reward/text.py), right-truncated to max_length; or why it cannot be trained on.

    row, reason = encode_pair(pair, tokenizer, max_length=512, use_margin=False)
"""

from __future__ import annotations

from reward.text import encode


class NoMargin(ValueError):
    """use_margin is on but a pair has no margin."""


def encode_pair(p, tokenizer, max_length: int, use_margin: bool) -> tuple[dict | None, str | None]:
    """A pair -> ({chosen_ids, rejected_ids[, margin]}, None), or (None, why it cannot be trained on): a tie (a
    Bradley-Terry model has no target for it), or responses left empty or identical by truncation."""
    if p.tie:
        return None, "tie: a Bradley-Terry model has no target for ties"
    c, n_prompt = encode(tokenizer, p.prompt, p.chosen, max_length)
    r, _ = encode(tokenizer, p.prompt, p.rejected, max_length)
    if n_prompt >= max_length or c == r:
        return None, f"truncated: empty or identical after truncation to max_length {max_length}"
    row = {"chosen_ids": c, "rejected_ids": r}
    if use_margin:
        if p.margin is None:
            raise NoMargin(f"use_margin is on but pair {p.id} has no margin")
        row["margin"] = float(p.margin)
    return row, None
