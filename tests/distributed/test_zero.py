"""SFT, reward, DPO and PPO on 2 CPU processes (gloo) under ZeRO-2 and ZeRO-3 through the `deepspeed`
launcher: each trains, saves, and the saved model reloads without DeepSpeed and gives the same
logits on a fixed input as the in-memory model did. Then SFT and PPO stop after step 2 and
resume from their DeepSpeed checkpoints: the later steps match the straight run."""

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import ROOT, write_yaml

pytestmark = pytest.mark.distributed

STAGES = [
    {"stage": "sft", "model": "tiny", "data": {"train": "synthetic:sft", "eval_fraction": 0.1}, "max_length": 64,
     "precision": "fp32", "optim": {"lr": 5e-3, "max_steps": 4, "batch_size": 8, "logging_steps": 1}},
    {"stage": "preferences", "data": {"path": "synthetic:preferences"}, "eval_fraction": 0.2},
    {"stage": "reward", "model": "stage:sft", "preferences": "stage:preferences", "max_length": 64,
     "precision": "fp32", "optim": {"lr": 2e-3, "max_steps": 4, "batch_size": 8, "logging_steps": 1}},
    {"stage": "dpo", "policy": "stage:sft", "preferences": "stage:preferences", "max_length": 64,
     "precision": "fp32", "optim": {"lr": 5e-4, "max_steps": 4, "batch_size": 8, "logging_steps": 1}},
    # 8 prompts a step, 4 on each process; minibatch 8 = 2 processes x 2 micro-batches of 2
    {"stage": "ppo", "policy": "stage:sft", "reward": {"model": "stage:reward"}, "prompts": "synthetic:prompts",
     "max_eval_prompts": 8, "steps": 3, "rollout": {"prompts_per_step": 8, "max_new_tokens": 8},
     "ppo": {"epochs": 1, "minibatch_size": 8, "micro_batch_size": 2},
     "optim": {"lr": 1e-4, "scheduler": "cosine", "warmup_ratio": 0.3}, "precision": "fp32",
     "checkpoint": {"every": 2, "keep": 1}},
    # a LoRA reward model: saved merged with its trained score head (it was merged as a causal LM, losing the head)
    {"stage": "reward", "name": "reward_lora", "model": "stage:sft", "preferences": "stage:preferences",
     "max_length": 64, "precision": "fp32", "tuning": "lora", "lora": {"r": 4, "alpha": 8},
     "optim": {"lr": 2e-3, "max_steps": 4, "per_device_batch_size": 8, "logging_steps": 1}},
]
# the same SFT and PPO with checkpoints, to stop after step 2 and resume
RESUMED = [{**STAGES[0], "name": "sft_b", "checkpoint": {"every": 2, "keep": 1}}, {**STAGES[4], "name": "ppo_b"}]


def _launcher() -> str:
    exe = Path(sys.executable).parent / "deepspeed"
    if not exe.exists() and not shutil.which("deepspeed"):
        pytest.skip("the deepspeed launcher is not installed")
    return str(exe) if exe.exists() else shutil.which("deepspeed")


def _launch(cfg, zero: str, *args, env=None, code: int = 0):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "offline", **(env or {})}
    ds = ["--deepspeed", str(ROOT / "configs" / "deepspeed" / f"{zero}.json")] if zero else []  # None: data parallel
    port = random.randint(29600, 29999)
    cmd = [_launcher(), "--num_gpus", "2", "--no_local_rank", "--master_port", str(port),
           "--module", "pipeline", "run", str(cfg), *ds, *args]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == code, res.stdout[-3000:] + res.stderr[-3000:]
    # DeepSpeed's CPU all-reduce buffers (66 MiB a process; DeepSpeed never removes them) went too, also when the
    # run stopped early or failed
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    return res


def _metric(run, stage, key):
    rows = [json.loads(x) for x in (run / stage / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_stages_under_zero_save_models_that_reload_and_resume(tmp_path, zero):
    from pipeline import artifacts
    from pipeline.models import load_causal_lm, load_tokenizer
    from reward.scoring import load_reward_model

    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "seed": 0, "stages": STAGES + RESUMED})
    _launch(cfg, zero, *[a for s in STAGES for a in ("--stage", s.get("name", s["stage"]))])
    for name, loader in (("sft", load_causal_lm), ("reward", load_reward_model), ("dpo", load_causal_lm),
                         ("ppo", load_causal_lm), ("reward_lora", load_reward_model)):
        art = artifacts.load_artifact(run / name, ("policy", "reward_model"))
        model_dir = str(art.output("model"))
        assert not list(Path(model_dir).glob("*.pt")) and list(Path(model_dir).glob("*.safetensors"))
        tok, model = load_tokenizer(model_dir), loader(model_dir).eval()
        ids = torch.tensor([tok("Tell me about the river.")["input_ids"]])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0].reshape(-1)[-8:].tolist()
        want = art.manifest["check"]["logits_fingerprint"]
        assert logits == pytest.approx(want, abs=1e-4), (name, zero)
    sft = json.loads((run / "sft" / "manifest.json").read_text())
    assert sft["distributed"] == {"world_size": 2, "zero_stage": int(zero[-1])}
    # `rlhf plan`'s estimate for this stage on 2 CPU processes is within a quarter of the measured peak (the
    # first stage of the launch: its peak is its own, not what earlier stages left behind)
    from pipeline.config import load_pipeline
    from pipeline.plan import plan

    row = plan(load_pipeline(cfg), 2, 1, 1e15, on_cpu=True, only=["sft"])[0]
    estimated = next(o["bytes"] for o in row["options"] if o["zero"] == int(zero[-1]) and not o["offload"])
    measured = sft["metrics"]["memory/peak_rss_mib"] * 2**20
    assert abs(estimated - measured) <= 0.25 * measured, (zero, measured / 2**20, estimated / 2**20)
    # one writer: a single metrics row per logged step
    steps = [json.loads(x).get("step") for x in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert steps.count(1) == 1
    ppo = json.loads((run / "ppo" / "manifest.json").read_text())
    assert {k: ppo["distributed"][k] for k in ("world_size", "zero_stage")} == {"world_size": 2,
                                                                            "zero_stage": int(zero[-1])}
    assert len(ppo["distributed"]["memory_per_process"]["peak_rss_mib"]) == 2
    assert ppo["counts"]["rollouts"] == 24 and (run / "ppo" / "value_head.safetensors").exists()

    # stop after step 2 (as if killed), then resume from the DeepSpeed checkpoints of both processes
    for stage in ("sft_b", "ppo_b"):
        _launch(cfg, zero, "--stage", stage, env={"RLHF_STOP_AFTER_STEP": "2"}, code=3)
        assert (run / f".{stage}.partial" / "checkpoints" / "checkpoint-2" / "checkpoint.json").exists()
    res = _launch(cfg, zero, "--stage", "sft_b", "--stage", "ppo_b", "--resume")
    assert res.stdout.count("resuming from") == 2, res.stdout[-2000:]
    for a, b, key, steps in (("sft", "sft_b", "train/loss", (3, 4)), ("ppo", "ppo_b", "ppo/reward_mean", (3,)),
                             ("ppo", "ppo_b", "ppo/kl", (3,)), ("ppo", "ppo_b", "ppo/policy_loss", (3,)),
                             ("ppo", "ppo_b", "ppo/lr", (3,))):
        want, got = _metric(run, a, key), _metric(run, b, key)
        for step in steps:
            assert got[step] == pytest.approx(want[step], abs=1e-4), (key, step, got, want)


def test_zero_config_disagreement_is_an_error_before_launch(tmp_path):
    from pipeline.deepspeed import load_zero_config
    from pipeline.blocks import OptimConfig
    from rlhf.errors import UsageError

    ds = tmp_path / "z.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_micro_batch_size_per_gpu": 4}))
    with pytest.raises(UsageError, match="train_micro_batch_size_per_gpu is 4 but stages.sft gives 8"):
        load_zero_config(ds, OptimConfig(batch_size=8), "fp32", "stages.sft")
    ds.write_text(json.dumps({"bf16": {"enabled": True}}))
    with pytest.raises(UsageError, match="bf16.enabled is True but stages.sft.precision is fp32"):
        load_zero_config(ds, OptimConfig(), "fp32", "stages.sft")
    filled = load_zero_config(ROOT / "configs/deepspeed/zero3.json", OptimConfig(batch_size=8, grad_accum=2), "bf16",
                              "stages.sft")
    assert filled["train_micro_batch_size_per_gpu"] == 8 and filled["gradient_accumulation_steps"] == 2
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False


def test_first_launch_on_a_fresh_model_cache(tmp_path):
    """Two ZeRO-3 processes start on an empty cache: one builds the model (outside DeepSpeed), the other
    waits, both train and exit 0, and the cache holds a complete model that loads on one process."""
    from pipeline import models

    cache = tmp_path / "cache"
    run = tmp_path / "run"
    sft = {**STAGES[0], "optim": {**STAGES[0]["optim"], "max_steps": 1}}
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "seed": 0, "stages": [sft]})
    _launch(cfg, "zero3", env={"RLHF_CACHE": str(cache)})
    entry = cache / "models" / models.TINY_VERSION
    assert models.missing_parts(entry) == []
    models.load_causal_lm(str(entry))
    assert (run / "sft" / "manifest.json").exists()


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_a_nonfinite_gradient_is_refused_before_the_update_on_every_process(stage, tmp_path):
    """PPO's DeepSpeed path checks every gradient of a minibatch once, after the last micro-batch's backward and
    before the engine applies the update, on every process at once (an inf on one process stops both)."""
    torchrun = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_port", str(random.randint(29600, 29999)),
                          "-m", "tests.distributed.nonfinite_worker", str(stage), str(tmp_path)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    results = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("rank-*.json"))]
    assert sorted(r["rank"] for r in results) == [0, 1]
    for r in results:
        assert r["refused"] and "PPO step 2: grad_norm is not finite" in r["refused"], r
    main = next(r for r in results if r["rank"] == 0)
    assert main["good_update_applied"] and not main["bad_update_applied"], main


@pytest.mark.parametrize("value_model,zero,placement", [
    ("head", None, {}), ("critic", None, {}),  # two processes without DeepSpeed: data parallel
    ("head", "zero2", {}), ("critic", "zero2", {}),
    # ZeRO-3 sampling on the shards, every process stepping together, and the frozen models' shards in CPU memory
    ("critic", "zero3", {"rollout": {"gather_zero3": False}, "frozen": {"zero3": True, "offload": True}})],
    ids=["head-data-parallel", "critic-data-parallel", "head-zero2", "critic-zero2", "critic-zero3-sharded"])
def test_one_ppo_step_is_the_same_update_on_one_and_two_processes(tmp_path, value_model, zero, placement):
    """The same PPO step (one rollout of 16 prompts, two epochs of two minibatches of 8) from the same SFT policy, on
    one process (micro-batches of 8) and on two (data parallel without DeepSpeed, ZeRO-2 or ZeRO-3; each process
    sampling and scoring half the prompts, then taking half of every minibatch in two micro-batches of 2, so the
    gradients accumulate): the gradient norms agree
    to 1e-4 and the weight updates within 1%. The responses are the same (each is sampled from its own seed), the
    minibatches are the same rows in the same order, the loss is the minibatch's token mean (DeepSpeed's division
    by its accumulation steps and processes undone), and a critic's gradients are clipped apart from the policy's
    on one process as in its own engine."""
    from safetensors.torch import load_file

    from pipeline.cli import main

    run = tmp_path / "run"
    ppo = {"stage": "ppo", "policy": "stage:sft", "reward": {"model": "stage:reward"}, "value_model": value_model,
           "prompts": "synthetic:prompts", "steps": 1, "precision": "fp32", "max_eval_prompts": 4,
           "rollout": {"prompts_per_step": 16, "max_new_tokens": 12},
           "ppo": {"epochs": 2, "minibatch_size": 8, "micro_batch_size": 8}, "optim": {"lr": 1e-3, "max_grad_norm": 0.1}}
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "seed": 0, "stages": [
        *STAGES[:3], {**ppo, "name": "ppo_one"},
        {**ppo, "name": "ppo_two", "ppo": {**ppo["ppo"], "micro_batch_size": 2},
         **({"deepspeed": str(ROOT / "configs" / "deepspeed" / f"{zero}.json")} if zero else {}),
         **{k: {**ppo.get(k, {}), **v} for k, v in placement.items()}}]})
    assert main(["run", str(cfg), "--stage", "sft", "--stage", "preferences", "--stage", "reward",
                 "--stage", "ppo_one"]) == 0
    _launch(cfg, zero, "--stage", "ppo_two")
    start = load_file(str(run / "sft" / "model" / "model.safetensors"))
    updates, rewards = [], []
    for name in ("ppo_one", "ppo_two"):
        weights = load_file(str(run / name / "model" / "model.safetensors"))
        updates.append(torch.cat([(weights[k] - start[k]).flatten() for k in sorted(start)]))
        rewards.append(_metric(run, name, "ppo/reward_mean")[1])
    assert rewards[0] == pytest.approx(rewards[1], abs=1e-6), "the same responses on one and two processes"
    norms = [_metric(run, name, "ppo/grad_norm")[1] for name in ("ppo_one", "ppo_two")]
    assert norms[0] > 0 and norms[1] == pytest.approx(norms[0], rel=1e-4), norms
    assert updates[0].norm() > 0
    rel = ((updates[0] - updates[1]).norm() / updates[0].norm()).item()
    assert rel <= 1e-2, rel
