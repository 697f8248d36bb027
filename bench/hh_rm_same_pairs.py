"""Benchmark (not a test): the HH recipe's own reward model (RUN_DIR/reward of `rlhf run configs/hh.yaml`) scored
on exactly the evaluation pairs a plain TRL RewardTrainer keeps at max length 256 (both conversations, chat
template applied, at most 256 tokens: 187 of the 241 valid ones), so that its accuracy can be set beside the TRL
row of bench/reward_vs_trl.py --split hh pair for pair (that table scores each side on the pairs it could read).

    .venv/bin/python bench/hh_rm_same_pairs.py [RUN_DIR]      # default runs/hh; prints accuracy and 95% interval
    .venv/bin/python bench/hh_rm_same_pairs.py RUN_DIR --pairs scorer   # on the scorer's part instead

--pairs scorer: the reward model on the independent scorer's 244 valid pairs (the same 256-token filter), a third
part of the data it never trained on and that no setting of the recipe was chosen by (the evaluation pairs chose
the reward models' learning rate: 2e-4 against 1e-3).

Beside it, on the same pairs, a rule with no model: "the shorter reply wins" (in tokens; a tie counts half), since
harmless-base's chosen reply is more often the shorter one: a reward model that beats a coin may have learnt only
that, and one that does not reach the rule has not learnt even that.
"""

from __future__ import annotations

import json
from pathlib import Path


def main(run: Path, pairs: str = "eval", max_length: int = 256) -> None:
    from pipeline.stages.evaluate import wilson
    from reward.scoring import RewardScorer

    source = run / "hh_eval" / "eval.jsonl" if pairs == "eval" else run / "hh_scorer" / "preferences.jsonl"
    rows = [json.loads(x) for x in source.read_text().splitlines() if x.strip()]
    scorer = RewardScorer.from_artifact(run / "reward")
    tok = scorer.tokenizer

    def tokens(prompt, reply) -> int:  # what TRL's RewardTrainer measures against max_length
        reply = reply if isinstance(reply, list) else [{"role": "assistant", "content": reply}]
        return len(tok.apply_chat_template([*prompt, *reply], tokenize=True, return_dict=False))

    sizes = [(tokens(r["prompt"], r["chosen"]), tokens(r["prompt"], r["rejected"])) for r in rows]
    fit = [(r, size) for r, size in zip(rows, sizes) if max(size) <= max_length]
    kept = [r for r, _ in fit]
    chosen, _ = scorer.score([r["prompt"] for r in kept], [r["chosen"] for r in kept])
    rejected, _ = scorer.score([r["prompt"] for r in kept], [r["rejected"] for r in kept])

    def accuracy(scored) -> str:
        wins = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in scored)
        acc, (low, high) = wins / len(kept), wilson(wins, len(kept))
        return f"accuracy {acc:.3f} (95% interval {low:.3f}-{high:.3f})"

    # the reply's length: the whole conversation's tokens, the prompt's being the same on both sides
    shorter = [(-c, -r) for _, (c, r) in fit]
    print(f"{len(kept)} of {len(rows)} {pairs} pairs within {max_length} tokens; the recipe's reward model: "
          f"{accuracy(zip(chosen, rejected))}; the rule 'the shorter reply wins': {accuracy(shorter)}")


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", nargs="?", default="runs/hh", type=Path, help="the run directory of configs/hh.yaml")
    ap.add_argument("--pairs", choices=["eval", "scorer"], default="eval",
                    help="eval: the evaluation pairs (as TRL keeps them); scorer: the scorer's part")
    a = ap.parse_args()
    main(a.run, a.pairs)
