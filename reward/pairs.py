"""A preference pair as a reward model trains on it: both responses encoded with the reward model's own
tokenizer and chat template (reward/text.py), right-truncated to max_length; and what cannot be trained on.

    rows, kept, skipped = encode_pairs(pairs, tokenizer, max_length=512, use_margin=False)
"""

from __future__ import annotations

from reward.text import encode


def encode_pairs(pairs, tokenizer, max_length: int, use_margin: bool):
    """Pairs -> (trainable rows {chosen_ids, rejected_ids[, margin]}, kept pairs, skipped [{id, reason}])."""
    rows, kept, skipped = [], [], []
    for p in pairs:
        if p.tie:
            skipped.append({"id": p.id, "reason": "tie: a Bradley-Terry model has no target for ties"})
            continue
        c, n_prompt = encode(tokenizer, p.prompt, p.chosen, max_length)
        r, _ = encode(tokenizer, p.prompt, p.rejected, max_length)
        if n_prompt >= max_length or c == r:
            skipped.append({"id": p.id, "reason": f"empty or identical after truncation to max_length {max_length}"})
            continue
        row = {"chosen_ids": c, "rejected_ids": r}
        if use_margin:
            if p.margin is None:
                from pipeline.errors import InvalidInput

                raise InvalidInput(f"use_margin is on but pair {p.id} has no margin")
            row["margin"] = float(p.margin)
        rows.append(row)
        kept.append(p)
    return rows, kept, skipped
