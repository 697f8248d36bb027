"""PPO optimises the distribution it sampled from (the implementation details TRL's and OpenRLHF's PPO
share): temperature in every log-prob, sampling settings from the stage config only, no dropout, adapter
policies merged before training, a critic on the rewards' scale, and the learning-rate schedule."""

import copy
import json

import pytest
import torch

from pipeline import artifacts
from pipeline.cli import main
from pipeline.rl import losses
from pipeline.rl.models import PPOModels
from pipeline.rl.ppo import ppo_step
from pipeline.rl.rollout import RewardFunction, generate, score_rollout
from tests.conftest import ppo_hyper, prepared, tiny_sft_block, write_yaml

PROMPTS = ["Tell me about the river.", "Describe the mountain.", "What is the forest like?", "Talk about the sea."]


def _tiny(tiny_path, **config):
    from pipeline.models import load_causal_lm, load_tokenizer

    policy = load_causal_lm(tiny_path)
    if config:
        from transformers import AutoModelForCausalLM

        policy = AutoModelForCausalLM.from_pretrained(tiny_path, **config)
    return policy, load_tokenizer(tiny_path)


@pytest.mark.parametrize("model_settings", [{}, {"repetition_penalty": 1.3, "top_k": 5, "no_repeat_ngram_size": 2}],
                         ids=["plain", "generation_config.json with a repetition penalty"])
def test_training_log_probs_equal_the_samplers_at_temperature_07(tiny_path, model_settings):
    """The log-probs PPO trains on (old, new, reference) are the ones the sampler drew each token with: logits / T,
    and nothing from the model's own generation_config.json."""
    policy, tok = _tiny(tiny_path)
    for key, value in model_settings.items():
        setattr(policy.generation_config, key, value)
    models = PPOModels(policy, tok, "head", temperature=0.7)
    torch.manual_seed(0)
    ro = generate(models, PROMPTS * 2, 16, keep_scores=True)
    with torch.no_grad():
        logp, _, _ = models.forward(ro)
        ref, _, _ = models.forward(ro, reference=True)
    assert ro.mask.sum() > 20
    assert (logp * ro.mask - ro.sampler_logp).abs().max().item() < 1e-5
    assert (ref * ro.mask - ro.sampler_logp).abs().max().item() < 1e-5  # the reference is the untrained policy
    for key, value in model_settings.items():  # the model's own settings are put back after sampling
        assert getattr(policy.generation_config, key) == value


def test_no_dropout_anywhere_so_the_first_update_has_ratio_one(tiny_path, monkeypatch):
    """With lr 0 nothing moves, so every minibatch must see ratio 1 and approx KL 0, even with LoRA dropout and
    attention dropout configured: PPO switches dropout off in every model (TRL's and OpenRLHF's PPO do too)."""
    from peft import get_peft_model

    from pipeline.blocks import LoraConfig
    from pipeline.stages.common import peft_config

    policy, tok = _tiny(tiny_path, attention_dropout=0.3)
    policy = get_peft_model(policy, peft_config(LoraConfig(r=4, dropout=0.5, target_modules=["q_proj", "v_proj"])))
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.3)  # a non-trivial adapter: dropout on its input changes the output
    models = PPOModels(policy, tok, "head", lora=True)
    opt = prepared(models, lambda p: torch.optim.AdamW(p, lr=0.0), 1.0)
    torch.manual_seed(0)
    ro = generate(models, PROMPTS * 2, 12)
    score_rollout(models, ro, RewardFunction(rule="feedback.synthetic:rule_score"), None, 1)
    import pipeline.rl.ppo as ppo_loop

    checks = []
    real_check = ppo_loop.check_finite
    monkeypatch.setattr(ppo_loop, "check_finite", lambda step, **v: (checks.append(sorted(v)), real_check(step, **v)))
    out = ppo_step(models, opt, ro, ppo_hyper(), losses.FixedKLController(0.05), 1)
    # one finiteness check (one reduction over processes) per minibatch, before its update: 2 epochs x 2 minibatches
    assert checks == [["grad_norm", "loss"]] * 4
    assert out["ppo/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert out["ppo/approx_kl"] == pytest.approx(0.0, abs=1e-6)
    assert out["ppo/clipfrac"] == 0.0


def test_critic_from_the_reward_model_predicts_on_the_rewards_scale(tiny_run, tmp_path):
    """A reward model whose raw scores are on another scale than its normalised ones (here: its score head
    scaled by 10, and its stored mean and std with it, so the normalised scores are unchanged): the critic it
    initialises must predict normalised values, as the rewards it is trained on are normalised (OpenRLHF's
    critic does the same with the reward model's mean and std). On the first rollout its values sit on the
    returns' scale (mean within one unit, spread within 4x), and its mean value error is a fraction of the same
    critic's on the raw scale. (Against a zero value head its error is about equal, not always smaller: the
    reward model never saw the partial responses a critic reads at every token.)"""
    import shutil

    from safetensors.torch import load_file, save_file

    from pipeline.models import load_causal_lm, load_tokenizer
    from reward.scoring import load_reward_model

    rm = tmp_path / "reward"
    shutil.copytree(tiny_run / "reward", rm)
    weights = load_file(str(rm / "model" / "model.safetensors"))
    for k in [k for k in weights if k.startswith("score.")]:
        weights[k] = weights[k] * 10
    save_file(weights, str(rm / "model" / "model.safetensors"), metadata={"format": "pt"})
    manifest = json.loads((rm / "manifest.json").read_text())
    norm = manifest["normalization"]
    norm["mean"], norm["std"] = norm["mean"] * 10, norm["std"] * 10
    (rm / "manifest.json").write_text(json.dumps(manifest))

    policy_dir = str(tiny_run / "sft" / "model")
    tok = load_tokenizer(policy_dir)
    reward_fn = RewardFunction(str(rm), normalize=True)
    errors, scale = {}, {}
    for name, value_model, scale_stats in (("head", "head", None), ("critic", "critic", (norm["mean"], norm["std"])),
                                           ("critic on the raw scale", "critic", (0.0, 1.0))):
        critic = load_reward_model(str(rm / "model")) if value_model == "critic" else None
        models = PPOModels(load_causal_lm(policy_dir), tok, value_model, critic,
                           critic_scale=scale_stats or (0.0, 1.0))
        torch.manual_seed(0)
        ro = generate(models, PROMPTS * 4, 12)
        score_rollout(models, ro, reward_fn, None, 1)
        # gamma = lam = 1 and no KL penalty: every token's return is the sequence's (normalised) score
        rewards = losses.shape_rewards(ro.scores, torch.zeros_like(ro.mask), ro.mask, 0.0)
        _, returns = losses.gae(rewards, ro.values, ro.mask, 1.0, 1.0)
        errors[name] = losses.masked_mean((ro.values - returns).abs(), ro.mask).item()
        v, r = ro.values[ro.mask.bool()], returns[ro.mask.bool()]
        scale[name] = (abs(v.mean() - r.mean()).item(), (v.std() / r.std()).item())
    assert scale["critic"][0] < 1.0 and 0.25 < scale["critic"][1] < 4.0, scale
    assert errors["critic"] * 4 < errors["critic on the raw scale"], errors


def _metrics(path, key):
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    return [r[key] for r in rows if key in r]


def test_ppo_follows_the_learning_rate_schedule(tiny_run, tmp_path):
    """optim.scheduler and warmup_ratio step once per optimizer step: 4 steps x 1 epoch x 1 minibatch, linear
    with warm-up over the first of them -> 0, lr, 2/3 lr, 1/3 lr (transformers' linear schedule)."""
    ppo = {"stage": "ppo", "name": "ppo_sched", "policy": "stage:sft", "reward": {"rule": "feedback.synthetic:rule_score"},
           "prompts": "synthetic:prompts", "steps": 4, "precision": "fp32", "max_eval_prompts": 4,
           "rollout": {"prompts_per_step": 8, "max_new_tokens": 8},
           "ppo": {"epochs": 1, "minibatch_size": 8, "micro_batch_size": 8},
           "optim": {"lr": 3e-4, "scheduler": "linear", "warmup_ratio": 0.25}}
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(tiny_run), "seed": 0, "tracking": {"wandb": True},
                                           "stages": [{"stage": "sft", "model": "tiny", "data": {"train": "synthetic:sft"}},
                                                      ppo]})
    assert main(["run", str(cfg), "--stage", "ppo_sched"]) == 0
    # tracking.wandb is honoured by PPO's own loop too: an offline run under the run directory
    runs = list((tiny_run / "wandb").glob("offline-run-*ppo_sched*"))
    assert len(runs) == 1, list((tiny_run / "wandb").iterdir())
    lrs = _metrics(tiny_run / "ppo_sched" / "metrics.jsonl", "ppo/lr")
    assert lrs == pytest.approx([0.0, 3e-4, 2e-4, 1e-4], abs=1e-9)


def test_ppo_optim_block_takes_only_what_ppo_uses(tmp_path, capsys):
    """Keys PPO never read (epochs, batch_size, ... of the shared block) are refused, not silently ignored;
    so is a warm-up with the constant schedule, greedy rollouts, top-p (PPO samples the full distribution:
    there is no such key) and a LoRA dropout (PPO turns every dropout off)."""
    base = {"stage": "ppo", "policy": "tiny", "reward": {"rule": "feedback.synthetic:rule_score"},
            "prompts": "synthetic:prompts"}
    for extra, message in (({"optim": {"batch_size": 4}}, "stages.ppo.optim.batch_size: unknown key"),
                           ({"optim": {"warmup_ratio": 0.1}}, "'constant' has none"),
                           ({"rollout": {"top_p": 0.9}}, "stages.ppo.rollout.top_p: unknown key"),
                           ({"rollout": {"temperature": 0}}, "temperature must be > 0 for PPO"),
                           ({"tuning": "lora", "lora": {"dropout": 0.1}}, "lora.dropout has no effect in PPO")):
        cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(tmp_path / "run"), "stages": [{**base, **extra}]})
        assert main(["run", str(cfg), "--check"]) == 2
        assert message in capsys.readouterr().err


def test_adapter_policies_are_merged_before_ppo_dpo_and_grpo(tmp_path):
    """An SFT policy saved as a LoRA adapter (lora.merge: false) is what PPO, DPO and GRPO start from and
    compare against: their reference is the adapted policy (KL 0 before the first update), never the bare
    base, with a new LoRA adapter on top and with full tuning (every weight trainable)."""
    run = tmp_path / "run"
    sft = tiny_sft_block(tuning="lora", lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                              "merge": False}, optim={"lr": 5e-2, "max_steps": 6})
    lora = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]}
    ppo = {"stage": "ppo", "policy": "stage:sft", "reward": {"rule": "feedback.synthetic:rule_score"},
           "prompts": "synthetic:prompts", "steps": 1, "precision": "fp32", "max_eval_prompts": 8,
           "rollout": {"prompts_per_step": 8, "max_new_tokens": 8},
           "ppo": {"epochs": 1, "minibatch_size": 8, "micro_batch_size": 8}, "optim": {"lr": 1e-4}}
    dpo = {"stage": "dpo", "policy": "stage:sft", "preferences": "stage:preferences", "max_length": 64,
           "precision": "fp32", "optim": {"lr": 1e-4, "max_steps": 1, "batch_size": 4, "logging_steps": 1}}
    grpo = {"stage": "grpo", "policy": "stage:sft", "prompts": "synthetic:prompts", "reward": {"rule": "feedback.synthetic:rule_score"},
            "beta": 0.1, "num_generations": 4, "max_completion_length": 8, "precision": "fp32",
            "optim": {"lr": 1e-4, "max_steps": 1, "batch_size": 4, "logging_steps": 1}}
    stages = [sft, {"stage": "preferences", "data": {"path": "synthetic:preferences"}},
              {**ppo, "name": "ppo_full"}, {**ppo, "name": "ppo_lora", "tuning": "lora", "lora": lora},
              {**dpo, "name": "dpo_full"}, {**dpo, "name": "dpo_lora", "tuning": "lora", "lora": lora},
              {**grpo, "name": "grpo_full"}]
    assert main(["run", str(write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "seed": 0, "stages": stages}))]) == 0
    assert artifacts.load_artifact(run / "sft", "policy").manifest["model"]["adapter"] is True
    for name in ("ppo_full", "ppo_lora"):
        m = artifacts.load_artifact(run / name, "policy").manifest
        assert m["metrics"]["eval/kl_initial"] == pytest.approx(0.0, abs=1e-5), name
    for name in ("ppo_full", "dpo_full", "grpo_full"):
        model = artifacts.load_artifact(run / name, "policy").manifest["model"]
        assert model["trainable"] == model["parameters"], name
    for name in ("dpo_full", "dpo_lora"):  # implicit rewards of the untrained policy against its reference: 0
        assert _metrics(run / name / "metrics.jsonl", "rewards/chosen")[0] == pytest.approx(0.0, abs=1e-5), name
    assert _metrics(run / "grpo_full" / "metrics.jsonl", "train/kl")[0] == pytest.approx(0.0, abs=1e-6)
    assert not list(run.glob("*/.inputs"))  # the merged copies are not part of any artifact


def test_ppo_step_uses_the_kl_coefficient_it_is_given(tiny_path):
    """The KL penalty reaches the returns. A rollout whose reference log-probs sit 0.1 below the policy's on every
    token (k1 KL 0.1 a token), gamma = lambda = 1, no whitening, a zero value head: each token's return is
    score - coef * 0.1 * (tokens from it to the end). Worked for each response and averaged over tokens, for
    coef 0.05 and 0: the two differ, and each matches ppo/return_mean."""
    policy, tok = _tiny(tiny_path)
    results = {}
    for coef in (0.05, 0.0):
        models = PPOModels(copy.deepcopy(policy), tok, "head")
        ro = generate(models, PROMPTS * 2, 8, keep_scores=True, seeds=list(range(8)))
        score_rollout(models, ro, RewardFunction(rule="feedback.synthetic:rule_score"), None, 1)
        ro.ref_logp = ro.logp - 0.1 * ro.mask
        opt = prepared(models, lambda p: torch.optim.SGD(p, lr=0.0), 1.0)
        hp = ppo_hyper(gamma=1.0, lam=1.0, whiten_advantages=False, reward_clip=None)
        out = ppo_step(models, opt, ro, hp, losses.FixedKLController(coef), 1)
        want, n = 0.0, 0
        for score, length in zip(ro.scores.tolist(), ro.mask.sum(1).long().tolist()):
            want += sum(score - coef * 0.1 * (length - t) for t in range(length))
            n += length
        assert out["ppo/return_mean"] == pytest.approx(want / n, abs=1e-5), coef
        assert out["ppo/kl"] == pytest.approx(0.1 * ro.mask.sum(1).mean().item(), abs=1e-5)
        results[coef] = out["ppo/return_mean"]
    assert results[0.05] < results[0.0] - 0.01


def test_ppo_turns_dropout_off_checks_it_and_saves_the_policys_own_rates(tiny_run, tmp_path, monkeypatch, capsys):
    """A policy whose config has attention_dropout 0.1: PPO trains with it off (the stage's start-up check would
    refuse it left on, as it does when disable_dropout is skipped), and the saved policy's config keeps 0.1."""
    import shutil

    policy = tmp_path / "policy"
    shutil.copytree(tiny_run / "sft" / "model", policy)
    config = json.loads((policy / "config.json").read_text())
    (policy / "config.json").write_text(json.dumps({**config, "attention_dropout": 0.1}))
    ppo = {"stage": "ppo", "name": "ppo_dropout", "policy": str(policy), "reward": {"rule": "feedback.synthetic:rule_score"},
           "prompts": "synthetic:prompts", "steps": 1, "max_eval_prompts": 4,
           "rollout": {"prompts_per_step": 8, "max_new_tokens": 8},
           "ppo": {"epochs": 1, "minibatch_size": 8, "micro_batch_size": 8}}
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(tmp_path / "run"), "stages": [ppo]})
    assert main(["run", str(cfg)]) == 0
    saved = json.loads((tmp_path / "run" / "ppo_dropout" / "model" / "config.json").read_text())
    assert saved["attention_dropout"] == 0.1
    import pipeline.rl.models as rl_models

    monkeypatch.setattr(rl_models, "disable_dropout", lambda model: (lambda: None))
    assert main(["run", str(cfg), "--force"]) == 1
    assert "is not deterministic in training mode" in capsys.readouterr().err


def test_rollout_length_and_the_missing_eos_penalty_reach_the_loop(tiny_run, tmp_path):
    """rollout.max_new_tokens caps every response (2 tokens here: most have no EOS yet), and
    rollout.missing_eos_penalty is taken off each response without one. Both runs sample the same responses (each
    from its own seed), so their mean rewards differ by exactly penalty x (1 - EOS rate)."""
    ppo = {"stage": "ppo", "policy": "stage:sft", "reward": {"rule": "feedback.synthetic:rule_score"},
           "prompts": "synthetic:prompts", "steps": 1, "max_eval_prompts": 4,
           "rollout": {"prompts_per_step": 8, "max_new_tokens": 2},
           "ppo": {"epochs": 1, "minibatch_size": 8, "micro_batch_size": 8}}
    penalised = {**ppo, "name": "ppo_penalised", "rollout": {**ppo["rollout"], "missing_eos_penalty": 5.0}}
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(tiny_run), "seed": 0, "stages": [
        {"stage": "sft", "model": "tiny", "data": {"train": "synthetic:sft"}}, {**ppo, "name": "ppo_plain"}, penalised]})
    assert main(["run", str(cfg), "--stage", "ppo_plain", "--stage", "ppo_penalised"]) == 0
    plain, pen = (json.loads((tiny_run / name / "metrics.jsonl").read_text().splitlines()[0])
                  for name in ("ppo_plain", "ppo_penalised"))
    assert plain["ppo/response_length"] <= 2 and pen["ppo/response_length"] <= 2
    assert plain["ppo/eos_rate"] == pen["ppo/eos_rate"] < 1
    assert plain["ppo/reward_mean"] - pen["ppo/reward_mean"] == pytest.approx(5.0 * (1 - pen["ppo/eos_rate"]), abs=1e-5)
