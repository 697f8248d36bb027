"""Batched sampling from a causal LM with its chat template; shared by feedback labelling, PPO and eval.

What is sampled depends on the settings given here and nothing else. transformers fills every
setting a GenerationConfig leaves unset from the model's own generation_config.json (a
`repetition_penalty: 1.3` or `top_k: 20` shipped with a checkpoint would otherwise change the
sampling distribution, and PPO's importance ratio with it), so `generate` samples with an explicit
config while the model's own one is set aside.

Batches are left-padded, except for peft prompt-learning models (prompt tuning): peft puts their virtual
tokens before the whole input, padding included, and ignores position ids, so a padded row would be
computed at other positions, after other context, than the same row alone. Those are sampled and
scored in batches of equal length, with no padding at all, so a batch gives what one row alone gives.
They also generate without a KV cache: with the installed peft and transformers, a prompt-tuned model
sampling from its cache loses the prompt after the first tokens (each step sees the virtual tokens and
the last token only), so what it samples is not what it scores; recomputing every step is correct.
"""

from __future__ import annotations

import contextlib

from rlhf.batching import keeps_logits, left_pad, logprobs_from_logits, position_ids
from rlhf.text import NEUTRALISED, chat_ids, neutralise_special_tokens, safe_messages  # noqa: F401


def prompt_learning(model) -> bool:
    """A peft prompt-learning model (prompt tuning, p-tuning, prefix tuning): it cannot take padded batches."""
    return bool(getattr(getattr(model, "active_peft_config", None), "is_prompt_learning", False))


def batches(lengths: list[int], batch_size: int, unpadded: bool = False, by_length: bool = False) -> list[list[int]]:
    """Row indices in batches of at most batch_size: consecutive rows, (by_length) consecutive in order of length, so
    that a batch pads little (HH prompts run from 50 to 800 tokens: padded to the longest of a batch in file order,
    about half of a batch's tokens were padding), or (unpadded) rows of equal length only, so that none pads."""
    if not unpadded:
        order = sorted(range(len(lengths)), key=lengths.__getitem__) if by_length else list(range(len(lengths)))
        return [order[i : i + batch_size] for i in range(0, len(lengths), batch_size)]
    groups: dict[int, list[int]] = {}
    for i, n in enumerate(lengths):
        groups.setdefault(n, []).append(i)
    return [rows[j : j + batch_size] for rows in groups.values() for j in range(0, len(rows), batch_size)]


def generation_config(tokenizer, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, **extra):
    """A complete GenerationConfig: pure sampling at `temperature` > 0 (top-k off, top-p as given, no
    repetition penalty), greedy at 0. `extra` adds output options (output_scores, ...)."""
    from transformers import GenerationConfig

    neutral = dict(num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0,
                   renormalize_logits=False)
    # the filters only sampling reads are set off when sampling; greedy decoding ignores them (transformers warns
    # about a set one), and the empty generation_config generate() runs with (own_settings_only) supplies nothing
    mode = ({"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0, "typical_p": 1.0,
             "epsilon_cutoff": 0.0, "eta_cutoff": 0.0} if temperature > 0 else {"do_sample": False})
    return GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, **neutral, **mode, **extra)


@contextlib.contextmanager
def own_settings_only(model):
    """While sampling, the model's generation_config is an empty one, so that nothing from its
    generation_config.json fills in settings (transformers does that for any field left unset)."""
    from transformers import GenerationConfig

    target = model.get_base_model() if hasattr(model, "get_base_model") else model  # a peft model generates with it
    saved = target.generation_config
    target.generation_config = GenerationConfig()
    try:
        yield model
    finally:
        target.generation_config = saved


def generate(model, config, input_ids, attention_mask, **kwargs):
    """model.generate with exactly `config` (see own_settings_only); without a KV cache for prompt-learning models
    (see the module docstring)."""
    if prompt_learning(model) and config.use_cache is not False:
        import copy

        config = copy.deepcopy(config)
        config.use_cache = False
    with own_settings_only(model):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **kwargs)


def sample_ids(model, tokenizer, prompt_ids: list[list[int]], n: int = 1, temperature: float = 1.0,
               top_p: float = 1.0, max_new_tokens: int = 64, batch_size: int = 16, seed: int = 0,
               desc: str = "sampling", by_length: bool = False) -> list[list[list[int]]]:
    """`n` responses per prompt as token ids, each cut after its first EOS (kept); greedy when temperature is 0.
    Seeded, so the same prompts give the same samples. Prompt-learning models sample prompts of equal length
    together (no padding, see the module docstring); `by_length` batches prompts in order of length (less padding;
    other samples than file order, as the random draws go to other rows)."""
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model.eval()
    device = next(model.parameters()).device
    config = generation_config(tokenizer, max_new_tokens, temperature, top_p, num_return_sequences=n)
    eos = tokenizer.eos_token_id
    out: list = [None] * len(prompt_ids)
    groups = batches([len(p) for p in prompt_ids], batch_size, unpadded=prompt_learning(model), by_length=by_length)
    with torch.no_grad():
        for rows in tqdm(groups, desc=desc, unit="batch", disable=len(groups) <= 1):
            ids, mask = left_pad([prompt_ids[r] for r in rows], tokenizer.pad_token_id)
            gen = generate(model, config, ids.to(device), mask.to(device))[:, ids.shape[1]:].tolist()
            cut = [g[: g.index(eos) + 1] if eos in g else [t for t in g if t != tokenizer.pad_token_id] for g in gen]
            for j, r in enumerate(rows):
                out[r] = cut[j * n : (j + 1) * n]
    return out


def sample(model, tokenizer, prompts: list, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
           max_new_tokens: int = 64, batch_size: int = 16, seed: int = 0, desc: str = "sampling") -> list[list[str]]:
    """`n` responses per prompt (text, special tokens removed); greedy when temperature is 0."""
    ids = sample_ids(model, tokenizer, [chat_ids(tokenizer, p) for p in prompts], n, temperature, top_p,
                     max_new_tokens, batch_size, seed, desc)
    return [[tokenizer.decode(r, skip_special_tokens=True).strip() for r in rs] for rs in ids]


def response_logprobs(model, tokenizer, prompt_ids: list[list[int]], response_ids: list[list[int]],
                      temperature: float = 1.0, batch_size: int = 16) -> list[float]:
    """log p(response | prompt) summed over the response's tokens, from logits / temperature (1 at temperature 0):
    a sequence's log-probability under the distribution it was (or would be) sampled from. Prompt-learning models
    score sequences of equal length together (no padding, see the module docstring)."""
    import torch

    t = temperature if temperature > 0 else 1.0
    device = next(model.parameters()).device
    out: list[float] = [0.0] * len(prompt_ids)
    seqs = [p + r for p, r in zip(prompt_ids, response_ids)]
    model.eval()
    with torch.no_grad():
        # in order of length: a sequence's log-prob does not depend on its batch (up to float rounding)
        for rows in batches([len(s) for s in seqs], batch_size, unpadded=prompt_learning(model), by_length=True):
            ids, mask = left_pad([seqs[r] for r in rows], tokenizer.pad_token_id)
            pos = position_ids(mask)
            kw = {} if prompt_learning(model) else {"position_ids": pos.to(device)}  # peft ignores them, and says so
            # left-padded, every response ends at the last column: only the last `keep` positions' logits are read
            # (the longest response's tokens and the position before it), so only those are computed, where the
            # model can: a [rows, length, vocabulary] projection is most of a long prompt's forward
            keep = min(max(len(response_ids[r]) for r in rows) + 1, ids.shape[1])
            if keeps_logits(model):
                kw["logits_to_keep"] = keep
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device), **kw).logits
            logits = logits[:, -keep:].float() / t  # the last `keep` (prompt tuning prepends virtual tokens' logits)
            logp = logprobs_from_logits(logits[:, :-1], ids[:, ids.shape[1] - keep + 1:].to(device)).cpu()
            for j, r in enumerate(rows):
                n = len(response_ids[r])
                out[r] = float(logp[j, logp.shape[1] - n:].sum()) if n else 0.0
    return out
