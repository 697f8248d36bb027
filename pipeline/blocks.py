"""The leaf of the config tree: the Strict base, the blocks stages share, YAML loading, validation.

Every stage module builds its config from these (`from pipeline.blocks import Strict, LoraConfig, ...`),
and so does the pipeline config (pipeline/config.py), so this module imports no stage and nothing
heavy. Everything here is checked before any work starts: an unknown key, a wrong type or a value
outside its allowed set fails with the file and the key path, e.g.
`configs/x.yaml: stages.sft.optim.lr: expected a number, got 'fast'`.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, ClassVar, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rlhf.errors import UsageError
from rlhf.yaml import MAX_YAML_VALUES, load_yaml, load_yaml_text  # noqa: F401  (re-read by config)

# --------------------------------------------------------------------------- shared blocks


class Strict(BaseModel):
    """Base for every config block: unknown keys are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def changed(self, *names: str) -> list[str]:
        """Those of `names` whose value differs from the field's default (a setting the user made)."""
        fields = type(self).model_fields
        return [n for n in names if getattr(self, n) != fields[n].get_default(call_default_factory=True)]

    def written(self, *names: str) -> list[str]:
        """Those of `names` the config sets (in the YAML or with --set), to anything but null: what the user wrote,
        even where it equals the default."""
        return [n for n in names if n in self.model_fields_set and getattr(self, n) is not None]

    def refuse_unused(self, names: tuple[str, ...], unless: bool, why: str, written: bool = False) -> None:
        """A setting that does nothing is an error, not silently ignored: raise when any of `names` differs from its
        default while `unless` is false; with `written`, also when it is written at its default value (a block such
        as `lora:` whose mere presence says the user expects it to apply). Settings refused only when changed can
        be reset with --set to their default; the written ones are removed from the YAML (or set to null)."""
        found = {n for n in self.changed(*names) if getattr(self, n) is not None}  # null: unset, as if left out
        found |= set(self.written(*names)) if written else set()
        if not unless and (set_ := [n for n in names if n in found]):
            raise ValueError(f"{', '.join(set_)} {'has' if len(set_) == 1 else 'have'} no effect {why}")


Precision = Literal["auto", "fp32", "bf16", "fp16"]


class ScheduleConfig(Strict):
    """The optimiser and learning-rate schedule every training stage has (PPO's optim block is just this)."""

    lr: float = Field(2e-5, gt=0, description="peak learning rate (AdamW)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    warmup_ratio: float = Field(0.0, ge=0, lt=1, description="share of the optimizer steps spent warming up")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="learning-rate schedule, stepped once per optimizer step; constant allows no warm-up")
    max_grad_norm: float = Field(1.0, gt=0, description="gradients are clipped to this global norm")

    @model_validator(mode="after")
    def _warmup_needs_a_schedule(self):
        if self.warmup_ratio and self.scheduler == "constant":
            raise ValueError("warmup_ratio needs a schedule with a warm-up: 'constant' has none; use scheduler: "
                             "constant_with_warmup (or linear, cosine)")
        return self


class OptimConfig(ScheduleConfig):
    """Optimiser, schedule and batches of the TRL-based training stages. Each method subclasses it with its own
    defaults (DPO's lr 5e-7, GRPO's 1e-6, ...), so a block that sets only some keys keeps the method's
    defaults for the others."""

    epochs: float | None = Field(1.0, gt=0, description="passes over the training data; refused beside max_steps > 0 "
                                 "(null: unset, e.g. --set ...optim.epochs=null when capping a config with max_steps)")
    max_steps: int = Field(-1, ge=-1, description="-1: run `epochs` epochs; N > 0: N optimizer steps")
    per_device_batch_size: int = Field(8, ge=1, description="examples (pairs, prompts) per forward on each "
                                       "process; the global batch is this x grad_accum x processes")
    grad_accum: int = Field(1, ge=1, description="forward/backward passes accumulated per optimizer step")
    logging_steps: int = Field(10, ge=1, description="log train metrics to metrics.jsonl every N optimizer steps")
    eval_steps: int | None = Field(None, ge=1, description="None: evaluate at the end only")
    group_by_length: bool = Field(False, description="SFT and reward: batches of examples of similar length, in "
                                  "random order (less padding, same examples per epoch)")

    @model_validator(mode="before")
    @classmethod
    def _old_batch_size(cls, data):
        """`batch_size`, the name before `per_device_batch_size` (it always meant per device): still read, for one
        release, with a warning."""
        if isinstance(data, dict) and "batch_size" in data:
            import warnings

            if "per_device_batch_size" in data:
                raise ValueError("optim: batch_size is the old name of per_device_batch_size; give only "
                                 "per_device_batch_size")
            data = {("per_device_batch_size" if k == "batch_size" else k): v for k, v in data.items()}
            warnings.warn("optim.batch_size is deprecated and will be removed in the next release; write "
                          "optim.per_device_batch_size (the same number: examples per forward on each process)",
                          FutureWarning, stacklevel=2)
        return data

    @model_validator(mode="after")
    def _steps_or_epochs(self):
        self.refuse_unused(("epochs",), self.max_steps <= 0, "with max_steps > 0 (max_steps says how long to train; "
                           "leave epochs out, or set it to null)", written=True)
        return self


def optim_changes(optim: BaseModel) -> dict[str, tuple[Any, Any]]:
    """{field: (resolved value, shared default)} for the fields of a stage's optim block that differ from
    OptimConfig's defaults (the method's own defaults and the user's settings); shown by `rlhf run --check`."""
    shared = OptimConfig()
    return {k: (getattr(optim, k), getattr(shared, k)) for k in type(optim).model_fields
            if k in OptimConfig.model_fields and getattr(optim, k) not in (getattr(shared, k), None)}


class LoraConfig(Strict):
    r: int = Field(8, ge=1, description="rank of the low-rank update")
    alpha: int = Field(16, ge=1, description="scaling of the update (alpha / r)")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter's input while training (PPO "
                           "refuses a written value above 0: it turns every dropout off)")
    target_modules: list[str] | Literal["all-linear"] = Field("all-linear", description="module names that get an "
                                                              "adapter, or all-linear (every linear layer but "
                                                              "the output head)")
    merge: bool = Field(True, description="merge the adapter into the weights when saving; false keeps an adapter")


class CheckpointConfig(Strict):
    """Periodic checkpoints of a training stage (pipeline/checkpoint.py); `rlhf run --resume` continues from them."""

    every: int = Field(0, ge=0, description="save every N steps, counted as the stage counts `step` in metrics.jsonl: "
                       "optimizer steps in the TRL-based stages, PPO steps (a rollout and its updates) in ppo; "
                       "0: no checkpoints")
    keep: int = Field(2, ge=1, description="keep the newest K complete checkpoints")

    @model_validator(mode="after")
    def _used(self):
        self.refuse_unused(("keep",), self.every > 0, "without checkpoint.every (no checkpoints are written)")
        return self


class TrackingConfig(Strict):
    wandb: bool = Field(False, description="log every stage to wandb as well (one wandb run per stage, files under "
                        "RUN_DIR/wandb/)")
    wandb_project: str = Field("rlhf", description="the wandb project the runs go to")
    wandb_mode: Literal["offline", "online", "disabled"] = Field("offline", description="offline: local files "
                                                                "only; online: uploads; disabled: no wandb")


class StageBlock(Strict):
    """What every stage block has: its method, its directory name, and the inputs it reads (stage artifacts, data
    files and models, for the rerun check: {key: (reference, "artifact" | "data" | "model")})."""

    stage: str
    name: str | None = Field(None, description="directory under run_dir (letters, digits, _ and -); default: the "
                             "method")

    def inputs(self) -> dict[str, tuple[str, str]]:
        return {}

    def memory(self, procs: int, prompt_tokens: int) -> dict | None:
        """What the planner (`rlhf plan`, `--plan-check`) needs to know of this stage's work on each of `procs`
        processes, beyond its model and how that is tuned; None: it trains nothing. The keys (pipeline.plan.Work):
        batch (sequences per micro-batch), seq (tokens per sequence), pairs (2: chosen and rejected forwarded
        together), lm_head (False: no vocabulary logits, a reward model), frozen_models (whole frozen copies: a
        reference, a reward model), critic (True: a second trained model of the policy's size), generate (new
        tokens sampled per sequence) and gen_batch (sequences sampled at once), gather_for_generation (ZeRO-3: the
        whole policy gathered to sample), frozen_sharded (ZeRO-3 shards the frozen models too), own_loop (our own
        loop, not a TRL trainer), fp32_without_deepspeed (trains in fp32 unless under DeepSpeed). `prompt_tokens`
        stands for the longest prompt of a stage that samples (it has no length setting of its own)."""
        return None

    def preflight(self, world: int, zero: dict | None = None) -> None:
        """Checks that need more than the config: the number of processes, the stage's DeepSpeed config (`zero`, read
        and filled for that many processes; None without one), or what the installed libraries offer.
        `rlhf run` runs them for every selected stage before the first one starts (a launch that cannot work fails
        at once, not after the stages before it have trained), and so does `rlhf run --check --processes N`. Raise
        UsageError naming the key. Methods extend it."""


class TrainingBlock(StageBlock):
    """What every training stage has, with one meaning everywhere: how the model is tuned, its LoRA settings,
    precision, checkpoints, DeepSpeed, and activation checkpointing (off unless asked for)."""

    tuning: Literal["full", "lora"] = Field("full", description="full: train every weight; lora: train a LoRA "
                                            "adapter (the `lora` block)")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA settings; only with tuning: lora")
    precision: Precision = Field("auto", description="auto (bf16 on a GPU that has it, else fp32), fp32, bf16 or "
                                 "fp16; the manifest records what was used")
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig, description="periodic checkpoints for "
                                         "rlhf run --resume")
    deepspeed: str | None = Field(None, description="a ZeRO config (configs/deepspeed/*.json); or rlhf run --deepspeed")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass (less "
                                         "memory, about 20% slower)")
    # what a method declares about itself, for the checks and the planner (not settings)
    groups_by_length: ClassVar[bool] = False  # its rows have one length each: optim.group_by_length applies

    def memory(self, procs: int, prompt_tokens: int) -> dict | None:
        """A TRL trainer's micro-batch of per_device_batch_size sequences of max_length tokens (StageBlock.memory)."""
        return {"batch": self.optim.per_device_batch_size, "seq": getattr(self, "max_length", 512)}

    def zero_batch(self, world: int):
        """What one process runs per optimizer step, for the stage's ZeRO config (pipeline.deepspeed.zero_config):
        batch_size, grad_accum and max_grad_norm of the optim block (PPO takes them from its ppo block)."""
        return self.optim

    @model_validator(mode="after")
    def _length_grouping(self):
        # transformers' length-grouped sampler needs one length per row: a stage whose rows have one says so
        # (groups_by_length: SFT's examples, reward pairs); DPO's and the online stages' rows do not
        if getattr(getattr(self, "optim", None), "group_by_length", False) and not self.groups_by_length:
            raise ValueError(f"optim.group_by_length: the {self.stage} stage's rows have no single length to group "
                             "batches by (the sft and reward stages do)")
        # forgetting `tuning: lora` would otherwise train every weight with the LoRA settings silently unused
        self.refuse_unused(("lora",), self.tuning == "lora", f"with tuning: {self.tuning} (set tuning: lora)",
                           written=True)
        return self


class RewardSourceConfig(Strict):
    """Where a policy-optimisation stage's rewards come from (PPO, GRPO, RLOO): a reward model, a rule, or both
    (summed)."""

    model: str | None = Field(None, description="stage:NAME of a reward-model artifact")
    rule: str | None = Field(None, description="module:function(prompt, response) -> float")
    normalize: bool = Field(True, description="use the reward model's normalised score")

    @model_validator(mode="after")
    def _one(self):
        if not self.model and not self.rule:
            raise ValueError("reward: give a reward model (model: stage:NAME), a rule (rule: module:function), or both")
        self.refuse_unused(("normalize",), bool(self.model), "without a reward model (a rule's score is used as it is)",
                           written=True)
        return self


# --------------------------------------------------------------------------- validation


def _describe(value: Any, limit: int = 80) -> str:
    """`value` as JSON, cut after `limit` characters; only what is shown is ever serialised (a huge value, such as
    a YAML alias bomb, costs no more than a small one)."""
    if isinstance(value, str):
        return repr(value) if len(value) <= limit else repr(value[:limit]) + "..."
    shown, n = [], 0
    for piece in _json_pieces(value):
        shown.append(piece)
        n += len(piece)
        if n > limit:
            return "".join(shown)[:limit] + "..."
    return "".join(shown)


def _json_pieces(value: Any, depth: int = 0):
    """The JSON text of `value` piece by piece, produced lazily."""
    if depth > 20:
        yield "..."
    elif isinstance(value, dict):
        yield "{"
        for i, (k, v) in enumerate(value.items()):
            yield (", " if i else "") + json.dumps(str(k)) + ": "
            yield from _json_pieces(v, depth + 1)
        yield "}"
    elif isinstance(value, (list, tuple)):
        yield "["
        for i, v in enumerate(value):
            if i:
                yield ", "
            yield from _json_pieces(v, depth + 1)
        yield "]"
    else:
        yield json.dumps(value, default=str) if not isinstance(value, str) else json.dumps(value[:200])


def _key_path(loc: tuple, data: Any) -> str:
    """("stages", 3, "optim", "lr") -> stages.reward.optim.lr when the item has a name (or method) no other item
    shares, as --set writes it; stages[3].optim.lr otherwise."""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            name = _item_name(node, item)
            if name:
                parts.append(name)
            else:
                parts[-1:] = [f"{parts[-1]}[{item}]" if parts else f"[{item}]"]
        else:
            parts.append(str(item))
        node = _child(node, item)
    return ".".join(parts)


def _item_name(items: Any, i: int) -> str | None:
    if not isinstance(items, list) or not 0 <= i < len(items) or not isinstance(items[i], dict):
        return None
    name = items[i].get("name") or items[i].get("stage")
    names = [it.get("name") or it.get("stage") for it in items if isinstance(it, dict)]
    return str(name) if isinstance(name, str) and names.count(name) == 1 and not name.isdigit() else None


def _child(node: Any, key: Any) -> Any:
    if isinstance(node, dict) and key in node:
        return node[key]
    if isinstance(node, list) and isinstance(key, int) and 0 <= key < len(node):
        return node[key]
    return None


def _block_at(model_cls: type, loc: tuple, data: Any, item_model) -> type | None:
    """The config block (a pydantic model class) that holds the last key of `loc`, found by walking the field
    annotations; `item_model(raw_item)` answers for list items typed Any (the stages, typed by their method)."""
    t: Any = model_cls
    node = data
    for key in loc[:-1]:
        members = _members(t)
        named = [m for m in members if getattr(m, "__name__", None) == key]
        if named:  # pydantic names the union member it tried (models.policy.ModelSpec.ref)
            t = named[0]
            continue
        t = next((m for m in members if isinstance(m, type) and issubclass(m, BaseModel)), members[0])
        if isinstance(t, type) and issubclass(t, BaseModel):
            field = t.model_fields.get(key) if isinstance(key, str) else None
            if field is None:
                return None
            t = field.annotation
        elif get_origin(t) in (list, tuple) and isinstance(key, int):
            t = (get_args(t) or (Any,))[0]
        elif get_origin(t) is dict:
            t = (get_args(t) or (Any, Any))[1]
        else:
            return None
        node = _child(node, key)
        if _members(t) == [Any] and item_model is not None and isinstance(node, dict):
            t = item_model(node) or Any
    models = [m for m in _members(t) if isinstance(m, type) and issubclass(m, BaseModel)]
    return models[0] if models else None


def _members(t: Any) -> list:
    """A type with Annotated and Optional/Union unwrapped: its members (one for a plain type)."""
    while get_origin(t) is Annotated:
        t = get_args(t)[0]
    if get_origin(t) in (Union, UnionType):
        return [m for a in get_args(t) for m in _members(a) if m is not type(None)]
    return [t]


def _format_error(err: dict, source: str, data: Any = None, model_cls: type | None = None, item_model=None) -> str:
    loc = tuple(err["loc"])
    path = _key_path(loc, data)
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
        msg = "unknown key" + _close_key(model_cls, loc, data, item_model)
    elif kind == "missing":
        msg = "required key is missing"
    elif kind == "value_error":
        msg = str(ctx.get("error", err["msg"]))
        if re.match(r"^[\w\[\].]+: ", msg):  # our own validators already name the path
            return f"{source}: {msg}"
    else:
        msg = f"{err['msg'].lower()}, got {_describe(inp)}"
    return f"{source}: {path}: {msg}" if path else f"{source}: {msg}"


def _close_key(model_cls, loc: tuple, data: Any, item_model) -> str:
    """'; did you mean 'max_steps'?' when the block that has the unknown key has a close one."""
    block = _block_at(model_cls, loc, data, item_model) if model_cls is not None and loc else None
    if block is None or not isinstance(loc[-1], str):
        return ""
    known = _TRAINER_NAMES.get(loc[-1])
    close = [known] if known in block.model_fields else \
        difflib.get_close_matches(loc[-1], list(block.model_fields), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


# transformers' TrainingArguments names, which users of TRL write from habit, and ours
_TRAINER_NAMES = {"learning_rate": "lr", "num_train_epochs": "epochs", "per_device_train_batch_size":
                  "per_device_batch_size", "gradient_accumulation_steps": "grad_accum", "lr_scheduler_type":
                  "scheduler", "bf16": "precision", "fp16": "precision", "model_name_or_path": "model"}


def validate(model_cls: type[BaseModel], data: Any, source: str, item_model=None):
    """Validate `data` as `model_cls`; raise UsageError listing every problem as `source: key.path: reason`, a
    list item by its name when it has one (stages.reward.optim.lr), an unknown key with the close one it may mean.
    `item_model(raw_item)`: the model of a list item typed Any (pipeline.config: a stage's method's Config)."""
    try:
        return model_cls.model_validate(data)
    except ValidationError as exc:
        lines = [_format_error(e, source, data, model_cls, item_model) for e in exc.errors()]
        raise UsageError("\n".join(lines)) from None


def config_hash(block: BaseModel, extra: dict | None = None) -> str:
    """Stable hash of a resolved config block (plus anything else that changes the result, such as the seed)."""
    payload = {"config": block.model_dump(mode="json"), **(extra or {})}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def dump_yaml(data: Any) -> str:
    return yaml.safe_dump(data, sort_keys=False, allow_unicode=True)


class OnlineRLBlock(TrainingBlock):
    """What the methods that sample from the policy while training share (PPO, GRPO, RLOO): the policy, the
    prompts it answers, where rewards come from, and a rule reported on held-out prompts."""

    policy: str = Field(description="stage:NAME of a policy artifact (e.g. the SFT stage), a key of `models`, or a "
                        "model reference")
    prompts: str = Field(description="file of {'prompt': ...} rows, e.g. synthetic:prompts")
    prompts_split: str | None = Field(None, description="prompts is a DatasetDict directory: the split to read "
                                      "(default: train)")
    reward: RewardSourceConfig = Field(description="a reward model (model: stage:NAME), a rule, or both (summed)")
    max_prompt_tokens: int | None = Field(1024, ge=1, description="longest prompt, in tokens as the chat template "
                                          "renders it (OpenRLHF's prompt_max_len): longer ones are neither trained "
                                          "nor evaluated on, counted and listed in skipped.jsonl; null: no limit")
    eval_rule: str | None = Field(None, description="a rule reported on held-out prompts (eval/rule_reward_mean)")

    def inputs(self) -> dict[str, tuple[str, str]]:
        out = {"policy": (self.policy, "model"), "prompts": (self.prompts, "data")}
        if self.reward.model:
            out["reward_model"] = (self.reward.model, "artifact")
        return out


class OfflinePreferenceBlock(TrainingBlock):
    """What the methods that train a policy on recorded preferences against a reference share (DPO on pairs, KTO on
    unpaired rows): the policy, the preferences artifact, beta, the reference, the length, and a rule reported on
    held-out prompts before and after."""

    policy: str = Field(description="stage:NAME of a policy artifact, a key of `models`, or a model reference")
    preferences: str = Field(description="stage:NAME of a preferences artifact")
    beta: float = Field(0.1, gt=0, description="strength of the implicit KL to the reference (higher: stay closer)")
    precompute_ref_log_probs: bool = Field(False, description="compute the reference's log-probs once before training "
                                           "(no reference model kept during training)")
    max_length: int = Field(512, ge=8, description="prompt + response tokens; rows whose prompt alone fills it are "
                            "skipped")
    eval_prompts: str | None = Field(None, description="with eval_rule: prompts sampled before and after")
    eval_prompts_split: str | None = Field(None, description="eval_prompts is a DatasetDict directory: the split "
                                           "to read (default: train)")
    eval_rule: str | None = Field(None, description="module:function(prompt, response) -> float reported on "
                                  "eval_prompts before and after training")
    eval_max_new_tokens: int = Field(32, ge=1, description="longest sampled response for eval_rule, in tokens")

    @model_validator(mode="after")
    def _eval_rule_used(self):
        if bool(self.eval_rule) != bool(self.eval_prompts):
            raise ValueError("eval_rule and eval_prompts work together (the rule scores samples on those prompts): "
                             "set both or neither")
        self.refuse_unused(("eval_max_new_tokens",), bool(self.eval_rule), "without eval_rule")
        self.refuse_unused(("eval_prompts_split",), bool(self.eval_prompts), "without eval_prompts")
        return self

    def trl_loss_types(self) -> tuple[str, ...]:
        """The losses of this method the installed TRL implements (each method reads them from its TRL config)."""
        raise NotImplementedError

    def preflight(self, world: int, zero: dict | None = None) -> None:
        losses = self.trl_loss_types()
        if self.loss_type not in losses:
            raise UsageError(f"stages.{self.name}.loss_type: {self.loss_type!r} is not a {self.stage.upper()} loss of "
                             f"the installed TRL; expected one of {list(losses)}")

    def memory(self, procs: int, prompt_tokens: int) -> dict:
        # a frozen copy of the policy as the reference, unless the reference is the disabled adapter (LoRA) or its
        # log-probs are computed once beforehand
        reference = int(self.tuning != "lora" and not self.precompute_ref_log_probs)
        return {**super().memory(procs, prompt_tokens), "frozen_models": reference}

    def inputs(self) -> dict[str, tuple[str, str]]:
        out = {"policy": (self.policy, "model"), "preferences": (self.preferences, "artifact")}
        if self.eval_prompts:
            out["eval_prompts"] = (self.eval_prompts, "data")
        return out
