"""The pipeline config: YAML + `--set` overrides -> typed, validated objects.

A pipeline config names a run directory, the models, and the ordered stages:

    run_dir: runs/tiny
    seed: 0
    models:
      base: tiny
    stages:
      - stage: sft            # which method; picks the typed block from the stage registry (pipeline/stages)
        name: sft             # directory under run_dir; defaults to the method name
        model: base           # a key of `models`, `stage:NAME` (an earlier stage's artifact) or a model reference
        ...

Each stage block is validated by its method's own `Config` (pipeline/stages/<method>.py), looked up
in the registry when the config is read, so that this module imports no stage (adding a stage never
touches it). The shared blocks, YAML loading and error messages live in pipeline/blocks.py.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, WrapValidator, model_validator

from pipeline.blocks import Strict, TrackingConfig, load_yaml, load_yaml_text, validate
from rlhf.errors import UsageError
from pipeline.artifacts import STAGE_NAME
from pipeline.models import BUILTIN


def _stage_block(value: Any, handler, info):
    """One entry of `stages:` -> its method's Config (pipeline/stages: the registry)."""
    from pydantic import BaseModel

    from pipeline.stages import REGISTRY  # deferred: the config tree imports no stage until it reads one

    if isinstance(value, BaseModel):
        return value
    if not isinstance(value, dict) or "stage" not in value:
        raise ValueError("each stage needs a `stage:` key naming its method")
    module = REGISTRY.get(value["stage"])
    if module is None:
        raise ValueError(f"unknown stage {value['stage']!r}; expected one of {sorted(REGISTRY)}")
    return module.Config.model_validate(value)


class ModelSpec(Strict):
    ref: str = Field(description="tiny | smollm2-135m-instruct | a local directory | a hub id")
    trust_remote_code: bool = Field(False, description="let the model run the Python code it ships (auto_map); only "
                                    "your config or command line turns it on, never an artifact")
    revision: str | None = Field(None, description="a hub id's branch, tag or commit (pins what is downloaded)")

    @model_validator(mode="after")
    def _revision_for_hub_ids(self):
        if self.revision is not None and (self.ref in BUILTIN or Path(self.ref).expanduser().exists()):
            raise ValueError(f"revision has no effect for '{self.ref}' (a built-in model or a local directory): it "
                             "pins a hub id's branch, tag or commit")
        return self


ADAPTER_ON_ADAPTER = ("{}: false keeps a new adapter on '{}', itself a LoRA adapter: it is merged into its base "
                      "only while this stage runs, so the saved adapter would have no base to load onto. Set "
                      "lora.merge: true on this stage (or on the stage it starts from)")


def keeps_adapter(block) -> bool:
    """A stage that saves a LoRA adapter rather than merged weights (tuning: lora, lora.merge: false)."""
    return getattr(block, "tuning", None) == "lora" and not getattr(getattr(block, "lora", None), "merge", True)


class PipelineConfig(Strict):
    run_dir: str = Field(description="directory of the run: one subdirectory per stage (rlhf run --run-dir overrides "
                         "it)")
    seed: int = Field(0, description="seed of every stage (sampling, splits, initialisation); part of each stage's "
                      "config hash")
    models: dict[str, ModelSpec] = Field(default_factory=dict, description="named model references the stages use by "
                                         "name; a plain string is short for {ref: ...}")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="where metrics go besides each "
                                     "stage's metrics.jsonl")
    trusted_modules: list[str] = Field(default_factory=list, description="modules whose functions rules may "
                                       "name (module:function): rules are code; besides these, only the rules "
                                       "registered with @rule (feedback/rules.py)")
    stages: list[Annotated[Any, WrapValidator(_stage_block)]] = Field(min_length=1, description="the stages, run in "
                                                                      "this order; `stage:` in each picks its method "
                                                                      "(below)")

    @model_validator(mode="before")
    @classmethod
    def _models_as_strings(cls, data: Any) -> Any:
        # `models: {base: tiny}` is shorthand for `models: {base: {ref: tiny}}`.
        if isinstance(data, dict) and isinstance(data.get("models"), dict):
            data = dict(data)
            data["models"] = {k: ({"ref": v} if isinstance(v, str) else v) for k, v in data["models"].items()}
        return data

    @model_validator(mode="after")
    def _check_references(self) -> "PipelineConfig":
        seen: dict[str, str] = {}
        for i, st in enumerate(self.stages):
            if st.name is None:
                st.name = st.stage
            if not STAGE_NAME.match(st.name):
                raise ValueError(f"stages[{i}].name: {st.name!r} is not a safe directory name: use letters, digits, "
                                 "'_' and '-' (it names RUN_DIR/<name>)")
            if st.name in seen:
                raise ValueError(f"stages[{i}].name: '{st.name}' is used twice; give each stage a distinct name")
            for key, (ref, _kind) in st.inputs().items():
                if ref.startswith("stage:") and ref[6:] not in seen:
                    raise ValueError(
                        f"stages.{st.name}.{key}: '{ref}' names no earlier stage (earlier: {sorted(seen) or 'none'})"
                    )
            start = next((ref for key, (ref, kind) in st.inputs().items() if key in ("model", "policy")
                          and kind == "model"), None)
            if keeps_adapter(st) and start and start.startswith("stage:") and keeps_adapter(self.stage(start[6:])):
                raise ValueError(ADAPTER_ON_ADAPTER.format(f"stages.{st.name}.lora.merge", start))
            seen[st.name] = st.stage
        return self

    def stage(self, name: str):
        for st in self.stages:
            if st.name == name:
                return st
        raise UsageError(f"no stage named '{name}' (stages: {', '.join(s.name for s in self.stages)})")

    def model_spec(self, ref: str) -> ModelSpec:
        """A stage's `model:` value -> ModelSpec (a key of `models`, or a reference used directly)."""
        return self.models.get(ref) or ModelSpec(ref=ref)

    def trusts_remote_code(self, ref: str) -> bool:
        """Whether this config lets the model `ref` run its own code: a key of `models` (or a reference) says so
        itself; `stage:NAME` inherits it from the model that stage was trained from (its `model:` or `policy:`),
        up the chain. Only this config decides, never a file inside the artifact."""
        seen = set()
        while ref.startswith("stage:") and ref not in seen:
            seen.add(ref)
            inputs = self.stage(ref[6:]).inputs()
            base = next((inputs[k] for k in ("model", "policy") if k in inputs and inputs[k][1] == "model"), None)
            if base is None:
                return False
            ref = base[0]
        return not ref.startswith("stage:") and self.model_spec(ref).trust_remote_code


# --------------------------------------------------------------------------- overrides


def apply_override(data: dict, assignment: str) -> None:
    """Apply `a.b.c=value` to the raw config dict. List items by index (`stages.0`) or by stage name (`stages.sft`)."""
    if "=" not in assignment:
        raise UsageError(f"--set {assignment}: expected KEY.PATH=VALUE")
    path, raw = assignment.split("=", 1)
    value = load_yaml_text(raw, f"--set {path}") if raw != "" else ""
    keys = path.strip().split(".")
    node: Any = data
    for depth, key in enumerate(keys):
        last = depth == len(keys) - 1
        where = ".".join(keys[: depth + 1])
        if isinstance(node, list):
            idx = _list_index(node, key, where)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[key] = value
            else:
                node = node.setdefault(key, {})
        else:
            raise UsageError(f"--set {path}: '{'.'.join(keys[:depth])}' is not a mapping or list")


def _list_index(items: list, key: str, where: str) -> int:
    if key.lstrip("-").isdigit():
        idx = int(key)
        if not -len(items) <= idx < len(items):
            raise UsageError(f"--set {where}: index out of range (list has {len(items)} items)")
        return idx
    names = [item.get("name") or item.get("stage") if isinstance(item, dict) else None for item in items]
    if key in names:
        return names.index(key)
    named = [str(n) for n in names if n is not None]
    close = difflib.get_close_matches(key, named, n=1, cutoff=0.6)
    raise UsageError(f"--set {where}: no list item named '{key}'" + (f"; did you mean '{close[0]}'?" if close else "")
                     + (f" (the items: {', '.join(named)})" if named else ""))


def load_pipeline(path: str | Path, overrides: list[str] | None = None, deepspeed: str | None = None,
                  only: list[str] | None = None) -> PipelineConfig:
    """The validated config: the YAML, its --set overrides, and `deepspeed` (rlhf run --deepspeed) given to the
    selected training stages (`only`, default all) before they are checked, since what DeepSpeed settings such as
    PPO's `frozen` mean depends on it."""
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a pipeline config is a mapping with run_dir, models and stages")
    for assignment in overrides or []:
        apply_override(data, assignment)
    if deepspeed:
        _give_deepspeed(data, deepspeed, only)
    source = f"{path}" + (" (with --set overrides)" if overrides else "")
    return validate(PipelineConfig, data, source, item_model=_stage_model)


def _stage_model(item: dict):
    """The Config of a raw `stages:` item's method (for naming the key an error means), or None."""
    from pipeline.stages import REGISTRY  # deferred: the config tree imports no stage until it reads one

    module = REGISTRY.get(item.get("stage"))
    return module.Config if module is not None else None


def _give_deepspeed(data: dict, deepspeed: str, only: list[str] | None) -> None:
    """Set `deepspeed` on every selected stage whose method has the key (the training stages)."""
    from pipeline.stages import REGISTRY  # deferred: the config tree imports no stage until it reads one

    for st in data.get("stages") or []:
        if not isinstance(st, dict) or st.get("stage") not in REGISTRY:
            continue  # validation says what is wrong with it
        if (not only or (st.get("name") or st["stage"]) in only) and \
                "deepspeed" in REGISTRY[st["stage"]].Config.model_fields:
            st["deepspeed"] = deepspeed
