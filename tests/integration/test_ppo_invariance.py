"""PPO's update is the minibatch's token mean however the minibatch is cut: one process with micro-batches of 1,
3, 8 rows (in any order) and, in tests/distributed, two processes give the same update to float precision."""

import pytest
import torch
from safetensors.torch import load_file

from pipeline import artifacts
from pipeline.cli import main
from pipeline.rl import losses
from pipeline.rl.models import PPOModels
from pipeline.rl.ppo import ppo_step
from pipeline.rl.rollout import RewardFunction, generate, score_rollout
from tests.conftest import ppo_hyper, prepared, write_yaml

PROMPTS = ["Tell me about the river.", "Describe the mountain.", "What is the forest like?", "Talk about the sea.",
           "Tell me about the library.", "Describe the lake.", "What is the city like?", "Talk about the rain."]


def _gradient(tiny_run, micro: int, value_model: str = "head") -> tuple[torch.Tensor, dict]:
    """The gradient of one minibatch of 8 responses (of very different lengths) at lr 0, and the step's statistics."""
    from pipeline.models import load_causal_lm, load_tokenizer
    from reward.scoring import load_reward_model

    policy_dir = str(tiny_run / "sft" / "model")
    critic = load_reward_model(str(tiny_run / "reward" / "model")) if value_model == "critic" else None
    models = PPOModels(load_causal_lm(policy_dir), load_tokenizer(policy_dir), value_model, critic)
    ro = generate(models, PROMPTS, 24, seeds=list(range(8)))
    # the case that matters: short and long responses in one minibatch. Row i keeps its first i + 1 tokens (the
    # old log-probs are then computed by the forward, as without the sampler's).
    keep = torch.arange(ro.mask.shape[1])[None, :] <= torch.arange(8)[:, None]
    ro.mask = ro.mask * keep
    ro.response = ro.response.masked_fill(ro.mask == 0, models.tok.pad_token_id)
    assert ro.mask.sum(1).tolist()[:5] == [1, 2, 3, 4, 5], ro.mask.sum(1)
    score_rollout(models, ro, RewardFunction(rule="feedback.synthetic:rule_score"), None, 1)
    opt = prepared(models, lambda p: torch.optim.SGD(p, lr=0.0), 1e9)
    params = [p for m in (models.actor_module, models.critic_module) if m is not None for p in m.parameters()
              if p.requires_grad]
    hp = ppo_hyper(epochs=1, minibatch_size=8, micro_batch_size=micro, entropy_coef=0.01)
    out = ppo_step(models, opt, ro, hp, losses.FixedKLController(0.05), 1)
    return torch.cat([p.grad.flatten() for p in params]), out


@pytest.mark.parametrize("value_model", ["head", "critic"])
def test_the_minibatch_gradient_does_not_depend_on_the_micro_batch_size(tiny_run, value_model):
    """Micro-batches of 1, 3 (3 + 3 + 2, cut from the length-sorted minibatch) and 8 rows: the same gradient and the
    same token-weighted statistics. (Before: each micro-batch's token mean weighted by its rows, 0.77 apart.)"""
    whole, stats = _gradient(tiny_run, 8, value_model)
    assert whole.norm() > 0
    for micro in (1, 3):
        g, st = _gradient(tiny_run, micro, value_model)
        assert (g - whole).norm() / whole.norm() < 1e-5, micro
        for key in ("ppo/policy_loss", "ppo/value_loss", "ppo/entropy", "ppo/ratio_mean", "ppo/approx_kl"):
            assert st[key] == pytest.approx(stats[key], rel=1e-5, abs=1e-6), (micro, key)


def _ppo_block(name: str, micro: int) -> dict:
    return {"stage": "ppo", "name": name, "policy": "stage:sft", "reward": {"rule": "feedback.synthetic:rule_score"},
            "prompts": "synthetic:prompts", "steps": 1, "precision": "fp32", "max_eval_prompts": 4,
            "rollout": {"prompts_per_step": 8, "max_new_tokens": 16},
            "ppo": {"epochs": 2, "minibatch_size": 8, "micro_batch_size": micro}, "optim": {"lr": 1e-3}}


def test_one_ppo_step_through_rlhf_run_gives_the_same_weights_at_micro_batch_1_and_8(tiny_run, tmp_path):
    """`rlhf run`, one PPO step (two epochs over one minibatch of 8) from the same SFT policy: the weight updates
    with micro_batch_size 1 and 8 agree within 1% (they differed by 25% when each micro-batch took its own mean)."""
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(tiny_run), "seed": 0, "stages": [
        {"stage": "sft", "model": "tiny", "data": {"train": "synthetic:sft"}},
        _ppo_block("ppo_micro1", 1), _ppo_block("ppo_micro8", 8)]})
    assert main(["run", str(cfg), "--stage", "ppo_micro1", "--stage", "ppo_micro8"]) == 0
    start = load_file(str(tiny_run / "sft" / "model" / "model.safetensors"))
    updates = []
    for name in ("ppo_micro1", "ppo_micro8"):
        weights = load_file(str(artifacts.load_artifact(tiny_run / name, "policy").output("model")
                                / "model.safetensors"))
        updates.append(torch.cat([(weights[k] - start[k]).flatten() for k in sorted(start)]))
    assert updates[1].norm() > 0
    rel = ((updates[0] - updates[1]).norm() / updates[1].norm()).item()
    assert rel <= 1e-2, rel
