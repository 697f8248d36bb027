"""configs/compare-tuning.yaml on the tiny model: full fine-tuning, LoRA, frozen lower layers and prompt tuning,
the few-shot base and the base itself, in one evaluate table with what each cost."""

from pipeline import artifacts
from pipeline.cli import main
from tests.conftest import ROOT

TINY = ["--set", "models.base=tiny", "--set", "stages.sft_full.optim.lr=5e-3", "--set", "stages.sft_lora.optim.lr=2e-2",
        "--set", "stages.sft_freeze.optim.lr=5e-3", "--set", "stages.sft_freeze.freeze_layers=2",
        "--set", "stages.sft_prompt.prompt_tuning.init_text=null", "--set", "stages.evaluate.max_prompts=16"]
TINY += [a for name in ("sft_full", "sft_lora", "sft_freeze", "sft_prompt")
         for a in ("--set", f"stages.{name}.max_length=64", "--set", f"stages.{name}.optim.epochs=2")]


def test_compare_tuning_on_the_tiny_model(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", str(ROOT / "configs" / "compare-tuning.yaml"), "--run-dir", str(run), *TINY]) == 0
    out = capsys.readouterr().out
    assert "trainable" in out and "win rate vs base" in out  # the printed table
    art = artifacts.load_artifact(run / "evaluate", "eval")
    policies, m = art.manifest["evaluate"]["policies"], art.manifest["metrics"]
    assert set(policies) == {"base", "full", "lora", "freeze", "prompt", "few_shot"}
    trainable = {n: policies[n]["trainable"] for n in ("full", "freeze", "lora", "prompt")}
    assert trainable["full"] > trainable["freeze"] > trainable["lora"] > trainable["prompt"] > 0, trainable
    for n in ("full", "lora", "freeze", "prompt"):
        p = policies[n]
        assert p["eval_loss"] > 0 and p["train_seconds"] > 0 and p["peak_rss_mib"] > 0, (n, p)
        assert 0 <= m[f"eval/{n}/win_rate"] <= 1 and m[f"eval/{n}/pairs"] == 16
        assert f"eval/{n}/rule_reward_mean" in m
    # every adapted model is closer to the SFT data than the base: lower held-out loss than the base started at
    base_loss = artifacts.load_artifact(run / "sft_full", "policy").manifest["metrics"]["eval/loss_initial"]
    assert all(policies[n]["eval_loss"] < base_loss for n in ("full", "lora", "freeze", "prompt")), policies
