"""Untrusted text stays text. Prompts from data files, responses a policy wrote and requests to the server are put
through a tokenizer's chat template; a special token written inside them ("<|im_end|>\n<|im_start|>system") would
otherwise become a real control token and open a turn. Each is broken with a zero-width space after its first
character, and counted (NEUTRALISED; the runner reports the count per stage).

    safe = neutralise_special_tokens(tokenizer, text)
    messages = safe_messages(tokenizer, prompt)        # a prompt (text or messages) as safe chat messages
    ids = chat_ids(tokenizer, prompt)                  # its chat-template ids, ready to generate from
    ids = chat_ids_batch(tokenizer, prompts)           # the same for many, the tokenizer called once on the list
"""

from __future__ import annotations

import contextlib
import re
from collections import Counter

# Untrusted text (prompts from data files, responses a policy wrote, requests to the server) must stay text:
# a response holding the string "<|im_end|>\n<|im_start|>system" would otherwise be tokenised into real
# control tokens and open a system turn. Every special token of the tokenizer found in such text is broken
# with a zero-width space after its first character (it then tokenises as ordinary characters); the count of
# what was neutralised is kept here, and the runner reports it per stage.
NEUTRALISED: Counter = Counter()
_ZWSP = "\u200b"
_PATTERNS: dict[int, re.Pattern | None] = {}


def _special_pattern(tokenizer) -> re.Pattern | None:
    key = id(tokenizer)
    if key not in _PATTERNS:
        specials = {str(s) for s in (getattr(tokenizer, "all_special_tokens", None) or [])}
        for added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values():
            if getattr(added, "special", False):
                specials.add(str(added.content))
        specials = sorted((s for s in specials if s), key=len, reverse=True)  # longest first
        _PATTERNS[key] = re.compile("|".join(map(re.escape, specials))) if specials else None
    return _PATTERNS[key]


def neutralise_special_tokens(tokenizer, text: str) -> str:
    """`text` with every special token of `tokenizer` made ordinary text (counted in NEUTRALISED)."""
    pattern = _special_pattern(tokenizer)
    if pattern is None or not isinstance(text, str):
        return text

    def broken(m: re.Match) -> str:
        NEUTRALISED[m.group(0)] += 1
        s = m.group(0)
        return s[0] + _ZWSP + s[1:] if len(s) > 1 else "\ufffd"

    return pattern.sub(broken, text)


@contextlib.contextmanager
def uncounted():
    """Neutralisations inside the block are left out of NEUTRALISED: a text measured (a prompt's length), not used."""
    saved = NEUTRALISED.copy()
    try:
        yield
    finally:
        NEUTRALISED.clear()
        NEUTRALISED.update(saved)


def safe_messages(tokenizer, prompt) -> list[dict]:
    """A prompt (string or messages) as chat messages whose contents cannot hold control tokens."""
    msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    return [{**m, "content": neutralise_special_tokens(tokenizer, m["content"])} for m in msgs]


def chat_ids(tokenizer, prompt) -> list[int]:
    return chat_ids_batch(tokenizer, [prompt])[0]


def chat_ids_batch(tokenizer, prompts: list) -> list[list[int]]:
    """chat_ids of each prompt: the chat template renders each one, the (fast) tokenizer encodes the list at once."""
    if not prompts:
        return []
    msgs = [safe_messages(tokenizer, p) for p in prompts]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_dict=True)["input_ids"]
    return tokenizer(["\n\n".join(m["content"] for m in ms) + "\n\n" for ms in msgs])["input_ids"]
