"""`rlhf export`: a policy artifact as a plain Hugging Face model directory that transformers, vLLM and TGI load
as it is: weights as safetensors (a LoRA adapter merged in), the tokenizer with its chat template, and the
generation config. With --adapter, the peft adapter alone (for a policy saved with lora.merge: false).

    rlhf export runs/tiny/ppo -o exported/ppo
    rlhf export runs/quickstart/sft -o exported/sft-adapter --adapter
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from rlhf.errors import InvalidInput, UsageError
from pipeline.artifacts import load_artifact, refuse_links
from pipeline.models import load_causal_lm, load_tokenizer


def export_policy(artifact_dir: str | Path, out: str | Path, adapter: bool = False,
                  trust_remote_code: bool = False) -> Path:
    """Write the policy of `artifact_dir` (a policy artifact, or its model/ directory) to the new directory `out`,
    built beside it and renamed into place; an existing non-empty `out` is refused, never replaced."""
    src, out = Path(artifact_dir), Path(out)
    if (src / "manifest.json").exists():
        src = load_artifact(src, "policy", role="export").output("model")
    elif (src.parent / "manifest.json").exists():
        load_artifact(src.parent, "policy", role="export")  # a model/ directory: its artifact is checked too
    if not (src / "config.json").exists() and not (src / "adapter_config.json").exists():
        raise UsageError(f"{artifact_dir}: not a policy artifact or a saved model")
    refuse_links(src, "export")  # what is exported is meant to be shared: never a file a link points to
    if out.is_symlink():
        raise UsageError(f"{out} is a symbolic link; export into a new directory, not through a link")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"{out} exists and is not empty; export into a new directory")
    is_adapter = (src / "adapter_config.json").exists()
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if adapter:
            _copy_adapter(src, tmp, is_adapter)
        else:
            _write_merged(src, tmp, is_adapter, trust_remote_code)
        from pipeline.artifacts import follow_umask, fsync_tree

        follow_umask(tmp)
        fsync_tree(tmp)
        try:
            if out.exists():
                out.rmdir()  # empty, checked above
            os.replace(tmp, out)
        except OSError as exc:  # e.g. `out` was made a link or a file meanwhile
            raise UsageError(f"cannot put the export in place at {out}: {exc.strerror}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _copy_adapter(src: Path, tmp: Path, is_adapter: bool) -> None:
    if not is_adapter:
        raise InvalidInput(f"{src} holds merged weights (the stage ran with lora.merge: true or full tuning): "
                           "there is no adapter to export; export without --adapter")
    shutil.copytree(src, tmp)


def _write_merged(src: Path, tmp: Path, is_adapter: bool, trust_remote_code: bool = False) -> None:
    if is_adapter and json.loads((src / "adapter_config.json").read_text()).get("peft_type") != "LORA":
        raise InvalidInput(f"{src} is a prompt-tuning adapter, which cannot be merged into plain weights; export it "
                           "with --adapter (it loads on its base with peft)")
    model = load_causal_lm(str(src), "fp32", trust_remote_code)  # an adapter loads merged into its base
    tok = load_tokenizer(str(src), trust_remote_code)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    if getattr(tok, "chat_template", None) and not (tmp / "chat_template.jinja").exists():
        (tmp / "chat_template.jinja").write_text(tok.chat_template)
