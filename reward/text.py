"""How a reward model sees a (prompt, response): with its own tokenizer and chat template.

Training (the reward stage), validation (truncation checks) and scoring all go through
`encode`, so the reward model is scored on exactly the token layout it was trained on, even
when the policy that wrote the response uses another tokenizer.
"""

from __future__ import annotations
from rlhf.text import neutralise_special_tokens, safe_messages


def as_messages(prompt, response, tokenizer=None) -> list[dict]:
    """prompt + response as chat messages; with `tokenizer`, special tokens in their text are neutralised
    (pipeline.generation), so a response cannot open a turn of its own."""
    p = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    r = [{"role": "assistant", "content": response}] if isinstance(response, str) else list(response)
    if tokenizer is None:
        return p + r

    return safe_messages(tokenizer, p + r)


def _flat(x, tokenizer) -> str:
    text = x if isinstance(x, str) else "\n\n".join(f"{m['role']}: {m['content']}" for m in x)
    return neutralise_special_tokens(tokenizer, text)


def encode(tokenizer, prompt, response, max_length: int | None = None) -> tuple[list[int], int]:
    """Token ids of prompt + response (right-truncated to max_length), and how many prompt tokens there are.

    With a chat template the pair is rendered as a conversation ending on the assistant turn;
    without one, as plain text followed by the EOS token.
    """
    if getattr(tokenizer, "chat_template", None):
        msgs = as_messages(prompt, response, tokenizer)
        n_resp = 1 if isinstance(response, str) else len(response)
        ids = tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True)["input_ids"]
        prompt_ids = tokenizer.apply_chat_template(msgs[:-n_resp], tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)["input_ids"]
        n_prompt = len(prompt_ids)
    else:
        prompt_text = _flat(prompt, tokenizer) + "\n\n"
        n_prompt = len(tokenizer(prompt_text)["input_ids"])
        ids = tokenizer(prompt_text + _flat(response, tokenizer))["input_ids"] + [tokenizer.eos_token_id]
    if max_length is not None:
        ids = ids[:max_length]
    return list(ids), n_prompt
