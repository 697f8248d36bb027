"""Reward-model judge: a reward-model artifact scores both responses; P(A) = sigmoid(r_A - r_B)."""

from __future__ import annotations

import math

from feedback.judges import Judge, JudgeItem, Verdict


class RewardModelJudge(Judge):
    name = "reward_model"

    def __init__(self, scorer, identity: str, tie_band: float = 0.0):
        """`scorer` scores (prompt, response) pairs (reward.scoring.RewardScorer, loaded by pipeline.judging);
        `identity` names the reward model in the judge's identity (its artifact's manifest hash)."""
        self.scorer, self._id, self.tie_band = scorer, identity, tie_band

    def identity(self) -> dict:
        return {"type": "reward_model", "manifest": self._id}

    def judge(self, items: list[JudgeItem]) -> list[Verdict]:
        ra, _ = self.scorer.score([it.prompt for it in items], [it.response_a for it in items])
        rb, _ = self.scorer.score([it.prompt for it in items], [it.response_b for it in items])
        out = []
        for a, b in zip(ra, rb):
            p = 1 / (1 + math.exp(-(a - b)))
            choice = "tie" if abs(p - 0.5) <= self.tie_band else ("a" if p > 0.5 else "b")
            out.append(Verdict(choice, p, raw=f"{a:.4f} vs {b:.4f}", reason="reward difference"))
        return out
