"""Policy optimisation on the shipped task, starting from the tiny SFT policy: PPO (ours) and DPO
raise the held-out rule reward by a clear margin; GRPO and RLOO run end to end; guards stop PPO."""

import json

import torch

from pipeline import artifacts
from pipeline.cli import main
from pipeline.rl.models import PPOModels
from tests.conftest import ROOT, write_yaml

DESIGN_PPO_METRICS = ("ppo/reward_mean", "ppo/kl", "ppo/entropy", "ppo/clipfrac", "ppo/approx_kl", "ppo/value_loss",
                      "ppo/response_length", "ppo/reward_std", "ppo/explained_variance", "ppo/eos_rate",
                      "ppo/ratio_mean")


def test_ppo_raises_held_out_rule_reward_within_kl_ceiling(tiny_run):
    art = artifacts.load_artifact(tiny_run / "ppo", "policy")
    m = art.manifest["metrics"]
    before, after = m["eval/rule_reward_mean_initial"], m["eval/rule_reward_mean"]
    # stated margin: +0.2 mean rule reward on held-out prompts (measured: about 0.29 -> 0.74)
    assert after >= before + 0.2, (before, after)
    assert m["eval/reward_mean"] > m["eval/reward_mean_initial"]
    assert m["eval/kl"] < 20, "under configs/tiny.yaml's kl.ceiling"
    assert_mfu(m, reference=True)  # rollouts, the reference and the reward model: forwards alone
    for stage in ("sft", "reward"):  # the TRL-trained stages of the same run
        assert_mfu(artifacts.load_artifact(tiny_run / stage, ("policy", "reward_model")).manifest["metrics"])
    rows = [json.loads(x) for x in (tiny_run / "ppo" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and all(k in rows[0] for k in DESIGN_PPO_METRICS)
    assert (tiny_run / "ppo" / "value_head.safetensors").exists()
    assert art.manifest["ppo_state"]["kl_coef"] == 0.05
    samples = (tiny_run / "ppo" / "samples.jsonl").read_text().splitlines()
    assert any(json.loads(s)["step"] == "final-eval" for s in samples)
    sft = artifacts.load_artifact(tiny_run / "sft", "policy")
    from safetensors.torch import load_file

    a, b = load_file(str(sft.output("model") / "model.safetensors")), load_file(str(art.output("model") / "model.safetensors"))
    assert any(not torch.equal(a[k], b[k]) for k in a)


def _ppo_block(**over):
    block = {"stage": "ppo", "policy": "stage:sft", "reward": {"model": "stage:reward"}, "prompts": "synthetic:prompts",
             "steps": 2, "precision": "fp32", "rollout": {"prompts_per_step": 8, "max_new_tokens": 12},
             "ppo": {"epochs": 1, "minibatch_size": 8, "micro_batch_size": 4}, "optim": {"lr": 1e-4},
             "max_eval_prompts": 8}
    block.update(over)
    return block


def _run_extra(tiny_run, tmp_path, block, name):
    # the earlier stages are named so that stage: references validate; only `name` runs, on tiny_run's artifacts
    cfg = {"run_dir": str(tiny_run), "seed": 0, "trusted_modules": ["tests.helpers"], "stages": [
        {"stage": "sft", "model": "tiny", "data": {"train": "synthetic:sft"}},
        {"stage": "preferences", "data": {"path": "synthetic:preferences"}},
        {"stage": "reward", "model": "stage:sft", "preferences": "stage:preferences"},
        {**block, "name": name}]}
    return main(["run", str(write_yaml(tmp_path / f"{name}.yaml", cfg)), "--stage", name])


def test_nan_reward_stops_ppo_and_leaves_no_artifact(tiny_run, tmp_path, capsys):
    block = _ppo_block(reward={"rule": "tests.helpers:nan_reward"})
    assert _run_extra(tiny_run, tmp_path, block, "ppo_nan") == 1
    err = capsys.readouterr().err
    assert "PPO step 1: reward is not finite" in err and "before anything is saved" in err
    assert not (tiny_run / "ppo_nan").exists()


def test_ppo_without_held_out_prompts_says_so_rather_than_nan(tiny_run, tmp_path, capsys):
    """With eval_fraction: 0 nothing is measured before and after: the summary says so and gives the last step's
    rollouts (it printed "reward_mean nan -> nan, KL nan")."""
    block = _ppo_block(eval_fraction=0)
    block.pop("max_eval_prompts")
    assert _run_extra(tiny_run, tmp_path, block, "ppo_no_eval") == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("[ppo_no_eval] 2 steps in"))
    assert "no held-out prompts (eval_fraction: 0); last step's rollouts: reward_mean " in line, line
    assert "nan" not in line, line


def test_kl_ceiling_stops_with_a_reason(tiny_run, tmp_path, capsys):
    block = _ppo_block(kl={"ceiling": 1e-6}, optim={"lr": 1e-2})
    assert _run_extra(tiny_run, tmp_path, block, "ppo_kl") == 1
    err = capsys.readouterr().err
    assert "above kl.ceiling" in err and "reward hacking" in err
    assert not (tiny_run / "ppo_kl").exists()


def test_ppo_lora_reference_is_the_disabled_adapter(tiny_run, tmp_path):
    block = _ppo_block(tuning="lora", lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
                       value_model="critic")
    assert _run_extra(tiny_run, tmp_path, block, "ppo_lora") == 0
    m = artifacts.load_artifact(tiny_run / "ppo_lora", "policy").manifest
    assert m["model"]["tuning"] == "lora" and (tiny_run / "ppo_lora" / "critic").is_dir()
    # the mechanism: no reference copy; disabling the adapter gives the base model's log-probs
    from peft import get_peft_model

    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.rl.rollout import generate
    from pipeline.stages.common import peft_config
    from pipeline.blocks import LoraConfig

    path = str(tiny_run / "sft" / "model")
    base, tok = load_causal_lm(path), load_tokenizer(path)
    peft = get_peft_model(load_causal_lm(path), peft_config(LoraConfig(r=4, target_modules=["q_proj"])))
    with torch.no_grad():
        for p in peft.parameters():
            if p.requires_grad:
                p.add_(0.5)  # make the adapter non-trivial
    models = PPOModels(peft, tok, "head", lora=True)
    assert models.reference is None
    ro = generate(models, ["Tell me about the river."], 8)
    with torch.no_grad():
        ref, _, _ = models.forward(ro, reference=True)
        pol, _, _ = models.forward(ro, with_values=False)
        base_models = PPOModels(base, tok, "head")
        want, _, _ = base_models.forward(ro, with_values=False)
    assert torch.allclose(ref, want, atol=1e-5) and not torch.allclose(pol, want, atol=1e-3)


def assert_mfu(m: dict, reference: bool = False) -> None:
    """A stage's manifest metrics report its model FLOPs utilisation (pipeline/mfu.py): trained tokens, and forwards
    alone where it has a frozen reference or samples."""
    assert m["perf/tokens_trained"] > 0 and (m["perf/tokens_forward"] > 0 or not reference), m
    assert 0 < m["perf/mfu"] < 1 and m["perf/model_flops"] > 0 and m["perf/peak_flops_per_second"] > 0, m


def test_dpo_raises_held_out_rule_reward(tmp_path):
    run = tmp_path / "run"
    assert main(["run", str(ROOT / "configs" / "tiny-dpo.yaml"), "--run-dir", str(run)]) == 0
    m = artifacts.load_artifact(run / "dpo", "policy").manifest["metrics"]
    # stated margin: +0.15 (measured: about 0.27 -> 0.6)
    assert m["eval/rule_reward_mean"] >= m["eval/rule_reward_mean_initial"] + 0.15, m
    assert m["rewards/accuracies"] > 0.9 and m["rewards/margins"] > 0
    assert_mfu(m)
    # LoRA with the reference given by the disabled adapter, IPO loss: runs and writes a merged policy
    assert main(["run", str(ROOT / "configs" / "tiny-dpo.yaml"), "--run-dir", str(run), "--stage", "dpo",
                 "--set", "stages.dpo.tuning=lora", "--set", "stages.dpo.loss_type=ipo",
                 "--set", "stages.dpo.optim.max_steps=3", "--set", "stages.dpo.optim.epochs=null",
                 "--set", "stages.dpo.eval_rule=null",
                 "--set", "stages.dpo.eval_prompts=null", "--set", "stages.dpo.eval_max_new_tokens=32"]) == 0
    lora = artifacts.load_artifact(run / "dpo", "policy").manifest
    assert lora["model"]["tuning"] == "lora" and lora["model"]["loss_type"] == "ipo"
    assert (run / "dpo" / "model" / "model.safetensors").exists()


def test_grpo_and_rloo_run_end_to_end(tmp_path, tiny_path):
    from pipeline.data import read_prompts, resolve_data_path
    from pipeline.models import load_tokenizer
    from rlhf.text import chat_ids_batch

    # RLOO leaves out the prompts longer than the median one (as the chat template renders them), listing them
    prompts = read_prompts(resolve_data_path("synthetic:prompts"))
    lengths = sorted(len(ids) for ids in chat_ids_batch(load_tokenizer(tiny_path), prompts))
    limit = lengths[len(lengths) // 2]
    over = sum(n > limit for n in lengths)
    run = tmp_path / "run"
    assert main(["run", str(ROOT / "configs" / "tiny-grpo.yaml"), "--run-dir", str(run),
                 "--set", "stages.grpo.optim.max_steps=4", "--set", "stages.rloo.optim.max_steps=4",
                 "--set", f"stages.rloo.max_prompt_tokens={limit}"]) == 0
    for name in ("grpo", "rloo"):
        art = artifacts.load_artifact(run / name, "policy")
        assert art.manifest["model"]["method"] == name and art.manifest["metrics"]["train/steps"] == 4
        assert "eval/rule_reward_mean" in art.manifest["metrics"]
        assert_mfu(art.manifest["metrics"], reference=True)  # sampling counts as forwards alone
        assert (art.output("model") / "model.safetensors").exists()
        c = art.manifest["counts"]
        assert c["skipped_prompts"] == (over if name == "rloo" else 0) and 0 < over < len(prompts)
        assert c["train_prompts"] + c["eval_prompts"] == len(prompts) - c["skipped_prompts"]
    assert sum(1 for _ in (run / "rloo" / "skipped.jsonl").open()) == over


def test_ppo_skips_prompts_over_max_prompt_tokens_and_lists_them(tiny_run, tmp_path, capsys):
    """A prompt longer than max_prompt_tokens is never sampled: counted, named by its place in the file with
    its length in skipped.jsonl, and absent from every rollout (one long prompt makes a whole batch slow)."""
    things = ("river", "lake", "sea", "park", "library", "garden", "forest", "hill", "town", "beach")
    rows = [{"prompt": f"Tell me about the {t}."} for t in things]
    for i in (2, 6, 9):  # the 3rd, 7th and 10th prompts: far over the limit
        rows.insert(i, {"prompt": "Tell me about the river and its banks. " * 20})
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    block = _ppo_block(prompts=str(path), eval_fraction=0, steps=1,
                       rollout={"prompts_per_step": 8, "max_new_tokens": 8}, max_prompt_tokens=48,
                       log_samples_every=1)
    block.pop("max_eval_prompts")
    assert _run_extra(tiny_run, tmp_path, block, "ppo_long") == 0
    assert "3 of 13 prompts over max_prompt_tokens 48 not used" in capsys.readouterr().out
    manifest = artifacts.load_artifact(tiny_run / "ppo_long", "policy").manifest
    assert manifest["counts"]["skipped_prompts"] == 3 and manifest["counts"]["train_prompts"] == 10
    skipped = [json.loads(x) for x in (tiny_run / "ppo_long" / "skipped.jsonl").read_text().splitlines()]
    assert [s["where"] for s in skipped] == [f"{path}: prompt {n}" for n in (3, 7, 10)]
    assert all(s["reason"].startswith("prompt over max_prompt_tokens: ") for s in skipped)
    sampled = [json.loads(x)["prompt"] for x in (tiny_run / "ppo_long" / "samples.jsonl").read_text().splitlines()]
    assert sampled and not any("its banks" in str(p) for p in sampled)
