"""Local model judge: a causal LM reads the pairwise prompt; the verdict is its next-token
probability of the choice letters (no free-text parsing).

P(A) = p("A") / (p("A") + p("B")) over the first token of each choice after the assistant
turn opens. Batched with left padding.
"""

from __future__ import annotations

from feedback.judges import Judge, JudgeItem, Verdict
from feedback.judges.prompting import Template, build_messages, select_principles
from rlhf.text import chat_ids


class LocalJudge(Judge):
    name = "local"

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
        self._torch = torch

    def _first_token(self, text: str) -> int:
        return self.tok(text, add_special_tokens=False)["input_ids"][0]

    def identity(self) -> dict:
        pin = {"revision": self.revision} if self.revision else {}  # another revision is another judge
        return {"type": "local", "model": self.ref, **pin, "principles": self.mode, "n_principles": self.n}

    def prompt_ids(self, it: JudgeItem) -> list[int]:
        principles = select_principles(self.principles, self.mode, self.n, str(it.prompt) + str(it.id))
        msgs = build_messages(self.template, it.prompt, it.response_a, it.response_b, principles)
        return chat_ids(self.tok, msgs)  # special tokens in the (untrusted) prompt and responses stay text

    def judge(self, items: list[JudgeItem]) -> list[Verdict]:
        from tqdm.auto import tqdm

        torch = self._torch
        out = []
        pad = self.tok.pad_token_id
        with torch.no_grad():
            for i in tqdm(range(0, len(items), self.batch_size), desc=f"judging ({self.ref})", unit="batch",
                          disable=len(items) <= self.batch_size):
                seqs = [self.prompt_ids(it) for it in items[i : i + self.batch_size]]
                width = max(map(len, seqs))
                ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs])
                mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
                logits = self.model(input_ids=ids, attention_mask=mask).logits[:, -1, :].float()
                probs = torch.softmax(logits, dim=-1)[:, self.choice_ids]
                for pa, pb in probs.tolist():
                    p = pa / (pa + pb) if pa + pb > 0 else 0.5
                    choice = "tie" if abs(p - 0.5) <= self.tie_band else ("a" if p > 0.5 else "b")
                    out.append(Verdict(choice, p, raw=f"p(A)={pa:.4g} p(B)={pb:.4g}",
                                       reason=f"next-token mass on the choices {pa + pb:.3f}"))
        return out
