"""`rlhf export`: the exported policy reloads with plain transformers (no rlhf, no peft) and gives the same logits;
--adapter writes the peft adapter alone, which loads on its base."""

import json

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import artifacts
from pipeline.cli import main
from tests.conftest import tiny_sft_block, write_yaml


def _logits(model, tok):
    ids = torch.tensor([tok.apply_chat_template([{"role": "user", "content": "Tell me about the river."}],
                                                add_generation_prompt=True, return_dict=True)["input_ids"]])
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_exported_policy_reloads_with_plain_transformers(tiny_run, tmp_path, capsys):
    out = tmp_path / "ppo"
    assert main(["export", str(tiny_run / "ppo"), "-o", str(out)]) == 0
    plain, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    from pipeline.models import load_causal_lm, load_tokenizer

    want = _logits(load_causal_lm(str(tiny_run / "ppo" / "model")), load_tokenizer(str(tiny_run / "ppo" / "model")))
    assert torch.allclose(_logits(plain, tok), want, atol=1e-5)
    assert tok.chat_template and plain.generation_config.eos_token_id == tok.eos_token_id
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))
    # never into a directory that holds something else
    assert main(["export", str(tiny_run / "ppo"), "-o", str(out)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert main(["export", str(tiny_run / "ppo"), "-o", str(tmp_path / "a"), "--adapter"]) == 1
    assert "there is no adapter to export" in capsys.readouterr().err


def test_a_lora_adapter_policy_exports_merged_or_as_the_adapter(tmp_path):
    from peft import PeftModel

    run = tmp_path / "run"
    sft = tiny_sft_block(tuning="lora", lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "merge": False},
                         optim={"lr": 5e-2, "max_steps": 4})
    assert main(["run", str(write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "stages": [sft]}))]) == 0
    art = artifacts.load_artifact(run / "sft", "policy")
    assert main(["export", str(run / "sft"), "-o", str(tmp_path / "merged")]) == 0
    assert main(["export", str(run / "sft"), "-o", str(tmp_path / "adapter"), "--adapter"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    tok = AutoTokenizer.from_pretrained(tmp_path / "merged")
    base_path = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    base = AutoModelForCausalLM.from_pretrained(base_path)
    adapted = PeftModel.from_pretrained(base, tmp_path / "adapter")
    assert torch.allclose(_logits(merged, tok), _logits(adapted, tok), atol=1e-5)
    assert art.manifest["model"]["adapter"] is True
