"""The evaluate stage and `rlhf eval`: every policy answers the same held-out prompts with the same seed; rewards,
rule, KL to a reference, lengths, EOS, distinct-n and win rates with intervals, written per prompt and in the
manifest; the same seed gives the same numbers."""

import csv
import json

import pytest

from pipeline import artifacts
from pipeline.cli import main
from pipeline.stages.evaluate import distinct_n, win_rate, wilson
from tests.conftest import ROOT


def test_wilson_distinct_and_win_rate_by_hand():
    # 8 wins of 10: p = 0.8, z = 1.96: centre (0.8 + 0.192) / 1.384 = 0.7168, half 0.2281
    low, high = wilson(8, 10)
    assert low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 0) != wilson(0, 0)  # nan: no pairs, no interval
    # "a b a b" has bigrams (a b) (b a) (a b): 2 distinct of 3; unigrams: 2 of 4
    assert distinct_n(["a b a b"], 2) == pytest.approx(2 / 3) and distinct_n(["a b a b"], 1) == 0.5
    assert distinct_n(["a"], 2) == 0.0
    w = win_rate(["win", "tie", "loss", "abstain"])  # (1 + 0.5) / 3 decided
    assert w["win_rate"] == pytest.approx(0.5) and w["pairs"] == 3 and w["abstained"] == 1


def test_evaluate_stage_on_the_tiny_run(tiny_run):
    art = artifacts.load_artifact(tiny_run / "evaluate", "eval")
    m, ev = art.manifest["metrics"], art.manifest["evaluate"]
    assert set(ev["policies"]) == {"sft", "ppo", "few_shot"} and ev["baseline"] == "sft" and ev["reference"] == "sft"
    for name in ("sft", "ppo", "few_shot"):
        for key in ("reward_mean", "rule_reward_mean", "kl", "response_length", "eos_rate", "distinct_1", "distinct_2"):
            assert f"eval/{name}/{key}" in m, (name, key)
    assert m["eval/sft/kl"] == pytest.approx(0.0, abs=1e-4)  # the reference against itself
    assert m["eval/ppo/rule_reward_mean"] > m["eval/sft/rule_reward_mean"] + 0.2
    assert m["eval/ppo/reward_mean"] > m["eval/sft/reward_mean"]
    assert m["eval/ppo/win_rate_low"] > 0.5 and m["eval/ppo/pairs"] == art.manifest["counts"]["prompts"]
    assert "eval/sft/win_rate" not in m  # the baseline is not judged against itself
    assert ev["policies"]["ppo"]["trainable"] > 0 and ev["policies"]["few_shot"]["kind"] == "few_shot"
    rows = [json.loads(x) for x in (tiny_run / "evaluate" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == art.manifest["counts"]["prompts"] and set(rows[0]["responses"]) == {"sft", "ppo", "few_shot"}
    assert set(rows[0]["verdicts"]) == {"ppo", "few_shot"}
    with open(tiny_run / "evaluate" / "table.csv", newline="") as f:
        table = list(csv.reader(f))
    assert table[0][:3] == ["prompt", "sft.response", "sft.reward"] and len(table) == len(rows) + 1


def test_rlhf_eval_gives_the_stages_numbers_with_the_same_seed(tiny_run, tmp_path):
    out = tmp_path / "eval"
    assert main(["eval", f"sft={tiny_run / 'sft'}", f"ppo={tiny_run / 'ppo'}", "--prompts", "synthetic:prompts",
                 "--eval-fraction", "0.2", "--rule", "feedback.synthetic:rule_score", "--reference", "sft",
                 "--judge", str(ROOT / "configs" / "judges" / "rule.yaml"), "--reward-model", str(tiny_run / "reward"),
                 "--few-shot", "tiny", "--max-new-tokens", "20", "-o", str(out)]) == 0
    got = json.loads((out / "eval.json").read_text())["metrics"]
    want = {k: v for k, v in artifacts.load_artifact(tiny_run / "evaluate", "eval").manifest["metrics"].items()
            if k.startswith("eval/")}
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value, abs=1e-6, nan_ok=True), key


def test_rlhf_eval_says_whether_its_prompts_are_held_out(tmp_path, capsys):
    """rlhf eval defaults --eval-fraction to 0: it evaluates every prompt of the file and says so, rather than
    calling them held out (issue 20, item 13)."""
    args = ["eval", "a=tiny", "b=tiny", "--prompts", "synthetic:prompts", "--max-prompts", "2", "--max-new-tokens", "2"]
    assert main([*args, "-o", str(tmp_path / "all")]) == 0
    out = capsys.readouterr().out
    assert ("2 policies x 2 prompts (prompts of synthetic:prompts: eval_fraction 0, none split off; the first 2 "
            "of 192)") in out
    assert "held-out" not in out
    assert main([*args, "--eval-fraction", "0.2", "-o", str(tmp_path / "held")]) == 0
    held = capsys.readouterr().out
    assert "2 policies x 2 held-out prompts (eval_fraction 0.2 of synthetic:prompts; the first 2 of " in held


def test_rlhf_eval_reads_one_split_of_a_dataset_dict(tmp_path, capsys):
    """A DatasetDict of prompts is read one split: train by default, --prompts-split names another (issue 20,
    item 1); the note says which were read and skipped."""
    from datasets import Dataset, DatasetDict

    d = tmp_path / "prompts"
    DatasetDict({"train": Dataset.from_list([{"prompt": f"Tell me about the river {i}."} for i in range(5)]),
                 "test": Dataset.from_list([{"prompt": "Tell me about the hill."}])}).save_to_disk(str(d))
    args = ["eval", "a=tiny", "b=tiny", "--prompts", str(d), "--max-new-tokens", "2"]
    assert main([*args, "-o", str(tmp_path / "train")]) == 0
    out = capsys.readouterr().out
    assert f"note: {d}: read split train; skipped test" in out and "2 policies x 5 prompts" in out
    assert main([*args, "--prompts-split", "test", "-o", str(tmp_path / "test")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "test" / "samples.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["Tell me about the hill."]


def test_a_rerun_that_skips_everything_still_ends_with_the_table(tiny_run, capsys):
    """`make demo` a second time: every stage is up to date, and the output still ends with the results table."""
    capsys.readouterr()
    assert main(["run", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", str(tiny_run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum("up to date, skipped" in line for line in out) == 5, out
    art = artifacts.load_artifact(tiny_run / "evaluate", "eval")
    start = out.index(f"[evaluate] 3 policies x {art.manifest['counts']['prompts']} prompts, as last run:")
    assert out[start + 1].startswith("policy") and "win rate vs sft" in out[start + 1]
    assert [line.split()[0] for line in out[start + 3:start + 6]] == ["sft", "ppo", "few_shot"], out[start:]
    # then every source's win rates against the baseline, raw and length-controlled (the judge, the reward model)
    assert out[start + 6] == "" and out[start + 7].startswith("win rate vs sft") and "length-controlled" in out[start + 7]
    assert [line.split()[0] for line in out[start + 9:]] == ["ppo", "few_shot"], out[start:]
    assert f"{art.manifest['metrics']['eval/ppo/rule_reward_mean']:.3f}" in out[start + 4]
