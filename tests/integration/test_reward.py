"""configs/tiny.yaml end to end (SFT -> preferences -> reward), the reward model's accuracy and
normalisation, scoring text from a policy with another tokenizer, and the preferences stage's checks."""

import json

import pytest

from feedback.schema import prompt_key, read_pairs
from feedback.synthetic import prompts, rule_score
from pipeline import artifacts
from pipeline.cli import main
from tests.conftest import write_yaml


def test_reward_model_learns_the_task(tiny_run):
    art = artifacts.load_artifact(tiny_run / "reward", "reward_model")
    m = art.manifest
    assert m["metrics"]["eval/accuracy"] >= 0.9, m["metrics"]
    assert m["metrics"]["eval/accuracy"] > m["metrics"]["eval/accuracy_initial"] + 0.2
    assert m["metrics"]["eval/accuracy_human"] == m["metrics"]["eval/accuracy"]
    assert m["metrics"]["eval/margin_mean"] > 0
    assert m["normalization"]["std"] > 0 and m["normalization"]["n"] == 2 * m["counts"]["evaluated_on"]
    assert m["calibration"] and sum(b["pairs"] for b in m["calibration"]) == m["counts"]["evaluated_on"]
    assert m["inputs"]["preferences"]["manifest_hash"] == artifacts.manifest_hash(tiny_run / "preferences")


def test_reward_model_ranks_held_out_text_pairs_as_people_did(tiny_run):
    """Accuracy measured outside the stage: the saved reward model, through the scoring API on the raw text of the
    held-out pairs as the preferences stage wrote them, prefers `chosen` (so a pair encoding that swapped chosen
    and rejected, which the stage's own evaluation would share, cannot pass)."""
    from reward.scoring import RewardScorer

    pairs = [p for p in read_pairs(artifacts.load_artifact(tiny_run / "preferences", "preferences").output("eval"))
             if not p.tie]
    scorer = RewardScorer.from_artifact(tiny_run / "reward")
    chosen, _ = scorer.score([p.prompt for p in pairs], [p.chosen for p in pairs])
    rejected, _ = scorer.score([p.prompt for p in pairs], [p.rejected for p in pairs])
    accuracy = sum(c > r for c, r in zip(chosen, rejected)) / len(pairs)
    assert len(pairs) > 50 and accuracy >= 0.9, accuracy


def test_preferences_split_by_prompt(tiny_run):
    art = artifacts.load_artifact(tiny_run / "preferences", "preferences")
    train = list(read_pairs(art.output("train")))
    evals = list(read_pairs(art.output("eval")))
    assert len(train) + len(evals) == 600 == art.manifest["counts"]["accepted"]
    assert not {prompt_key(p.prompt) for p in train} & {prompt_key(p.prompt) for p in evals}
    assert 0.1 < len(evals) / 600 < 0.3


def test_score_cli_normalises_with_manifest_stats(tiny_run, tmp_path, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Tell me about the lake.", "response": "The lake is calm and lovely."})
                    + "\n" + json.dumps({"prompt": "Tell me about the lake.", "chosen": "The lake is warm.",
                                         "rejected": "The lake is dirty."}) + "\n")
    out = tmp_path / "scores.jsonl"
    assert main(["reward", "score", "--model", str(tiny_run / "reward"), "--input", str(rows), "-o", str(out)]) == 0
    got = [json.loads(x) for x in out.read_text().splitlines()]
    norm = artifacts.read_manifest(tiny_run / "reward")["normalization"]
    assert got[0]["response_score_normalized"] == pytest.approx(
        (got[0]["response_score"] - norm["mean"]) / norm["std"], abs=1e-5)
    assert got[1]["chosen_score"] > got[1]["rejected_score"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}\n')
    assert main(["reward", "score", "--model", str(tiny_run / "reward"), "--input", str(bad)]) == 1
    assert f"{bad}:1:" in capsys.readouterr().err


def test_reward_model_with_another_tokenizer_scores_policy_outputs(tiny_run, tmp_path):
    """A reward model built on tiny-alt (other tokenizer, other template) scores what the tiny SFT policy writes."""
    import torch

    from pipeline.models import load_causal_lm, load_tokenizer
    from reward.scoring import RewardScorer

    cfg = {"run_dir": str(tiny_run), "seed": 0, "stages": [
        {"stage": "preferences", "data": {"path": "synthetic:preferences"}, "eval_fraction": 0.2},
        {"stage": "reward", "name": "reward_alt", "model": "tiny-alt", "preferences": "stage:preferences",
         "max_length": 64, "precision": "fp32",
         "optim": {"lr": 2e-3, "epochs": 2, "batch_size": 16, "logging_steps": 5}}]}
    assert main(["run", str(write_yaml(tmp_path / "alt.yaml", cfg)), "--stage", "reward_alt"]) == 0
    scorer = RewardScorer.from_artifact(tiny_run / "reward_alt")
    policy_dir = str(tiny_run / "sft" / "model")
    ptok, policy = load_tokenizer(policy_dir), load_causal_lm(policy_dir)
    assert ptok.get_vocab() != scorer.tokenizer.get_vocab()

    torch.manual_seed(0)
    ps = prompts()[::6]
    batch = [ptok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                      return_dict=True)["input_ids"] for p in ps]
    width = max(map(len, batch))
    ids = torch.tensor([[ptok.pad_token_id] * (width - len(b)) + b for b in batch])
    out = policy.generate(input_ids=ids, attention_mask=(ids != ptok.pad_token_id).long(), do_sample=True,
                          max_new_tokens=20, pad_token_id=ptok.pad_token_id)
    responses = ptok.batch_decode(out[:, width:], skip_special_tokens=True)
    assert "### Assistant:" in scorer.tokenizer.decode(scorer.encode(ps[0], responses[0]))
    raw, _ = scorer.score(ps, responses)
    rules = [rule_score(p, r) for p, r in zip(ps, responses)]
    ordered = [(raw[i] > raw[j]) == (rules[i] > rules[j]) for i in range(len(ps)) for j in range(len(ps))
               if abs(rules[i] - rules[j]) >= 0.4]
    assert len(ordered) > 20 and sum(ordered) / len(ordered) > 0.85


def test_preferences_stage_fail_and_skip(tmp_path, capsys):
    data = tmp_path / "p.jsonl"
    data.write_text(json.dumps({"prompt": "Q", "chosen": "a", "rejected": "b"}) + "\n"
                    + json.dumps({"prompt": "R", "chosen": "a", "rejected": "a"}) + "\n{oops\n")
    cfg = {"run_dir": str(tmp_path / "run"), "stages": [{"stage": "preferences", "data": {"path": str(data)}}]}
    path = write_yaml(tmp_path / "p.yaml", cfg)
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert f"{data}:2: chosen and rejected are identical" in err and f"{data}:3: invalid JSON" in err
    assert "3 rows: 1 valid, 2 invalid" in err and not (tmp_path / "run" / "preferences").exists()
    assert main(["run", str(path), "--set", "stages.preferences.data.on_error=skip"]) == 0
    m = artifacts.read_manifest(tmp_path / "run" / "preferences")
    assert m["counts"]["rows_read"] == 3 and m["counts"]["accepted"] == 1 and m["counts"]["rejected"] == 2
    assert m["counts"]["rejected_by_reason"] == {"identical": 1, "invalid_json": 1}
    rejected = (tmp_path / "run" / "preferences" / "rejected.jsonl").read_text().splitlines()
    assert len(rejected) == 2
