"""Checkpoints and resume: 4 steps straight equal 2 steps, stop, resume for 2 (losses, PPO rewards and
KL within 1e-4, across an epoch boundary); bad resumes are errors that say why; a killed run
leaves its previous checkpoint loadable."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pipeline import artifacts
from pipeline.cli import main
from tests.conftest import ROOT, tiny_sft_block, write_yaml

# 24 training rows, batch 8: 3 steps an epoch, so steps 1-2 are epoch 0 and step 4 is epoch 1
SFT = tiny_sft_block(data={"train": "synthetic:sft", "eval_fraction": 0.1, "max_rows": 24},
                     optim={"lr": 5e-3, "max_steps": 4, "per_device_batch_size": 8, "logging_steps": 1},
                     checkpoint={"every": 2, "keep": 2})


def _cfg(tmp_path, run, blocks):
    return write_yaml(tmp_path / f"{run}.yaml", {"run_dir": str(tmp_path / run), "seed": 0, "stages": blocks})


def _losses(path, key="train/loss"):
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return {r["step"]: r[key] for r in rows if key in r}


def test_sft_resume_matches_straight_run(tmp_path, monkeypatch, capsys):
    straight = _cfg(tmp_path, "a", [SFT])
    assert main(["run", str(straight)]) == 0
    want = _losses(tmp_path / "a" / "sft" / "metrics.jsonl")
    assert sorted(want) == [1, 2, 3, 4]

    cfg = _cfg(tmp_path, "b", [SFT])
    assert main(["run", str(cfg), "--resume"]) == 2
    assert "has no complete checkpoint" in capsys.readouterr().err

    monkeypatch.setenv("RLHF_STOP_AFTER_STEP", "2")
    assert main(["run", str(cfg)]) == 3
    monkeypatch.delenv("RLHF_STOP_AFTER_STEP")
    partial = tmp_path / "b" / ".sft.partial"
    assert (partial / "checkpoints" / "checkpoint-2" / "checkpoint.json").exists()
    assert not (tmp_path / "b" / "sft").exists()

    # a changed config is refused, naming what differs
    assert main(["run", str(cfg), "--resume", "--set", "stages.sft.optim.lr=1e-3"]) == 2
    assert "optim.lr: 0.005 -> 0.001" in capsys.readouterr().err

    # a checkpoint the kill interrupted is ignored with a message
    (partial / "checkpoints" / "checkpoint-3").mkdir()
    (partial / "checkpoints" / "checkpoint-3" / "model.safetensors").write_bytes(b"half")
    assert main(["run", str(cfg), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "ignoring incomplete checkpoint" in out and "resuming from" in out and "checkpoint-2" in out
    got = _losses(tmp_path / "b" / "sft" / "metrics.jsonl")
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], abs=1e-4), (step, got, want)
    assert not (tmp_path / "b" / "sft" / "checkpoints").exists(), "spent checkpoints are removed"

    # a --force rerun killed after step 2 keeps the previous artifact; --resume finishes the rerun
    before = (tmp_path / "a" / "sft" / "manifest.json").read_text()
    monkeypatch.setenv("RLHF_STOP_AFTER_STEP", "2")
    assert main(["run", str(straight), "--force"]) == 3
    monkeypatch.delenv("RLHF_STOP_AFTER_STEP")
    assert (tmp_path / "a" / "sft" / "manifest.json").read_text() == before
    capsys.readouterr()
    assert main(["run", str(straight), "--resume"]) == 0
    out = capsys.readouterr().out
    assert "unfinished rerun has checkpoints" in out and "resuming from" in out, out
    assert (tmp_path / "a" / "sft" / "manifest.json").read_text() != before
    again = _losses(tmp_path / "a" / "sft" / "metrics.jsonl")
    assert again == pytest.approx(want, abs=1e-4)


def test_killed_run_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    """SIGKILL while training leaves the newest complete checkpoint loadable, and --resume continues from it.

    No race with the machine's speed: the run has far more steps than it could finish while the test waits
    (10^6, hours even on a fast machine), and the test waits, as long as it takes, until the newest complete
    checkpoint is at step 3 or later (a condition that stays true: older checkpoints are rotated away, never
    newer ones), then kills wherever the run is, possibly in the middle of writing the next one."""
    steps = 10**6
    block = {**SFT, "optim": {**SFT["optim"], "max_steps": steps}, "checkpoint": {"every": 1, "keep": 2}}
    cfg = _cfg(tmp_path, "k", [block])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RLHF_STOP_AFTER_STEP", None)
    log = tmp_path / "run.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", "run", str(cfg)], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    from pipeline.checkpoint import scan

    ckpts = tmp_path / "k" / ".sft.partial" / "checkpoints"
    newest = 0
    try:
        while proc.poll() is None and newest < 3:
            newest = max((step for step, _ in scan(ckpts, echo=lambda *_: None)), default=0)
            time.sleep(0.05)
        assert proc.poll() is None, (f"the run ended (exit code {proc.poll()}) before its third checkpoint; its output "
                                     f"ends:\n{log.read_text()[-3000:]}")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    complete = scan(ckpts)
    assert complete and complete[-1][0] >= 3, "a complete checkpoint survives the kill"
    step, path = complete[-1]
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(path)  # loadable
    # --resume continues from it: two more steps, then a checkpoint (RLHF_STOP_AFTER_STEP ends the run there)
    monkeypatch.setenv("RLHF_STOP_AFTER_STEP", str(step + 2))
    assert main(["run", str(cfg), "--resume"]) == 3
    assert scan(ckpts)[-1][0] == step + 2
    logged = _losses(tmp_path / "k" / ".sft.partial" / "metrics.jsonl")
    assert max(logged) == step + 2 and set(logged) >= {step + 1, step + 2}


def test_ppo_resume_matches_straight_run(tiny_run, tmp_path, monkeypatch):
    # 153 training prompts, 64 a step: 2 batches an epoch, so steps 3-4 cross into epoch 1
    ppo = {"stage": "ppo", "policy": "stage:sft", "reward": {"model": "stage:reward"}, "prompts": "synthetic:prompts",
           "steps": 4, "precision": "fp32", "max_eval_prompts": 8,
           "rollout": {"prompts_per_step": 64, "max_new_tokens": 12},
           "ppo": {"epochs": 1, "minibatch_size": 32, "micro_batch_size": 32},
           "optim": {"lr": 5e-4, "scheduler": "linear", "warmup_ratio": 0.2},
           "checkpoint": {"every": 2, "keep": 1}}
    head = [{"stage": "sft", "model": "tiny", "data": {"train": "synthetic:sft"}},
            {"stage": "preferences", "data": {"path": "synthetic:preferences"}},
            {"stage": "reward", "model": "stage:sft", "preferences": "stage:preferences"}]
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(tiny_run), "seed": 0,
                                           "stages": head + [{**ppo, "name": "ppo_a"}, {**ppo, "name": "ppo_b"}]})
    assert main(["run", str(cfg), "--stage", "ppo_a"]) == 0
    monkeypatch.setenv("RLHF_STOP_AFTER_STEP", "2")
    assert main(["run", str(cfg), "--stage", "ppo_b"]) == 3
    monkeypatch.delenv("RLHF_STOP_AFTER_STEP")
    assert main(["run", str(cfg), "--stage", "ppo_b", "--resume"]) == 0
    for key in ("ppo/reward_mean", "ppo/kl", "ppo/epoch", "ppo/lr"):  # the schedule resumes where it stopped
        want = _losses(tiny_run / "ppo_a" / "metrics.jsonl", key)
        got = _losses(tiny_run / "ppo_b" / "metrics.jsonl", key)
        assert sorted(got) == [1, 2, 3, 4]
        for step in (3, 4):
            assert got[step] == pytest.approx(want[step], abs=1e-4), (key, step, got, want)
    assert _losses(tiny_run / "ppo_b" / "metrics.jsonl", "ppo/epoch")[4] == 1


def test_ppo_checkpoints_every_step_and_keeps_the_newest(tiny_run, tmp_path, monkeypatch):
    """checkpoint.every counts PPO steps and checkpoint.keep how many complete ones stay: every 1, keep 2, stopped
    after step 3 -> checkpoint-2 and checkpoint-3."""
    from pipeline.checkpoint import scan

    ppo = {"stage": "ppo", "name": "ppo_kept", "policy": "stage:sft", "reward": {"rule": "feedback.synthetic:rule_score"},
           "prompts": "synthetic:prompts", "steps": 5, "max_eval_prompts": 4,
           "rollout": {"prompts_per_step": 8, "max_new_tokens": 8},
           "ppo": {"epochs": 1, "minibatch_size": 8, "micro_batch_size": 8}, "checkpoint": {"every": 1, "keep": 2}}
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(tiny_run), "seed": 0, "stages": [
        {"stage": "sft", "model": "tiny", "data": {"train": "synthetic:sft"}}, ppo]})
    monkeypatch.setenv("RLHF_STOP_AFTER_STEP", "3")
    assert main(["run", str(cfg), "--stage", "ppo_kept"]) == 3
    assert [step for step, _ in scan(tiny_run / ".ppo_kept.partial" / "checkpoints")] == [2, 3]
