"""Token sequences of different lengths as one batch: padded on the left (so the last column is every row's next
token, where generation and next-token scoring read), with the attention mask and the position ids that make each
row score as it does alone.

    ids, mask = left_pad(seqs, tokenizer.pad_token_id)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask))
"""

from __future__ import annotations


def left_pad(seqs: list[list[int]], pad_id: int):
    """(ids, mask) as [rows, longest] long tensors: each sequence right-aligned after `pad_id`s, masked 0 there."""
    import torch

    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def position_ids(mask):
    """Each row's positions counted from its first real token (padding at 0)."""
    return (mask.cumsum(-1) - 1).clamp(min=0)
