"""Token sequences of different lengths as one batch: padded on the left (so the last column is every row's next
token, where generation and next-token scoring read), with the attention mask and the position ids that make each
row score as it does alone; and the log-probability of each next token from the logits.

    ids, mask = left_pad(seqs, tokenizer.pad_token_id)
    out = model(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask),
                **({"logits_to_keep": k} if keeps_logits(model) else {}))
    logp = logprobs_from_logits(out.logits[:, -k:-1], ids[:, -k + 1:])   # the last k-1 tokens' log-probabilities

Rows that all continue one cached prefix (its keys and values computed once, repeated for the batch) are padded
between the prefix and their own tokens; the mask hides that padding and the positions carry on from the prefix:

    ids, mask, positions = after_prefix(suffixes, prefix_len, tokenizer.pad_token_id)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, past_key_values=cache_for_the_batch)
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


def keeps_logits(model) -> bool:
    """Whether the (base) model's forward takes `logits_to_keep` (every causal LM of transformers 4.50+; remote code
    may not): with it, the vocabulary projection runs only for the last k positions, where the [batch, length,
    vocabulary] logits would otherwise be most of a forward's memory; without it, slice the logits after."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model passes it through
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def logprobs_from_logits(logits, labels):
    """log p(label) per position: logits[label] - logsumexp(logits), the chosen entry of log_softmax(logits) without
    materialising the whole [B, T, V] log-softmax. logits [B, T, V], labels [B, T] -> [B, T]."""
    import torch

    logits = logits.float()
    return logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def after_prefix(seqs: list[list[int]], prefix_len: int, pad_id: int):
    """(ids, mask, positions) for sequences that continue a cached prefix of `prefix_len` tokens: ids [rows, longest]
    left-padded; mask [rows, prefix_len + longest] over the cached prefix and the ids, as the model's forward wants it
    with a cache (the prefix seen by every row, the padding between it and a row's tokens not); positions
    [rows, longest] counted on from the prefix, so each row's tokens sit where they would in prefix + row alone."""
    import torch

    ids, mask = left_pad(seqs, pad_id)
    full = torch.cat([mask.new_ones((len(seqs), prefix_len)), mask], dim=1)
    return ids, full, position_ids(full)[:, prefix_len:]
