"""Score (prompt, response) pairs with a reward model, using the reward model's own tokenizer.

    scorer = RewardScorer.from_artifact("runs/tiny/reward")
    raw, normalised = scorer.score(["Tell me about the river."], ["The river is calm and lovely."])

`normalised = (raw - mean) / std` with the statistics the reward stage measured on its
held-out responses and stored in the manifest. Responses written by a policy with another
tokenizer are passed as text and re-tokenised here.
"""

from __future__ import annotations

from pathlib import Path

from reward.text import encode
from pipeline.artifacts import load_artifact
from pipeline.models import load_model, load_tokenizer


def pad_batch(seqs: list[list[int]], pad_id: int):
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


SORT_WINDOW = 1024  # score_ids batches each window of this many rows in order of length


def score_ids(model, seqs: list[list[int]], pad_id: int, batch_size: int = 32) -> list[float]:
    """Reward for each token sequence (right-padded batches; the model reads its last non-pad token). Each window of
    SORT_WINDOW rows is batched in order of length, so that a batch pads little (HH replies at max length 256 run
    from 40 to 256 tokens); the windows keep a caller that scores a long list in chunks of a multiple of
    SORT_WINDOW (reward.evaluation) to the batches of scoring it whole."""
    import torch

    from pipeline.generation import batches

    out: list[float] = [0.0] * len(seqs)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        for w in range(0, len(seqs), SORT_WINDOW):
            window = seqs[w : w + SORT_WINDOW]
            for rows in batches([len(s) for s in window], batch_size, by_length=True):
                ids, mask = pad_batch([window[i] for i in rows], pad_id)
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                for i, v in zip(rows, logits[:, 0].float().cpu().tolist()):
                    out[w + i] = v
    model.train(was_training)
    return out


class RewardScorer:
    def __init__(self, model, tokenizer, max_length: int | None = None, mean: float = 0.0, std: float = 1.0,
                 batch_size: int = 32):
        self.model, self.tokenizer = model.eval(), tokenizer
        self.max_length, self.mean, self.std, self.batch_size = max_length, mean, std or 1.0, batch_size

    @classmethod
    def from_artifact(cls, path: str | Path, batch_size: int = 32, precision: str = "fp32",
                      trust_remote_code: bool = False) -> "RewardScorer":
        """A reward-model artifact directory (RUN_DIR/reward) or its model/ directory. trust_remote_code is the
        caller's: the user's config or command line, never the artifact's manifest (see pipeline/models.py)."""
        path = Path(path)
        if (path / "manifest.json").exists():
            art = load_artifact(path, "reward_model", role="reward model")
            model_dir, manifest = art.output("model"), art.manifest
        elif (path.parent / "manifest.json").exists():
            model_dir, manifest = path, load_artifact(path.parent, "reward_model", role="reward model").manifest
        else:
            model_dir, manifest = path, {}
        norm = manifest.get("normalization", {})
        tok = load_tokenizer(str(model_dir), trust_remote_code)
        return cls(load_reward_model(str(model_dir), precision, trust_remote_code), tok, manifest.get("max_length"),
                   norm.get("mean", 0.0), norm.get("std", 1.0), batch_size)

    def encode(self, prompt, response) -> list[int]:
        return encode(self.tokenizer, prompt, response, self.max_length)[0]

    def score(self, prompts: list, responses: list) -> tuple[list[float], list[float]]:
        seqs = [self.encode(p, r) for p, r in zip(prompts, responses)]
        raw = score_ids(self.model, seqs, self.tokenizer.pad_token_id, self.batch_size)
        return raw, [(r - self.mean) / self.std for r in raw]


def load_reward_model(path: str, precision: str = "fp32", trust_remote_code: bool = False,
                      revision: str | None = None):
    """A reward model (one-output sequence classifier) from a model directory, a LoRA adapter of one (merged with
    its score head), or a hub id."""
    return load_model(path, precision, trust_remote_code, revision, head="score")
