"""Batched sampling from a causal LM with its chat template; shared by feedback labelling, PPO and eval.

What is sampled depends on the settings given here and nothing else. transformers fills every
setting a GenerationConfig leaves unset from the model's own generation_config.json (a
`repetition_penalty: 1.3` or `top_k: 20` shipped with a checkpoint would otherwise change the
sampling distribution, and PPO's importance ratio with it), so `generate` samples with an explicit
config while the model's own one is set aside.
"""

from __future__ import annotations

import contextlib


def chat_ids(tokenizer, prompt) -> list[int]:
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
    return tokenizer("\n\n".join(m["content"] for m in msgs) + "\n\n")["input_ids"]


def left_pad(seqs: list[list[int]], pad_id: int):
    import torch

    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s):] = 1
    return ids, mask


def generation_config(tokenizer, max_new_tokens: int, temperature: float = 1.0, top_p: float = 1.0, **extra):
    """A complete GenerationConfig: pure sampling at `temperature` > 0 (top-k off, top-p as given, no
    repetition penalty), greedy at 0. `extra` adds output options (output_scores, ...)."""
    from transformers import GenerationConfig

    neutral = dict(num_beams=1, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=0, top_k=0,
                   typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0, renormalize_logits=False)
    mode = ({"do_sample": True, "temperature": temperature, "top_p": top_p} if temperature > 0
            else {"do_sample": False, "temperature": 1.0, "top_p": 1.0})
    return GenerationConfig(max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                            eos_token_id=tokenizer.eos_token_id, **neutral, **mode, **extra)


@contextlib.contextmanager
def own_settings_only(model):
    """While sampling, the model's generation_config is an empty one, so that nothing from its
    generation_config.json fills in settings (transformers does that for any field left unset)."""
    from transformers import GenerationConfig

    saved = model.generation_config
    model.generation_config = GenerationConfig()
    try:
        yield model
    finally:
        model.generation_config = saved


def generate(model, config, input_ids, attention_mask, **kwargs):
    """model.generate with exactly `config` (see own_settings_only)."""
    with own_settings_only(model):
        return model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **kwargs)


def sample(model, tokenizer, prompts: list, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
           max_new_tokens: int = 64, batch_size: int = 16, seed: int = 0, desc: str = "sampling") -> list[list[str]]:
    """`n` responses per prompt (text, special tokens removed); greedy when temperature is 0."""
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model.eval()
    out: list[list[str]] = []
    device = next(model.parameters()).device
    config = generation_config(tokenizer, max_new_tokens, temperature, top_p, num_return_sequences=n)
    with torch.no_grad():
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
            chunk = prompts[i : i + batch_size]
            ids, mask = left_pad([chat_ids(tokenizer, p) for p in chunk], tokenizer.pad_token_id)
            gen = generate(model, config, ids.to(device), mask.to(device))
            texts = tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
            out.extend([t.strip() for t in texts[j * n : (j + 1) * n]] for j in range(len(chunk)))
    return out
