"""Files other tools read: a canonical preference file (here an HH-RLHF import) loads with
`datasets.load_dataset("json", ...)` and trains, unchanged, in TRL's DPOTrainer and RewardTrainer."""

import pytest

from pipeline.cli import main
from tests.conftest import ROOT, SHARED_DATA

SOURCES = [ROOT / "tests" / "data" / "hh-small.jsonl"]
if (SHARED_DATA / "hh-rlhf-harmless-sample.jsonl").exists():  # the real sample, where ../shared is checked out
    SOURCES.append(SHARED_DATA / "hh-rlhf-harmless-sample.jsonl")


@pytest.mark.parametrize("source", SOURCES, ids=[p.name for p in SOURCES])
def test_imported_hh_file_trains_in_trl_dpo_and_reward_trainers(source, tmp_path, tiny_path):
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import DPOConfig, DPOTrainer, RewardConfig, RewardTrainer

    out = tmp_path / "hh.jsonl"
    assert main(["data", "import", str(source), "-o", str(out), "--on-error", "skip"]) == 0
    ds = load_dataset("json", data_files=str(out), split="train")
    assert isinstance(ds[0]["prompt"], list) and ds[0]["chosen"][0]["role"] == "assistant"
    tok = AutoTokenizer.from_pretrained(tiny_path)
    common = dict(output_dir=str(tmp_path / "out"), max_steps=1, per_device_train_batch_size=2, report_to=[],
                  use_cpu=True, bf16=False, max_length=64, save_strategy="no", logging_steps=1)

    dpo = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(tiny_path), args=DPOConfig(**common),
                     train_dataset=ds, processing_class=tok)
    assert dpo.train().global_step == 1

    rm = AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    reward = RewardTrainer(model=rm, args=RewardConfig(**common), train_dataset=ds, processing_class=tok)
    assert reward.train().global_step == 1
