"""A peer for bench/reward_vs_trl.py (not part of the project): a plain script with TRL's RewardTrainer and its
defaults, LoRA r16 (peft's default targets for the model), on canonical pair files written by the harness.
fp32 and use_cpu are set (TRL defaults to bf16), one epoch, no saving or reporting. TRL drops pairs longer than
max_length itself; the script reports how many it kept. Writes {"train_seconds", "accuracy", "eval_pairs_kept",
"train_pairs_kept", "trl_version"} to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def conversation(prompt, response):
    """A canonical pair's prompt (text or messages) and one response (text or assistant messages) as messages."""
    turns = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
    reply = response if isinstance(response, list) else [{"role": "assistant", "content": response}]
    return [*turns, *reply]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--eval", required=True)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    def load(path):
        rows = [json.loads(x) for x in open(path) if x.strip()]
        return Dataset.from_list([{"chosen": conversation(r["prompt"], r["chosen"]),
                                   "rejected": conversation(r["prompt"], r["rejected"])} for r in rows])

    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    args = RewardConfig(output_dir=tempfile.mkdtemp(), num_train_epochs=1, max_length=a.max_length, bf16=False,
                        fp16=False, use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no",
                        logging_steps=10, seed=0)
    trainer = RewardTrainer(model=model, args=args, train_dataset=load(a.train), eval_dataset=load(a.eval),
                            processing_class=tok, peft_config=LoraConfig(r=16, task_type="SEQ_CLS"))
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    metrics = trainer.evaluate()
    with open(a.out, "w") as f:
        json.dump({"train_seconds": seconds, "accuracy": metrics.get("eval_accuracy"),
                   "eval_pairs_kept": len(trainer.eval_dataset), "train_pairs_kept": len(trainer.train_dataset),
                   "trl_version": trl.__version__}, f)
    os._exit(0)


if __name__ == "__main__":
    main()
