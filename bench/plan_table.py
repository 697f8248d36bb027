"""`rlhf plan`'s estimates for Llama-2 7B, 13B and 70B, PPO and DPO with full fine-tuning, on one node of
8 x 80 GB GPUs: the table in docs/planning.md. No GPU and no download needed: the shapes of
these models are known to pipeline/plan.py.

    .venv/bin/python bench/plan_table.py            # prints the Markdown table

The setups follow the published ones they are compared with: PPO with 256 prompt tokens and 256 new tokens
(DeepSpeed-Chat's step-3 recipe), a critic the size of the policy, the reference and reward model frozen, 8 prompts
sampled per GPU, micro-batches of 2; DPO at 1,024 tokens, micro-batches of 2 pairs; bf16 and gradient
checkpointing for both.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SIZES = {"7B": "meta-llama/Llama-2-7b-hf", "13B": "meta-llama/Llama-2-13b-hf", "70B": "meta-llama/Llama-2-70b-hf"}


def config(model: str, gather: bool = True) -> dict:
    common = {"precision": "bf16", "gradient_checkpointing": True}
    return {"run_dir": "runs/plan", "models": {"base": model}, "stages": [
        {"stage": "sft", "model": "base", "data": {"train": "data/sft.jsonl"}, "max_length": 1024, **common},
        {"stage": "preferences", "data": {"path": "data/preferences.jsonl"}},
        {"stage": "reward", "model": "stage:sft", "preferences": "stage:preferences", "max_length": 1024, **common,
         "optim": {"per_device_batch_size": 2}},
        {"stage": "dpo", "policy": "stage:sft", "preferences": "stage:preferences", "max_length": 1024, **common,
         "optim": {"per_device_batch_size": 2}},
        {"stage": "ppo", "policy": "stage:sft", "reward": {"model": "stage:reward"}, "prompts": "data/prompts.jsonl",
         "value_model": "critic", **common, "rollout": {"prompts_per_step": 64, "max_new_tokens": 256, "gather_zero3": gather},
         "deepspeed": str(ROOT / "configs" / "deepspeed" / "zero3.json"),  # gather_zero3 is a ZeRO-3 setting
         "ppo": {"minibatch_size": 16, "micro_batch_size": 2}}]}


def main() -> None:
    from pipeline.config import load_pipeline
    from pipeline.plan import GIB, plan

    gpus, memory = 8, 80 * GIB
    head = ("| model | method | trained parameters | ZeRO-0 | ZeRO-1 | ZeRO-2 | ZeRO-3 | ZeRO-3 + offload | "
            "fastest that fits |")
    lines = [head, "|---" * 9 + "|"]
    with tempfile.TemporaryDirectory() as tmp:
        for size, model, gather in [(s, m, True) for s, m in SIZES.items()] + [("70B", SIZES["70B"], False)]:
            path = Path(tmp) / f"{size}-{gather}.yaml"
            path.write_text(yaml.safe_dump(config(model, gather), sort_keys=False))
            rows = plan(load_pipeline(path), gpus, 1, memory, only=["ppo"] if not gather else ["dpo", "ppo"],
                        prompt_tokens=256)
            for r in rows:
                how = "full" if gather or r["method"] != "ppo" else "full, sampling on the shards"
                by = {(o["zero"], o["offload"]): o["bytes"] for o in r["options"]}
                host = next(o["host_bytes_per_node"] for o in r["options"] if o["zero"] == 3 and o["offload"])
                cell = lambda k, by=by: f"{by[k] / GIB:,.0f} GiB" + ("" if by[k] <= memory else " ✗")
                best = r["best"]
                fastest = (f"ZeRO-{best['zero']}{' + offload' if best['offload'] else ''}" if best
                           else "none: more GPUs or LoRA")
                lines.append(f"| {size} | {r['method'].upper()} ({how}) | {r['trainable'] / 1e9:.1f}B | "
                             f"{cell((0, False))} | {cell((1, False))} | {cell((2, False))} | {cell((3, False))} | "
                             f"{cell((3, True))} ({host / GIB:,.0f} GiB CPU per node) | {fastest} |")
    print(f"Estimated peak memory per GPU, {gpus} x {memory / GIB:.0f} GiB (✗: does not fit)\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
