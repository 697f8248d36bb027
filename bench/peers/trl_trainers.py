"""A peer for bench/trainers_vs_trl.py (not part of the project): a plain script with TRL's SFTTrainer or
DPOTrainer and its defaults, on the same data and model as our stage, in its own process. Only what a CPU run
and the comparison need is set: fp32 (TRL defaults to bf16), use_cpu, max_steps, no saving, no reporting.
Writes {"train_seconds", "final_loss", "trl_version"} to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--method", choices=["sft", "dpo"], required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in open(a.data) if line.strip()]
    tok = AutoTokenizer.from_pretrained(a.model)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    common = dict(output_dir=tempfile.mkdtemp(), max_steps=a.steps, bf16=False, fp16=False,
                  use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no", logging_steps=1, seed=0)
    if a.method == "sft":
        from trl import SFTConfig, SFTTrainer

        trainer = SFTTrainer(model=model, args=SFTConfig(**common), train_dataset=Dataset.from_list(rows),
                             processing_class=tok)
    else:
        from trl import DPOConfig, DPOTrainer

        data = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                   "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                   "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
        trainer = DPOTrainer(model=model, args=DPOConfig(**common), train_dataset=data, processing_class=tok)
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    with open(a.out, "w") as f:
        json.dump({"train_seconds": seconds, "final_loss": losses[-1], "trl_version": trl.__version__}, f)
    os._exit(0)


if __name__ == "__main__":
    main()
