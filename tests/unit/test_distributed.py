"""PPO's DeepSpeed set-up without launching processes: per-process shares, the ZeRO config filled from
the PPO block, inference configs for frozen models, and DeepSpeed checkpoints read with weights_only."""

import json
import pickle

import pytest
import torch

from pipeline import distributed
from rlhf.errors import UsageError
from pipeline import deepspeed as engines
from pipeline.stages.ppo import PPOStageConfig
from tests.conftest import ROOT


def _ppo(**over):
    block = {"stage": "ppo", "name": "ppo", "policy": "tiny", "reward": {"rule": "feedback.synthetic:rule_score"},
             "prompts": "synthetic:prompts", "rollout": {"prompts_per_step": 8},
             "ppo": {"minibatch_size": 8, "micro_batch_size": 2}, **over}
    return PPOStageConfig.model_validate(block)


def test_each_process_gets_an_equal_share_or_an_error_says_why():
    assert engines.local_sizes(_ppo(), 1) == (8, 8)
    assert engines.local_sizes(_ppo(), 2) == (4, 4)
    with pytest.raises(UsageError, match=r"must divide by the number of processes \(3\)"):
        engines.local_sizes(_ppo(), 3)
    # 4 processes: 2 prompts each, minibatch 2 each, but micro-batches of 4 do not fit
    with pytest.raises(UsageError, match=r"by ppo.micro_batch_size \(4\)"):
        engines.local_sizes(_ppo(ppo={"minibatch_size": 8, "micro_batch_size": 4}), 4)
    # 16 prompts in minibatches of 12 leave a partial minibatch: unequal numbers of updates
    with pytest.raises(UsageError, match="same number of equal micro-batches"):
        engines.local_sizes(_ppo(rollout={"prompts_per_step": 16}, ppo={"minibatch_size": 12,
                                                                        "micro_batch_size": 2}), 2)


def test_zero_config_is_filled_from_the_ppo_block(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    cfg = _ppo(deepspeed=str(ROOT / "configs" / "deepspeed" / "zero3.json"), optim={"max_grad_norm": 0.5})
    ds = engines.ds_config(cfg, "fp32", hidden=64)
    assert ds["train_micro_batch_size_per_gpu"] == 2 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 8 and ds["gradient_clipping"] == 0.5
    z = ds["zero_optimization"]
    assert z["reduce_bucket_size"] == 64 * 64 and z["stage3_param_persistence_threshold"] == 640
    assert ds["bf16"]["enabled"] is False
    # an inference engine for a frozen model: no optimizer, sharded, shards in CPU memory with offload
    inf = engines.inference_config({**ds, "optimizer": {"type": "AdamW"},
                                    "zero_optimization": {**z, "offload_optimizer": {"device": "cpu"}}}, True)
    assert "optimizer" not in inf and "offload_optimizer" not in inf["zero_optimization"]
    assert inf["zero_optimization"]["offload_param"]["device"] == "cpu" and inf["zero_optimization"]["stage"] == 3
    # unknown hidden size: DeepSpeed's own defaults, not the string "auto"
    assert "reduce_bucket_size" not in engines.fill_buckets({"zero_optimization": {"reduce_bucket_size": "auto"}},
                                                            None)["zero_optimization"]


def test_zero_config_disagreeing_with_the_ppo_block_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    ds = tmp_path / "z.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 4}))
    with pytest.raises(UsageError, match="gradient_accumulation_steps is 4 but stages.ppo"):
        engines.ds_config(_ppo(deepspeed=str(ds)), "fp32", None)


class _Payload:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_deepspeed_checkpoints_are_read_with_weights_only(tmp_path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.zero.config import ZeroStageEnum

    engines.safe_deepspeed_loading()
    engines.safe_deepspeed_loading()  # idempotent
    reader = TorchCheckpointEngine()
    good = tmp_path / "optim.pt"
    torch.save({"zero_stage": ZeroStageEnum.gradients, "state": torch.ones(2)}, good)
    assert reader.load(str(good))["zero_stage"] == ZeroStageEnum.gradients
    bad = tmp_path / "evil.pt"
    bad.write_bytes(pickle.dumps({"x": _Payload()}, protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        reader.load(str(bad))


def test_reductions_are_identities_on_one_process():
    assert distributed.any_rank(True) is True and distributed.any_rank(False) is False
    assert distributed.mean_over_ranks({"a": 1.5}) == {"a": 1.5}
    t = torch.tensor([1.0, 2.0])
    assert distributed.gather(t) is t


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "deepspeed").glob("*.json")), ids=lambda p: p.name)
def test_every_deepspeed_config_switches_on_the_weights_only_reader(monkeypatch, path):
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    from pipeline.blocks import OptimConfig

    monkeypatch.setattr(TorchCheckpointEngine, "load", lambda self, path, map_location=None: None)  # DeepSpeed's own
    engines.load_zero_config(path, OptimConfig(), "fp32", "stages.sft")
    assert getattr(TorchCheckpointEngine.load, "_weights_only", False)
