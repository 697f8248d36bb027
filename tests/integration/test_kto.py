"""The kto stage (TRL's KTOTrainer on binary feedback): it learns on the synthetic task (the held-out rule reward
rises, desirable answers gain implied reward over undesirable ones), its weights balance the data by default,
the rows it cannot train on are listed with their reasons, and a pairs artifact is unpaired as TRL does."""

import json

import pytest

from pipeline import artifacts
from pipeline.cli import main
from pipeline.stages.kto import balanced_weights
from tests.conftest import ROOT, write_yaml


def test_default_weights_balance_the_ratio():
    # 171 desirable, 306 undesirable: the minority weighted up so that 1.789 x 171 = 1 x 306
    assert balanced_weights(None, None, 171, 306) == pytest.approx((306 / 171, 1.0))
    assert balanced_weights(None, None, 300, 100) == pytest.approx((1.0, 3.0))
    assert balanced_weights(2.0, None, 100, 50) == pytest.approx((2.0, 4.0))  # 2 x 100 = 4 x 50
    assert balanced_weights(None, 0.5, 10, 40) == pytest.approx((2.0, 0.5))  # 2 x 10 = 0.5 x 40
    assert balanced_weights(1.2, 0.7, 10, 40) == (1.2, 0.7)  # both given: as given
    assert balanced_weights(None, None, 0, 40) == (1.0, 1.0)  # one side only: nothing to balance


def _stages(run, tmp_path, name, block, data=None):
    """tiny-kto.yaml's stages (so that stage: references validate), with `block` added as stage `name`, and a
    preferences stage `extra_prefs` reading `data` when given; runs those two on `run`'s artifacts."""
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "tiny-kto.yaml").read_text())
    cfg["run_dir"] = str(run)
    only = [name]
    if data is not None:
        cfg["stages"].append({"stage": "preferences", "name": "extra_prefs", "data": {"path": str(data)},
                              "eval_fraction": 0.0})
        only.insert(0, "extra_prefs")
    cfg["stages"].append({**block, "name": name})
    path = write_yaml(tmp_path / f"{name}.yaml", cfg)
    return main(["run", str(path), *(a for n in only for a in ("--stage", n))])


def test_kto_learns_from_unpaired_feedback(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["run", str(ROOT / "configs" / "tiny-kto.yaml"), "--run-dir", str(run)]) == 0
    art = artifacts.load_artifact(run / "kto", "policy")
    m = art.manifest
    # stated margin: +0.1 mean rule reward on the held-out prompts (measured: about 0.30 -> 0.51)
    assert m["metrics"]["eval/rule_reward_mean"] >= m["metrics"]["eval/rule_reward_mean_initial"] + 0.1, m["metrics"]
    # on held-out rows, desirable answers gained implied reward (log-prob against the reference) over undesirable ones
    assert m["metrics"]["rewards/margins"] > 0.05
    assert 0 < m["metrics"]["perf/mfu"] < 1 and m["metrics"]["perf/tokens_trained"] > 0  # pipeline/mfu.py
    c = m["counts"]
    assert (c["train_desirable"], c["train_undesirable"], c["skipped"]) == (171, 306, 0)
    assert m["weights"]["desirable"] == pytest.approx(306 / 171) and m["weights"]["undesirable"] == 1.0
    assert m["weights"]["ratio"] == pytest.approx(1.0)
    assert artifacts.load_artifact(run / "preferences", "unpaired_preferences").manifest["counts"]["desirable"] == 202

    # rows it cannot train on are listed; a pairs artifact is unpaired (chosen desirable, rejected undesirable)
    rows = [{"prompt": f"Tell me about the {t}.", "completion": f"The {t} is {a}.", "label": a == "lovely"}
            for t in ("river", "lake", "sea", "park") for a in ("lovely", "dull")]
    rows.append({"prompt": "Tell me about the river. " * 30, "completion": "The river is calm.", "label": True})
    data = tmp_path / "feedback.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    block = {"stage": "kto", "policy": "stage:sft", "preferences": "stage:extra_prefs", "max_length": 64,
             "precision": "fp32", "optim": {"max_steps": 2, "per_device_batch_size": 4}}
    capsys.readouterr()
    assert _stages(run, tmp_path, "kto_small", block, data) == 0
    # its preferences hold nothing out: the summary says so rather than silently leaving the margins out
    assert "; no held-out rows" in capsys.readouterr().out
    m = artifacts.load_artifact(run / "kto_small", "policy").manifest
    skipped = [json.loads(x) for x in (run / "kto_small" / "skipped.jsonl").read_text().splitlines()]
    assert [s["reason"].split(":")[0] for s in skipped] == ["prompt over max_length"] and m["counts"]["skipped"] == 1
    assert (m["counts"]["train_desirable"], m["counts"]["train_undesirable"]) == (4, 4)
    pairs = {"stage": "kto", "policy": "stage:sft", "preferences": "stage:pairs", "max_length": 64,
             "precision": "fp32", "optim": {"max_steps": 1, "per_device_batch_size": 4}}
    import yaml

    cfg = yaml.safe_load((ROOT / "configs" / "tiny-kto.yaml").read_text())
    cfg["run_dir"] = str(run)
    cfg["stages"] += [{"stage": "preferences", "name": "pairs", "data": {"path": "synthetic:preferences"}},
                      {**pairs, "name": "kto_pairs"},
                      {"stage": "dpo", "name": "dpo_unpaired", "policy": "stage:sft", "preferences": "stage:preferences"}]
    path = write_yaml(tmp_path / "pairs.yaml", cfg)
    assert main(["run", str(path), "--stage", "pairs", "--stage", "kto_pairs"]) == 0
    m = artifacts.load_artifact(run / "kto_pairs", "policy").manifest
    assert m["weights"]["preferences"] == "pairs (unpaired)"
    assert m["counts"]["train_desirable"] == m["counts"]["train_undesirable"] == 535  # 600 pairs, 65 held out
    # DPO refuses unpaired rows by name rather than failing inside training
    capsys.readouterr()
    assert main(["run", str(path), "--stage", "dpo_unpaired"]) == 1
    assert "'unpaired_preferences' artifact" in capsys.readouterr().err


def test_kto_config_checks():
    from pipeline.stages.kto import KTOStageConfig
    from pydantic import ValidationError

    base = {"stage": "kto", "policy": "tiny", "preferences": "stage:preferences"}
    with pytest.raises(ValidationError, match="a batch needs at least 2 rows"):
        KTOStageConfig.model_validate({**base, "optim": {"per_device_batch_size": 1}})
    KTOStageConfig.model_validate({**base, "loss_type": "apo_zero_unpaired", "optim": {"per_device_batch_size": 1}})
    with pytest.raises(ValidationError, match="eval_rule and eval_prompts work together"):
        KTOStageConfig.model_validate({**base, "eval_rule": "feedback.synthetic:rule_score"})
    with pytest.raises(ValidationError, match="greater than 0"):
        KTOStageConfig.model_validate({**base, "desirable_weight": 0})
    from rlhf.errors import UsageError

    with pytest.raises(UsageError, match="not a KTO loss of the installed TRL"):
        KTOStageConfig.model_validate({**base, "name": "kto", "loss_type": "sigmoid"}).preflight(1)
