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
"""

from __future__ import annotations

import inspect

import numpy as np

from feedback.judges import Judge, JudgeItem, Verdict
from feedback.judges.prompting import Template, build_messages, select_principles
from feedback.schema import canonical
from rlhf.batching import left_pad, position_ids
from rlhf.text import chat_ids


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

    def __init__(self, model, tokenizer, model_ref: str, template: Template, principles: list[str],
                 principle_mode: str = "all", n_principles: int = 2, tie_band: float = 0.0, batch_size: int = 8,
                 revision: str | None = None):
        """`model` and `tokenizer` loaded by the caller (pipeline.judging, from the judge config); `model_ref` and
        `revision` name them in the judge's identity."""
        import torch

        self.ref, self.template, self.principles = model_ref, template, principles
        self.mode, self.n, self.tie_band, self.batch_size = principle_mode, n_principles, tie_band, batch_size
        self.revision = revision
        self.tok, self.model = tokenizer, model.eval()
        self.choice_ids = [self._first_token(c) for c in template.choices[:2]]
        if self.choice_ids[0] == self.choice_ids[1]:
            raise ValueError(f"the choices {template.choices[:2]} share their first token")
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        # remote code may lack it: then every position's logits are computed and the last one kept
        self._keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.forwards = 0  # batches run (stats)
        self._torch = torch

    def _first_token(self, text: str) -> int:
        return self.tok(text, add_special_tokens=False)["input_ids"][0]

    def identity(self) -> dict:
        pin = {"revision": self.revision} if self.revision else {}  # another revision is another judge
        return {"type": "local", "model": self.ref, **pin, "principles": self.mode, "n_principles": self.n}

    def stats(self) -> dict:
        return {"forwards": self.forwards, "batch_size": self.batch_size}

    def prompt_ids(self, it: JudgeItem) -> list[int]:
        principles = select_principles(self.principles, self.mode, self.n, str(it.prompt) + str(it.id))
        msgs = build_messages(self.template, it.prompt, it.response_a, it.response_b, principles)
        return chat_ids(self.tok, msgs)  # special tokens in the (untrusted) prompt and responses stay text

    def choice_probs(self, seqs: list) -> list[tuple[float, float]]:
        """One forward over token sequences (left-padded, masked): each row's next-token (p(A), p(B))."""
        torch = self._torch
        ids, mask = left_pad(seqs, self.pad_id)
        positions = position_ids(mask)  # each row counts from its first real token
        with torch.inference_mode():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False,
                             **({"logits_to_keep": 1} if self._keep else {}))
        self.forwards += 1
        probs = torch.softmax(out.logits[:, -1, :].float(), dim=-1)[:, self.choice_ids]
        return [tuple(row) for row in probs.tolist()]

    def judge(self, items: list[JudgeItem]) -> list[Verdict]:
        from tqdm.auto import tqdm

        # tokenized once, kept as compact arrays (10k pairs are 20k prompts of a few hundred tokens)
        seqs = [np.asarray(self.prompt_ids(it), dtype=np.int32) for it in items]
        batches = plan_batches([len(s) for s in seqs], [pair_key(it) for it in items], self.batch_size)
        out: list[Verdict | None] = [None] * len(items)
        for batch in tqdm(batches, desc=f"judging ({self.ref})", unit="batch", disable=len(batches) <= 1):
            for i, (pa, pb) in zip(batch, self.choice_probs([seqs[i] for i in batch])):
                p = pa / (pa + pb) if pa + pb > 0 else 0.5
                choice = "tie" if abs(p - 0.5) <= self.tie_band else ("a" if p > 0.5 else "b")
                out[i] = Verdict(choice, p, raw=f"p(A)={pa:.4g} p(B)={pb:.4g}", read="logprobs",
                                 reason=f"next-token mass on the choices {pa + pb:.3f}")
        return out  # type: ignore[return-value]
