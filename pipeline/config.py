"""Pipeline configs: YAML + `--set` overrides -> typed, validated objects.

A pipeline config names a run directory, the models, and the ordered stages:

    run_dir: runs/tiny
    seed: 0
    models:
      base: tiny
    stages:
      - stage: sft            # which method; picks the typed block (pipeline/stages/sft.py)
        name: sft             # directory under run_dir; defaults to the method name
        model: base           # a key of `models`, `stage:NAME` (an earlier stage's artifact) or a model reference
        ...

Everything is checked before any work starts: an unknown key, a wrong type or a value
outside its allowed set fails with the file and the key path, e.g.
`configs/x.yaml: stages[1].optim.lr: expected a number, got 'fast'`.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import UsageError

# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `2e-5` and `1e3` as numbers (PyYAML follows YAML 1.1, which wants `2.0e-5`)."""


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def load_yaml_text(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        raise UsageError(f"{source}: not valid YAML: {exc}") from None


def load_yaml(path: str | Path) -> Any:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{p}: config file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{p}: cannot read config: {exc}") from None
    return load_yaml_text(text, str(p))


# --------------------------------------------------------------------------- shared blocks


class Strict(BaseModel):
    """Base for every config block: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def changed(self, *names: str) -> list[str]:
        """Those of `names` whose value differs from the field's default (a setting the user made)."""
        fields = type(self).model_fields
        return [n for n in names if getattr(self, n) != fields[n].get_default(call_default_factory=True)]

    def refuse_unused(self, names: tuple[str, ...], unless: bool, why: str) -> None:
        """A setting that does nothing is an error, not silently ignored: raise when any of `names` was
        changed from its default while `unless` is false."""
        if not unless and (set_ := self.changed(*names)):
            raise ValueError(f"{', '.join(set_)} {'has' if len(set_) == 1 else 'have'} no effect {why}")


Precision = Literal["auto", "fp32", "bf16", "fp16"]


class OptimConfig(Strict):
    """Optimiser and schedule of the TRL-based training stages. Each method subclasses it with its own
    defaults (DPO's lr 5e-7, GRPO's 1e-6, ...), so a block that sets only some keys keeps the method's
    defaults for the others."""

    lr: float = Field(2e-5, gt=0)
    epochs: float = Field(1.0, gt=0)
    max_steps: int = Field(-1, ge=-1, description="-1: run `epochs` epochs")
    batch_size: int = Field(8, ge=1, description="per device")
    grad_accum: int = Field(1, ge=1)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="share of the optimizer steps spent warming up")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    max_grad_norm: float = Field(1.0, gt=0)
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(None, ge=1, description="None: evaluate at the end only")

    @model_validator(mode="after")
    def _warmup_needs_a_schedule(self):
        if self.warmup_ratio and self.scheduler == "constant":
            raise ValueError("warmup_ratio needs a schedule with a warm-up: 'constant' has none; use scheduler: "
                             "constant_with_warmup (or linear, cosine)")
        return self


def optim_changes(optim: BaseModel) -> dict[str, tuple[Any, Any]]:
    """{field: (resolved value, shared default)} for the fields of a stage's optim block that differ from
    OptimConfig's defaults (the method's own defaults and the user's settings); shown by `rlhf run --check`."""
    shared = OptimConfig()
    return {k: (getattr(optim, k), getattr(shared, k)) for k in type(optim).model_fields
            if k in OptimConfig.model_fields and getattr(optim, k) != getattr(shared, k)}


class LoraConfig(Strict):
    r: int = Field(8, ge=1)
    alpha: int = Field(16, ge=1)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    merge: bool = Field(True, description="merge the adapter into the weights when saving; false keeps an adapter")


class CheckpointConfig(Strict):
    """Periodic checkpoints of a training stage (pipeline/checkpoint.py); `rlhf run --resume` continues from them."""

    every: int = Field(0, ge=0, description="save every N optimizer steps (0: no checkpoints)")
    keep: int = Field(2, ge=1, description="keep the newest K complete checkpoints")


class TrackingConfig(Strict):
    wandb: bool = False
    wandb_project: str = "rlhf"
    wandb_mode: Literal["offline", "online", "disabled"] = "offline"


# --------------------------------------------------------------------------- the pipeline


def _stage_union():
    # Imported here so that each stage file owns its config class (DESIGN.md); stage modules
    # import torch only inside run(), so this stays cheap.
    from pipeline.stages.ai_preferences import AIPreferencesStageConfig
    from pipeline.stages.dpo import DPOStageConfig
    from pipeline.stages.grpo import GroupRLStageConfig
    from pipeline.stages.ppo import PPOStageConfig
    from pipeline.stages.preferences import PreferencesStageConfig
    from pipeline.stages.reward import RewardStageConfig
    from pipeline.stages.sft import SFTStageConfig

    return Annotated[Union[SFTStageConfig, PreferencesStageConfig, AIPreferencesStageConfig, RewardStageConfig,
                           PPOStageConfig, DPOStageConfig, GroupRLStageConfig], Field(discriminator="stage")]


StageConfig = _stage_union()


class ModelSpec(Strict):
    ref: str = Field(description="tiny | smollm2-135m-instruct | a local directory | a hub id")
    trust_remote_code: bool = False
    revision: str | None = Field(None, description="a hub id's branch, tag or commit (pins what is downloaded)")

    @model_validator(mode="after")
    def _revision_for_hub_ids(self):
        from pathlib import Path

        from pipeline.models import BUILTIN

        if self.revision is not None and (self.ref in BUILTIN or Path(self.ref).expanduser().exists()):
            raise ValueError(f"revision has no effect for '{self.ref}' (a built-in model or a local directory): it "
                             "pins a hub id's branch, tag or commit")
        return self


class PipelineConfig(Strict):
    run_dir: str
    seed: int = 0
    models: dict[str, ModelSpec] = Field(default_factory=dict)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    trusted_modules: list[str] = Field(default_factory=list, description="modules whose functions rules may "
                                       "name (module:function): rules are code; `feedback` is always trusted")
    stages: list[StageConfig] = Field(min_length=1)

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
        from pipeline.artifacts import STAGE_NAME

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
                        f"stages[{i}].{key}: '{ref}' names no earlier stage (earlier: {sorted(seen) or 'none'})"
                    )
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
    for i, item in enumerate(items):
        if isinstance(item, dict) and (item.get("name") or item.get("stage")) == key:
            return i
    raise UsageError(f"--set {where}: no list item named '{key}'")


# --------------------------------------------------------------------------- errors


def _describe(value: Any) -> str:
    return repr(value) if isinstance(value, str) else json.dumps(value, default=str)[:80]


def _format_error(err: dict, source: str) -> str:
    loc = list(err["loc"])
    # Discriminated unions add the tag (e.g. 'sft') after the list index: drop it from the path.
    parts: list[str] = []
    i = 0
    while i < len(loc):
        item = loc[i]
        if isinstance(item, int):
            parts[-1] = f"{parts[-1]}[{item}]" if parts else f"[{item}]"
            if i + 1 < len(loc) and loc[:1] == ["stages"] and i == 1 and isinstance(loc[i + 1], str) and len(loc) > 2:
                i += 1  # skip the union tag
        else:
            parts.append(str(item))
        i += 1
    path = ".".join(parts)
    kind, inp, ctx = err["type"], err.get("input"), err.get("ctx") or {}
    if kind in ("float_parsing", "float_type"):
        msg = f"expected a number, got {_describe(inp)}"
    elif kind in ("int_parsing", "int_type", "int_from_float"):
        msg = f"expected an integer, got {_describe(inp)}"
    elif kind in ("bool_parsing", "bool_type"):
        msg = f"expected true or false, got {_describe(inp)}"
    elif kind == "literal_error":
        msg = f"expected one of {ctx.get('expected')}, got {_describe(inp)}"
    elif kind == "extra_forbidden":
        msg = "unknown key"
    elif kind == "missing":
        msg = "required key is missing"
    elif kind == "union_tag_invalid":
        msg = f"unknown stage {_describe(ctx.get('tag'))}; expected one of {ctx.get('expected_tags')}"
    elif kind == "union_tag_not_found":
        msg = "each stage needs a `stage:` key naming its method"
    elif kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        if re.match(r"^[\w\[\].]+: ", msg):  # our own validators already name the path
            return f"{source}: {msg}"
    else:
        msg = f"{err['msg'].lower()}, got {_describe(inp)}"
    return f"{source}: {path}: {msg}" if path else f"{source}: {msg}"


def validate(model_cls: type[BaseModel], data: Any, source: str):
    """Validate `data` as `model_cls`; raise UsageError listing every problem as `source: key.path: reason`."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(e, source) for e in exc.errors()]
        raise UsageError("\n".join(lines)) from None


def load_pipeline(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a pipeline config is a mapping with run_dir, models and stages")
    for assignment in overrides or []:
        apply_override(data, assignment)
    source = f"{path}" + (" (with --set overrides)" if overrides else "")
    return validate(PipelineConfig, data, source)


def config_hash(block: BaseModel, extra: dict | None = None) -> str:
    """Stable hash of a resolved config block (plus anything else that changes the result, such as the seed)."""
    payload = {"config": block.model_dump(mode="json"), **(extra or {})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)
