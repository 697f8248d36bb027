"""A peer for bench/ppo_vs_trl.py (not part of the project): TRL 1.12's PPOTrainer on the same work as our PPO
stage, run in its own process with TRL 1.12 first on PYTHONPATH (installed by the harness into bench/.peers).

    PYTHONPATH=bench/.peers/trl-1.12.0 python bench/peers/trl_ppo.py --policy SFT_DIR --reward RM_DIR \
        --prompts feedback/data/prompts.jsonl --episodes 32 --batch 8 --tokens 32 --out result.json

Policy: LoRA r16 on q/k/v/o of the SFT policy (the reference is the disabled adapter); value model and reward
model: the reward-model artifact's weights, in full (a critic). 2 PPO epochs, 2 minibatches, fp32, greedy
never (temperature 1), no sample generations, no evaluation. Writes {"train_seconds", "episodes",
"trl_version"} to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--policy", required=True)
    p.add_argument("--reward", required=True)
    p.add_argument("--prompts", required=True)
    p.add_argument("--episodes", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--out", required=True)
    a = p.parse_args()

    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    tok = AutoTokenizer.from_pretrained(a.policy)
    tok.padding_side = "left"
    prompts = [json.loads(line)["prompt"] for line in open(a.prompts) if line.strip()]
    ids = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                   return_dict=True)["input_ids"] for q in prompts]
    dataset = Dataset.from_dict({"input_ids": ids})
    policy = AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(a.reward, num_labels=1, dtype=torch.float32)
    for m in (value, reward):
        m.config.pad_token_id = tok.pad_token_id
    args = PPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=a.batch, num_mini_batches=2,
                     num_ppo_epochs=2, total_episodes=a.episodes, response_length=a.tokens, learning_rate=a.lr,
                     stop_token="eos", temperature=1.0, kl_coef=0.05, num_sample_generations=0, bf16=False, fp16=False,
                     use_cpu=not torch.cuda.is_available(), report_to=[], save_strategy="no",
                     local_rollout_forward_batch_size=a.batch, seed=0, logging_steps=1)
    peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                      task_type="CAUSAL_LM")
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=dataset, value_model=value, peft_config=peft)
    t0 = time.time()
    trainer.train()
    seconds = time.time() - t0
    with open(a.out, "w") as f:
        json.dump({"train_seconds": seconds, "episodes": a.episodes, "trl_version": trl.__version__}, f)
    os._exit(0)  # skip interpreter teardown: the timing is done


if __name__ == "__main__":
    main()
