"""Batched sampling from a causal LM with its chat template; shared by feedback labelling, PPO and eval."""

from __future__ import annotations


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


def sampling_kwargs(temperature: float, top_p: float = 1.0) -> dict:
    """generate() arguments: pure sampling at temperature > 0 (no top-k), greedy at 0."""
    if temperature > 0:
        return {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    return {"do_sample": False}


def sample(model, tokenizer, prompts: list, n: int = 1, temperature: float = 1.0, top_p: float = 1.0,
           max_new_tokens: int = 64, batch_size: int = 16, seed: int = 0, desc: str = "sampling") -> list[list[str]]:
    """`n` responses per prompt (text, special tokens removed); greedy when temperature is 0."""
    import torch
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    model.eval()
    out: list[list[str]] = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, unit="batch"):
            chunk = prompts[i : i + batch_size]
            ids, mask = left_pad([chat_ids(tokenizer, p) for p in chunk], tokenizer.pad_token_id)
            gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                                 num_return_sequences=n, pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **sampling_kwargs(temperature, top_p))
            texts = tokenizer.batch_decode(gen[:, ids.shape[1]:], skip_special_tokens=True)
            out.extend([t.strip() for t in texts[j * n : (j + 1) * n]] for j in range(len(chunk)))
    return out
