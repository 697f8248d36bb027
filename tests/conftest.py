"""Shared fixtures. Everything is offline: the tiny model is built by project code and cached."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_path() -> str:
    from pipeline.models import resolve

    return resolve("tiny")


def contextual_lm(tiny_path: str):
    """The tiny model with larger weights: its random initialisation is too flat for what it gives to depend on its
    input (it repeats one token whatever it is given), so these weights are drawn from N(0, 0.3), seeded."""
    import torch

    from pipeline.models import load_causal_lm

    model = load_causal_lm(tiny_path)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, w in model.named_parameters():
            if "norm" not in name:
                w.normal_(0, 0.3)
    return model.eval()


def write_yaml(path: Path, data) -> Path:
    import yaml

    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def ppo_hyper(**ppo):
    """The knobs ppo_step reads (pipeline.stages.ppo._Hyper) for a PPO block of 8 prompts a step: 2 epochs of
    minibatches of 4 in micro-batches of 2 unless `ppo` says otherwise."""
    from pipeline.stages.ppo import PPOStageConfig, _Hyper

    cfg = PPOStageConfig.model_validate({"stage": "ppo", "policy": "tiny", "reward": {"rule": "feedback.synthetic:rule_score"},
                                         "prompts": "synthetic:prompts", "rollout": {"prompts_per_step": 8},
                                         "ppo": {"epochs": 2, "minibatch_size": 4, "micro_batch_size": 2, **ppo}})
    return _Hyper(cfg)


def prepared(models, make_optimizer, max_grad_norm: float = 1.0):
    """PPOModels handed to the one-process strategy with the optimizer `make_optimizer(params)` (e.g. SGD at lr 0,
    to read gradients): the strategy ppo_step takes."""
    from pipeline.strategy import Local, Optim

    strategy = Local()
    models.prepare(strategy, Optim(lr=0.0, max_grad_norm=max_grad_norm, make=make_optimizer))
    return strategy


def tiny_sft_block(**over):
    block = {
        "stage": "sft",
        "model": "tiny",
        "data": {"train": "synthetic:sft", "eval_fraction": 0.1},
        "max_length": 64,
        "precision": "fp32",
        "optim": {"lr": 3e-3, "epochs": 2, "per_device_batch_size": 16, "logging_steps": 5},
    }
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(block.get(k), dict):
            block[k] = {**block[k], **v}
        else:
            block[k] = v
    if block["optim"].get("max_steps", -1) > 0 and "epochs" not in over.get("optim", {}):
        del block["optim"]["epochs"]  # capped by steps, as a user writes it (epochs beside max_steps is refused)
    return block


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """configs/tiny.yaml run once (SFT -> preferences -> reward -> PPO), shared by the tests that read it."""
    from pipeline.cli import main

    run = tmp_path_factory.mktemp("tiny") / "run"
    assert main(["run", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", str(run)]) == 0
    return run
