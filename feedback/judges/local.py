"""Local model judge: a causal LM reads the pairwise prompt; the verdict is its next-token
probability of the choice letters (no free-text parsing).

P(A) = p("A") / (p("A") + p("B")) over the first token of each choice after the assistant
turn opens.

Batched (`batch_size` prompts a forward): the prompts are tokenized first, then grouped so that
the two orders of a pair (the same prompt and responses, swapped) share a forward, and the
groups sorted by length so that a batch holds prompts of about the same length (little padding).
Rows are padded on the left and masked, with position ids counted from each row's first real
token, so the last column is every row's next token and a row scores as it does alone (the
tests check batched probabilities against one-by-one ones). Only the last position's logits are
computed (`logits_to_keep`) where the model's forward takes it: the [batch, length, vocabulary]
logits would otherwise be most of a forward's time and memory.

Shared prefix (`prefix_cache`, on by default): every prompt of a run opens with the same tokens
(the chat template's system turn, the judge's instructions up to the first pair-specific text).
Their keys and values are computed once per `judge` call (a transformers cache) and repeated for
each batch, which forwards only the rest of each prompt: padding goes between the prefix and a
row's own tokens, hidden by the mask, positions carrying on from the prefix (rlhf.batching.
after_prefix), so a row still scores as its whole prompt alone (tested against the uncached
one-by-one forward). Models whose forward takes no cache, or with sliding-window or recurrent
layers (where padding in the middle would change what a row sees), score without it.
"""

from __future__ import annotations

import copy
import inspect

import numpy as np

from feedback.judges import Judge, JudgeItem, Verdict
from feedback.judges.prompting import Template, build_messages, select_principles
from feedback.schema import canonical
from rlhf.batching import after_prefix, keeps_logits, left_pad, position_ids
from rlhf.text import chat_ids, chat_ids_batch


def pair_key(it: JudgeItem) -> str:
    """The same for both orders of a pair: the prompt and the two responses, unordered."""
    return canonical([it.prompt, sorted([canonical(it.response_a), canonical(it.response_b)])])


def plan_batches(lengths: list[int], keys: list[str], batch_size: int) -> list[list[int]]:
    """Indices into the items, in batches of at most `batch_size`: the items sharing a key (both orders of a pair)
    in one batch (a group larger than the batch is split), groups sorted longest first so that a batch pads little
    (and a prompt too long for memory fails on the first batch, not the last)."""
    groups: dict[str, list[int]] = {}
    for i, k in enumerate(keys):
        groups.setdefault(k, []).append(i)
    ordered = sorted(groups.values(), key=lambda g: (-max(lengths[i] for i in g), g[0]))
    batches: list[list[int]] = []
    current: list[int] = []
    for group in ordered:
        for start in range(0, len(group), batch_size):
            part = group[start : start + batch_size]
            if current and len(current) + len(part) > batch_size:
                batches.append(current)
                current = []
            current += part
    if current:
        batches.append(current)
    return batches


class LocalJudge(Judge):
    name = "local"
    reads = "logprobs"  # every verdict, from the next-token probabilities (cached ones included)
    streams_results = True  # CachedJudge stores each batch's verdicts as they are made, not at the end of the run

    def __init__(self, model, tokenizer, model_ref: str, template: Template, principles: list[str],
                 principle_mode: str = "all", n_principles: int = 2, tie_band: float = 0.0, batch_size: int = 8,
                 revision: str | None = None, prefix_cache: bool = True):
        """`model` and `tokenizer` loaded by the caller (pipeline.judging, from the judge config); `model_ref` and
        `revision` name them in the judge's identity. `prefix_cache=False` forwards every prompt whole (the
        reference the tests and bench/judge_batch.py compare against)."""
        import torch

        self.ref, self.template, self.principles = model_ref, template, principles
        self.mode, self.n, self.tie_band, self.batch_size = principle_mode, n_principles, tie_band, batch_size
        self.revision = revision
        self.tok, self.model = tokenizer, model.eval()
        self.choice_ids = [self._first_token(c) for c in template.choices[:2]]
        if self.choice_ids[0] == self.choice_ids[1]:
            raise ValueError(f"the choices {template.choices[:2]} share their first token")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # remote code may lack `logits_to_keep`: then every position's logits are computed and the last one kept
        # (a peft wrapper passes it through to its base model, which keeps_logits looks at)
        self._keep = keeps_logits(model)
        # transformers 5 names a forward's cache `cache`, 4.x `past_key_values` (deprecated in 5). Read from the
        # model's own forward: a peft wrapper (whose prompt-learning types build their own cache) shows neither,
        # so its prompts are forwarded whole
        params = inspect.signature(model.forward).parameters
        self._cache_kw = next((k for k in ("cache", "past_key_values") if k in params), None) if prefix_cache else None
        self.forwards = 0  # batches run (stats)
        self.prefix_tokens = 0  # tokens of the last run's shared prefix, forwarded once instead of in every prompt
        self._torch = torch

    def _first_token(self, text: str) -> int:
        return self.tok(text, add_special_tokens=False)["input_ids"][0]

    def identity(self) -> dict:
        pin = {"revision": self.revision} if self.revision else {}  # another revision is another judge
        return {"type": "local", "model": self.ref, **pin, "principles": self.mode, "n_principles": self.n}

    def stats(self) -> dict:
        return {"forwards": self.forwards, "batch_size": self.batch_size, "prefix_tokens": self.prefix_tokens}

    def _messages(self, it: JudgeItem) -> list[dict]:
        principles = select_principles(self.principles, self.mode, self.n, str(it.prompt) + str(it.id))
        return build_messages(self.template, it.prompt, it.response_a, it.response_b, principles)

    def prompt_ids(self, it: JudgeItem) -> list[int]:
        return chat_ids(self.tok, self._messages(it))  # special tokens in the (untrusted) prompt and responses stay text

    def prompts_ids(self, items: list[JudgeItem]) -> list[list[int]]:
        """prompt_ids of every item, the tokenizer called once on the list (its fast path for many texts)."""
        return chat_ids_batch(self.tok, [self._messages(it) for it in items])

    def shared_prefix(self, seqs: list) -> int:
        """How many tokens every sequence opens with, leaving each at least its last one (read for the verdict)."""
        n = min(map(len, seqs)) - 1
        first = np.asarray(seqs[0][:n])
        for s in seqs[1:]:
            differ = np.flatnonzero(first[:n] != np.asarray(s[:n]))
            n = int(differ[0]) if differ.size else n
        return max(n, 0)

    def prefix_cache(self, prefix: list[int]):
        """The keys and values of `prefix` (a transformers cache), or None where this model's cannot be shared
        with padding after it: layers other than plain full attention (a sliding window is counted in columns,
        which the padding moves; a recurrent state would read the padding)."""
        torch = self._torch
        try:
            from transformers.cache_utils import DynamicLayer
        except ImportError:  # before the per-layer caches of transformers 4.56
            return None
        with torch.inference_mode():
            out = self.model(input_ids=torch.as_tensor(np.asarray(prefix), dtype=torch.long)[None], use_cache=True)
        cache = out.get("cache")  # transformers 5; 4.x returns it as past_key_values
        cache = out.get("past_key_values") if cache is None else cache
        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer) is not DynamicLayer for layer in layers):
            return None
        return cache

    def choice_probs(self, seqs: list, prefix=None) -> list[tuple[float, float]]:
        """One forward over token sequences (left-padded, masked): each row's next-token (p(A), p(B)). With
        `prefix` = (cache, P), the prefix_cache of P tokens, each sequence is what follows those P tokens."""
        torch = self._torch
        kw = {"logits_to_keep": 1} if self._keep else {}
        with torch.inference_mode():
            if prefix is None:
                ids, mask = left_pad(seqs, self.pad_id)
                positions = position_ids(mask)  # each row counts from its first real token
                kw["use_cache"] = False
            else:
                cache, n = prefix
                ids, mask, positions = after_prefix(seqs, n, self.pad_id)
                rows = copy.deepcopy(cache)  # the forward appends to the cache it is given
                rows.batch_repeat_interleave(len(seqs))
                kw[self._cache_kw] = rows
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, **kw)
        self.forwards += 1
        probs = torch.softmax(out.logits[:, -1, :].float(), dim=-1)[:, self.choice_ids]
        return [tuple(row) for row in probs.tolist()]

    def judge(self, items: list[JudgeItem], on_result=None) -> list[Verdict]:
        """A verdict per item; `on_result(i, verdict)` is called as each batch's verdicts are made (CachedJudge
        stores them then, so a run killed at pair 9,000 of 10,000 keeps the 9,000 for its rerun)."""
        from tqdm.auto import tqdm

        if not items:
            return []
        # tokenized once, kept as compact arrays (10k pairs are 20k prompts of a few hundred tokens)
        seqs = [np.asarray(s, dtype=np.int32) for s in self.prompts_ids(items)]
        n = self.shared_prefix(seqs) if self._cache_kw else 0
        cache = self.prefix_cache(seqs[0][:n]) if n else None
        cut = self.prefix_tokens = n if cache is not None else 0
        prefix = (cache, cut) if cut else None
        batches = plan_batches([len(s) for s in seqs], [pair_key(it) for it in items], self.batch_size)
        out: list[Verdict | None] = [None] * len(items)
        for batch in tqdm(batches, desc=f"judging ({self.ref})", unit="batch", disable=len(batches) <= 1):
            for i, (pa, pb) in zip(batch, self.choice_probs([seqs[i][cut:] for i in batch], prefix)):
                p = pa / (pa + pb) if pa + pb > 0 else 0.5
                choice = "tie" if abs(p - 0.5) <= self.tie_band else ("a" if p > 0.5 else "b")
                out[i] = Verdict(choice, p, raw=f"p(A)={pa:.4g} p(B)={pb:.4g}", read="logprobs",
                                 reason=f"next-token mass on the choices {pa + pb:.3f}")
                if on_result is not None:
                    on_result(i, out[i])
        return out  # type: ignore[return-value]
