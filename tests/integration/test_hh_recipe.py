"""configs/hh.yaml, reduced, on the tiny model (so the recipe cannot rot): the shipped HH split, SFT, two reward
models (the trained one and the independent scorer), DPO, PPO, and the evaluate stage's win rates against SFT by
both, raw and length-controlled, with KL and the few-shot baseline, in the manifest, the printed table and the
report."""

import re

from pipeline import artifacts
from pipeline.cli import main
from pipeline.report import write_report
from tests.conftest import ROOT

CONFIG = ROOT / "configs" / "hh.yaml"
TINY = ["--set", "models.policy=tiny", "--set", "stages.evaluate.max_prompts=8",
        "--set", "stages.evaluate.sampling.max_new_tokens=8", "--set", "stages.ppo.steps=2",
        "--set", "stages.ppo.rollout.prompts_per_step=4", "--set", "stages.ppo.rollout.max_new_tokens=8",
        "--set", "stages.ppo.ppo.minibatch_size=4", "--set", "stages.ppo.ppo.micro_batch_size=4",
        "--set", "stages.ppo.max_prompt_tokens=null"]  # the tiny tokenizer takes ~4x SmolLM2's tokens for a prompt
TINY += [a for name in ("sft", "reward", "scorer", "dpo")
         for a in ("--set", f"stages.{name}.max_length=64", "--set", f"stages.{name}.optim.max_steps=3")]


def test_the_hh_recipe_reduced_on_the_tiny_model(tmp_path, capsys):
    assert "shared" not in CONFIG.read_text()  # the data ship with the project (hh:NAME), nothing beside it
    run = tmp_path / "run"
    assert main(["run", str(CONFIG), "--run-dir", str(run), *TINY]) == 0
    out = capsys.readouterr().out
    assert "win rate vs sft" in out and "scorer scorer" in out and "length-controlled" in out  # the printed table
    # DPO trains on every hh_train pair (eval_fraction 0): its summary says so and gives training numbers, not nan
    dpo = next(line for line in out.splitlines() if line.startswith("[dpo] 3 steps in"))
    assert "no held-out pairs; the last logged training step's rewards/accuracies" in dpo and "nan" not in dpo

    art = artifacts.load_artifact(run / "evaluate", "eval")
    m, ev = art.manifest["metrics"], art.manifest["evaluate"]
    assert set(ev["policies"]) == {"sft", "dpo", "ppo", "few_shot"} and ev["baseline"] == "sft"
    assert ev["scorers"] == {"scorer": "stage:scorer"} and art.manifest["counts"]["prompts"] == 8
    for n in ("dpo", "ppo", "few_shot"):
        for src in ("reward", "scorer"):
            for key in ("win_rate", "win_rate_low", "win_rate_high", "win_rate_lc", "win_rate_lc_low",
                        "win_rate_lc_high"):
                assert 0 <= m[f"eval/{n}/{src}_{key}"] <= 1, (n, src, key)
        assert f"eval/{n}/kl" in m and f"eval/{n}/scorer_mean" in m
    assert "eval/sft/reward_win_rate" not in m  # the baseline is not judged against itself
    assert abs(m["eval/sft/kl"]) < 1e-4

    # the two reward models never share a pair: the scorer trained on the scorer part, the reward model on train
    reward = artifacts.load_artifact(run / "reward", "reward_model").manifest
    scorer = artifacts.load_artifact(run / "scorer", "reward_model").manifest
    assert (reward["counts"]["train_pairs"], reward["counts"]["eval_pairs"]) == (713, 241)  # train; held-out eval
    assert (scorer["counts"]["train_pairs"], scorer["counts"]["eval_pairs"]) == (244, 241)  # scorer part; held-out eval
    # the scorer skips scoring its held-out pairs before training (eval_initial: false); the reward model does not
    assert "eval/accuracy_initial" not in scorer["metrics"] and "eval/accuracy_initial" in reward["metrics"]
    assert "[scorer] 3 steps in" in out and re.search(r"\[scorer\] 3 steps in [\d.]+s; eval accuracy [\d.]+, ", out)
    prefs = {n: artifacts.load_artifact(run / n, "preferences").manifest["counts"]
             for n in ("hh_train", "hh_eval", "hh_scorer")}
    assert prefs["hh_train"]["train"] == 713 and prefs["hh_eval"]["rejected"] == 1

    page = write_report(run).read_text()
    assert "Win rates against sft" in page and "(independent scorer)" in page and "scorer scorer" not in page
    assert "is not distinguishable from sft by the independent scorer:" in page or \
        "than sft by the independent scorer:" in page  # the verdict, without a judge, by the scorer
    policies = page[page.index('id="stage-evaluate"'):page.index("Win rates against sft")]
    assert "<th>KL</th>" in policies and "<th>95% interval</th>" not in policies  # no empty judge rows, no judge
    shown = re.sub(r'data:image/png;base64,[^"]+', "", page)
    assert not re.findall(r".{80}\de\+\d.{20}", shown)  # numbers as numbers (a peak of 10434.8 MiB was 1.043e+04)
