"""Reward-model judge: a reward-model artifact scores both responses; P(A) = sigmoid(r_A - r_B)."""

from __future__ import annotations

import math

from feedback.judges import Judge, JudgeItem, Verdict


class RewardModelJudge(Judge):
    name = "reward_model"

    def __init__(self, path: str, tie_band: float = 0.0, batch_size: int = 32, trust_remote_code: bool = False):
        from pipeline.artifacts import manifest_hash
        from reward.scoring import RewardScorer

        self.path, self.tie_band = path, tie_band
        # trust_remote_code comes from the judge config (the user's), never from the artifact's manifest
        self.scorer = RewardScorer.from_artifact(path, batch_size=batch_size, trust_remote_code=trust_remote_code)
        try:
            self._id = manifest_hash(path)
        except OSError:
            self._id = str(path)

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
