"""Stage settings end to end: DPO counts and lists the pairs TRL would drop, GRPO holds prompts back only for
an evaluation that uses them, PPO's gradient checkpointing trains."""

import json

from pipeline import artifacts
from pipeline.cli import main
from tests.conftest import write_yaml


def test_dpo_lists_pairs_whose_prompt_fills_max_length(tmp_path):
    rows = [{"prompt": f"Tell me about the {t}.", "chosen": f"The {t} is calm and lovely.", "rejected": f"The {t} is dull."}
            for t in ("river", "sea", "forest", "mountain", "lake", "meadow")]
    long = " ".join(["Please describe it in great detail, with every little thing you notice"] * 4)
    rows += [{"prompt": f"{long} about the {t}.", "chosen": "It is calm.", "rejected": "It is dull."}
             for t in ("river", "sea")]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "seed": 0, "stages": [
        {"stage": "preferences", "data": {"path": str(data)}, "eval_fraction": 0},
        {"stage": "dpo", "policy": "tiny", "preferences": "stage:preferences", "max_length": 32, "precision": "fp32",
         "optim": {"lr": 1e-4, "max_steps": 1, "batch_size": 2, "logging_steps": 1}}]})
    assert main(["run", str(cfg)]) == 0
    m = artifacts.load_artifact(run / "dpo", "policy").manifest
    skipped = [json.loads(x) for x in (run / "dpo" / "skipped.jsonl").read_text().splitlines()]
    assert len(skipped) == 2 and all("the prompt alone is" in s["reason"] and "max_length 32" in s["reason"]
                                     for s in skipped)
    assert m["counts"]["train_pairs"] == 6 and m["counts"]["skipped"] == 2 and "dropped_by_trl" not in m["counts"]
    assert m["outputs"]["skipped"] == "skipped.jsonl"


def test_grpo_holds_prompts_back_only_for_an_evaluation(tmp_path):
    run = tmp_path / "run"
    grpo = {"stage": "grpo", "policy": "tiny", "prompts": "synthetic:prompts", "reward": {"rule": "feedback.synthetic:rule_score"},
            "num_generations": 4, "max_completion_length": 8, "precision": "fp32",
            "optim": {"lr": 1e-5, "max_steps": 1, "batch_size": 4, "logging_steps": 1}}
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "seed": 0, "stages": [
        grpo, {**grpo, "name": "grpo_eval", "eval_rule": "feedback.synthetic:rule_score"}]})
    assert main(["run", str(cfg)]) == 0
    plain = artifacts.load_artifact(run / "grpo", "policy").manifest["counts"]
    evaluated = artifacts.load_artifact(run / "grpo_eval", "policy").manifest["counts"]
    assert plain["eval_prompts"] == 0 and plain["train_prompts"] == 192
    assert evaluated["eval_prompts"] > 0 and evaluated["train_prompts"] + evaluated["eval_prompts"] == 192


def test_ppo_with_gradient_checkpointing_trains(tiny_run, tmp_path):
    ppo = {"stage": "ppo", "name": "ppo_gc", "policy": "stage:sft", "reward": {"rule": "feedback.synthetic:rule_score"},
           "prompts": "synthetic:prompts", "steps": 1, "precision": "fp32", "max_eval_prompts": 4,
           "gradient_checkpointing": True, "rollout": {"prompts_per_step": 8, "max_new_tokens": 8},
           "ppo": {"epochs": 1, "minibatch_size": 8, "micro_batch_size": 4}, "optim": {"lr": 1e-3}}
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(tiny_run), "seed": 0, "stages": [
        {"stage": "sft", "model": "tiny", "data": {"train": "synthetic:sft"}}, ppo]})
    assert main(["run", str(cfg), "--stage", "ppo_gc"]) == 0
    m = artifacts.load_artifact(tiny_run / "ppo_gc", "policy").manifest
    assert m["metrics"]["ppo/grad_norm"] > 0


def test_preferences_stage_resolves_repeated_pairs_by_majority_and_accounts_for_every_pair(tmp_path, capsys):
    from tests.conftest import ROOT

    run = tmp_path / "run"
    data = ROOT / "tests" / "data"
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "seed": 0, "stages": [
        {"stage": "preferences", "name": "votes", "eval_fraction": 0,
         "data": {"path": str(data / "edge-dup-votes.jsonl"), "duplicates": "majority", "on_error": "skip"}},
        {"stage": "preferences", "name": "ranked", "data": {"path": str(data / "edge-dup-ranked.jsonl")}}]})
    assert main(["run", str(cfg), "--stage", "votes"]) == 0
    m = artifacts.load_artifact(run / "votes", "preferences").manifest
    kept = [json.loads(x) for x in (run / "votes" / "preferences.jsonl").read_text().splitlines()]
    assert [(k["prompt"], k["chosen"]) for k in kept] == [("Q", "a"), ("S", "e")]
    rejected = [json.loads(x) for x in (run / "votes" / "rejected.jsonl").read_text().splitlines()]
    assert {r["code"] for r in rejected} == {"duplicate", "outvoted", "conflict"} and len(rejected) == 4
    assert m["agreement"]["pairs_labelled_more_than_once"] == 2
    # a ranked row that loses one pair to a duplicate: with on_error fail the stage stops and says why
    assert main(["run", str(cfg), "--stage", "ranked"]) == 1
    assert "2 rows: 2 valid, 0 invalid; 1 pair of valid rows rejected" in capsys.readouterr().err
    assert not (run / "ranked").exists()


def test_the_model_spec_reaches_the_models_trl_builds(tmp_path, monkeypatch):
    """TRL rebuilds GRPO's reference from the policy's path with its own settings: our trust_remote_code (and a
    hub id's revision) go into those settings; DPO's reference is a copy of the policy as we loaded it."""
    import trl

    from pipeline.stages import dpo, grpo
    from pipeline.stages.common import training_args

    seen = {}
    for module in (dpo, grpo):
        monkeypatch.setattr(module, "training_args", lambda cls, cfg, ctx, precision, **kw: (
            seen.setdefault(cls.__name__, kw), training_args(cls, cfg, ctx, precision, **kw))[1])
    real_dpo = trl.DPOTrainer.__init__

    def dpo_init(self, *a, ref_model=None, **kw):
        seen["dpo_ref"] = ref_model
        return real_dpo(self, *a, ref_model=ref_model, **kw)

    monkeypatch.setattr(trl.DPOTrainer, "__init__", dpo_init)
    run = tmp_path / "run"
    step = {"precision": "fp32", "optim": {"lr": 1e-5, "max_steps": 1, "batch_size": 4, "logging_steps": 1}}
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "seed": 0,
                                           "models": {"base": {"ref": "tiny", "trust_remote_code": True}},
                                           "stages": [
        {"stage": "preferences", "data": {"path": "synthetic:preferences"}},
        {"stage": "dpo", "policy": "base", "preferences": "stage:preferences", "max_length": 64, **step},
        {"stage": "grpo", "policy": "base", "prompts": "synthetic:prompts", "reward": {"rule": "feedback.synthetic:rule_score"},
         "beta": 0.1, "num_generations": 4, "max_completion_length": 8, **step}]})
    assert main(["run", str(cfg)]) == 0
    assert seen["GRPOConfig"]["trust_remote_code"] is True and seen["DPOConfig"]["trust_remote_code"] is True
    assert seen["dpo_ref"] is not None  # full tuning: a frozen copy, not TRL reloading the path
    for name in ("dpo", "grpo"):
        assert artifacts.load_artifact(run / name, "policy").manifest["model"]["trust_remote_code"] is True


def test_eval_steps_without_eval_pairs_is_a_clear_error(tmp_path, capsys):
    run = tmp_path / "run"
    step = {"precision": "fp32", "optim": {"lr": 1e-5, "max_steps": 1, "batch_size": 4, "eval_steps": 1}}
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "seed": 0, "stages": [
        {"stage": "preferences", "data": {"path": "synthetic:preferences"}, "eval_fraction": 0},
        {"stage": "reward", "model": "tiny", "preferences": "stage:preferences", "max_length": 64, **step},
        {"stage": "dpo", "policy": "tiny", "preferences": "stage:preferences", "max_length": 64, **step}]})
    for stage in ("reward", "dpo"):
        assert main(["run", str(cfg), "--stage", "preferences", "--stage", stage]) == 1
        err = capsys.readouterr().err
        assert "optim.eval_steps:" in err and "holds no usable eval pairs" in err, err


def test_group_by_length_batches_pairs_of_similar_length(tmp_path, monkeypatch):
    """optim.group_by_length on the reward stage: each batch holds pairs of similar length (less padding), where
    random batches mix short and long ones; DPO refuses the setting with a message."""
    import trl.trainer.reward_trainer as rt

    words = ["calm", "bright", "quiet", "warm", "lovely", "gentle", "soft", "clear"]
    rows = [{"prompt": f"Tell me about place {i}." + " More detail, please." * (i % 8) * 2,
             "chosen": f"Place {i} is {words[i % 8]}.", "rejected": f"Place {i} is dull."} for i in range(256)]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spreads: dict[str, list[int]] = {}
    real = rt.DataCollatorForPreference.torch_call

    def recording(self, examples):
        lengths = [max(len(e["chosen_ids"]), len(e["rejected_ids"])) for e in examples]
        spreads.setdefault(current[0], []).append(max(lengths) - min(lengths))
        return real(self, examples)

    monkeypatch.setattr(rt.DataCollatorForPreference, "torch_call", recording)
    current = [""]
    for grouped in (False, True):
        current[0] = str(grouped)
        run = tmp_path / f"run-{grouped}"
        cfg = write_yaml(tmp_path / f"p-{grouped}.yaml", {"run_dir": str(run), "seed": 0, "stages": [
            {"stage": "preferences", "data": {"path": str(data)}, "eval_fraction": 0},
            {"stage": "reward", "model": "tiny", "preferences": "stage:preferences", "max_length": 512,
             "precision": "fp32", "optim": {"lr": 1e-4, "epochs": 1, "batch_size": 8, "group_by_length": grouped}}]})
        assert main(["run", str(cfg)]) == 0
    random_spread = sum(spreads["False"]) / len(spreads["False"])
    grouped_spread = sum(spreads["True"]) / len(spreads["True"])
    assert len(spreads["True"]) == len(spreads["False"]) == 32  # the same 256 pairs, 32 batches each
    assert grouped_spread * 3 < random_spread, (spreads, random_spread, grouped_spread)

    dpo = write_yaml(tmp_path / "d.yaml", {"run_dir": str(tmp_path / "d"), "stages": [
        {"stage": "preferences", "data": {"path": str(data)}},
        {"stage": "dpo", "policy": "tiny", "preferences": "stage:preferences", "optim": {"group_by_length": True}}]})
    assert main(["run", str(dpo), "--check"]) == 2
