"""All DeepSpeed code in one place (as OpenRLHF keeps its DeepSpeed strategy in one file): the process group,
ZeRO configs filled from a stage's settings, the weights-only checkpoint reader, PPO's engines, gathered
saving and the tear-down between stages.

    deepspeed --num_gpus 2 --module pipeline run configs/tiny.yaml --stage sft --deepspeed configs/deepspeed/zero3.json
    torchrun --nproc_per_node 2 -m pipeline run configs/tiny.yaml --stage ppo --deepspeed configs/deepspeed/zero2.json

Configs: batch size, gradient accumulation, clipping and precision in a ZeRO JSON are "auto" and filled
from the stage's `optim` and `precision` (load_zero_config; a number that disagrees with the stage is an
error before launch, not a DeepSpeed assertion later). Checkpoints are read with
torch.load(weights_only=True) (safe_deepspeed_loading); config keys that would resume through an unsafe
path are refused.

The TRL-based stages hand the config to the HF Trainer (`deepspeed=` in their TrainingArguments) and
save through save_trained. PPO builds its own engines:
- policy (+ value head): one DeepSpeed engine, so its optimizer state and gradients are
  partitioned (ZeRO-1/2) and, under ZeRO-3, its weights too;
- critic (value_model: critic): a second engine with its own optimizer (same lr);
- reference: the disabled LoRA adapter when LoRA is on (no copy at all); otherwise a frozen copy:
  under ZeRO-3 an inference-only ZeRO-3 engine (sharded, `frozen.offload` keeps its shards in CPU
  memory), under ZeRO-1/2 a plain copy on each process;
- reward model: the same choice as the reference.
Under ZeRO-3 the models are built sharded from the start (transformers' zero.Init through
HfDeepSpeedConfig), so no process ever holds a whole model except while generating: the policy's
shards are gathered for sampling (`rollout.gather_zero3`, TRL's approach), or with
`gather_zero3: false` generation runs on the shards with every process stepping together.
Each process takes its share of the step's prompts (rank r takes every r-th), so the data order is the
one-process order. The ZeRO config's batch fields come from the PPO block:
train_micro_batch_size_per_gpu = ppo.micro_batch_size, gradient_accumulation_steps =
ppo.minibatch_size / (processes x micro_batch_size); gradient_clipping = optim.max_grad_norm.

Every process calls the functions here; only rank 0 writes artifacts.
"""

from __future__ import annotations

import contextlib
import copy
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from pipeline import distributed
from rlhf.errors import UsageError
from pipeline.strategy import DataParallel, Local, Optim, local_sizes  # noqa: F401  (local_sizes: PPO's shares)


def load_zero_config(path: str | Path, optim, precision: str, where: str, world: int | None = None) -> dict:
    """A ZeRO JSON with its "auto" values filled from the stage (`optim`: batch_size per process, grad_accum,
    max_grad_norm; `world`: the number of processes, default this run's); disagreements are errors.

    Every stage run under DeepSpeed comes through here, so this is also where DeepSpeed's checkpoint
    reader is switched to torch.load(weights_only=True) (safe_deepspeed_loading) before any resume."""
    world = distributed.world_size() if world is None else world
    safe_deepspeed_loading()
    try:
        cfg = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UsageError(f"--deepspeed {path}: file not found") from None
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
    want = {
        "train_micro_batch_size_per_gpu": optim.per_device_batch_size,
        "gradient_accumulation_steps": optim.grad_accum,
        "gradient_clipping": optim.max_grad_norm,
        "train_batch_size": optim.per_device_batch_size * optim.grad_accum * world,
    }
    for key, value in want.items():
        have = cfg.get(key, "auto")
        if have != "auto" and have != value:
            raise UsageError(f"{path}: {key} is {have} but {where} gives {value}; set it to \"auto\" or make them agree")
        cfg[key] = value
    for name in ("bf16", "fp16"):
        block = cfg.setdefault(name, {})
        enabled = block.get("enabled", "auto")
        if enabled != "auto" and bool(enabled) != (precision == name):
            raise UsageError(f"{path}: {name}.enabled is {enabled} but {where}.precision is {precision}")
        block["enabled"] = precision == name
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise UsageError(f"{path}: zero_optimization.stage must be 0-3, got {stage}")
    _refuse_unsafe_checkpointing(cfg, path)
    return cfg


def _refuse_unsafe_checkpointing(cfg: dict, path) -> None:
    """Resume reads checkpoints only through DeepSpeed's torch engine, switched to weights_only loading
    (safe_deepspeed_loading). Universal checkpoints and the other checkpoint engines load through paths that
    call torch.load(weights_only=False), which runs any pickle a checkpoint holds: refused."""
    ckpt = cfg.get("checkpoint") or {}
    unsafe = []
    if ckpt.get("load_universal"):
        unsafe.append("checkpoint.load_universal")
    if ckpt.get("writer") is not None:
        unsafe.append("checkpoint.writer (the fast/decoupled checkpoint engines)")
    if (cfg.get("datastates") or {}).get("enabled"):
        unsafe.append("datastates")
    if "nebula" in cfg:
        unsafe.append("nebula")
    if unsafe:
        raise UsageError(f"{path}: {', '.join(unsafe)}: not supported here; these load checkpoints with "
                         "torch.load(weights_only=False), which can run code from a checkpoint file. Remove the key: "
                         "checkpoints are written and read by DeepSpeed's torch engine with weights-only loading")


def zero_stage(ds_config: dict | None) -> int:
    return int((ds_config or {}).get("zero_optimization", {}).get("stage", 0))


def safe_deepspeed_loading() -> None:
    """DeepSpeed's checkpoint reader (resume) calls torch.load with weights_only=False; make it load with
    weights_only=True, allowing only the few plain DeepSpeed types its checkpoints hold. Idempotent."""
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    if getattr(TorchCheckpointEngine.load, "_weights_only", False):
        return

    def load(self, path: str, map_location=None):
        with torch.serialization.safe_globals(_deepspeed_checkpoint_types()):
            return torch.load(path, map_location=map_location, weights_only=True)

    load._weights_only = True
    TorchCheckpointEngine.load = load


def _deepspeed_checkpoint_types() -> list:
    """The non-tensor types a ZeRO optimizer checkpoint pickles (enums and loss-scaler settings)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def zero_config(cfg, precision: str, world: int | None = None) -> dict | None:
    """The stage's DeepSpeed config (`deepspeed:` key or `rlhf run --deepspeed`), its batch fields filled from what
    the stage says a process runs (cfg.zero_batch: the optim block; PPO's ppo block); None without one."""
    if not getattr(cfg, "deepspeed", None):
        return None
    world = distributed.world_size() if world is None else world
    batch = cfg.zero_batch(world)
    where = f"stages.{cfg.name or cfg.stage}" + (f" ({batch.source})" if getattr(batch, "source", None) else "")
    return load_zero_config(cfg.deepspeed, batch, precision, where, world)


# --------------------------------------------------------------------------- PPO's engines


def zero_batch(cfg, world: int) -> SimpleNamespace:
    """PPO's per-process batch for its ZeRO config: micro-batches of ppo.micro_batch_size, as many as this process's
    share of a minibatch holds (local_sizes)."""
    _, mb = local_sizes(cfg, world)
    micro = cfg.ppo.micro_batch_size
    return SimpleNamespace(per_device_batch_size=micro, grad_accum=mb // micro, max_grad_norm=cfg.optim.max_grad_norm,
                           source="ppo.micro_batch_size, ppo.minibatch_size")


def ds_config(cfg, precision: str, hidden: int | None) -> dict:
    """PPO's ZeRO JSON with its "auto" values filled from the PPO block (disagreements are errors)."""
    return fill_buckets(zero_config(cfg, precision), hidden)


def fill_buckets(ds: dict, hidden: int | None) -> dict:
    """Bucket sizes left "auto" in a ZeRO config: from the hidden size (transformers' rule), else DeepSpeed's."""
    zero = ds.setdefault("zero_optimization", {})
    sizes = {} if hidden is None else {
        "reduce_bucket_size": hidden * hidden,
        "stage3_prefetch_bucket_size": int(0.9 * hidden * hidden),
        "stage3_param_persistence_threshold": 10 * hidden,
    }
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size", "stage3_param_persistence_threshold"):
        if zero.get(key) == "auto":
            if key in sizes:
                zero[key] = sizes[key]
            else:
                del zero[key]
    return ds


def inference_config(train: dict, offload: bool) -> dict:
    """An engine config for a frozen model: no optimizer; ZeRO-3 sharding kept, parameters in CPU with offload."""
    ds = copy.deepcopy(train)
    ds.pop("optimizer", None)
    ds.pop("scheduler", None)
    zero = ds.setdefault("zero_optimization", {})
    zero.pop("offload_optimizer", None)
    if offload:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return ds


def zero3_loading(ds: dict):
    """While the returned object lives, transformers builds models sharded (zero.Init) for this ZeRO-3 config."""
    from transformers.integrations import HfDeepSpeedConfig

    return HfDeepSpeedConfig(ds)


def frozen_engine(model, ds_inference: dict, keep: list):
    """A frozen model as an inference-only ZeRO-3 engine; returns the module (its hooks gather the shards)."""
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, config=ds_inference)
    engine.eval()
    keep.append(engine)
    return engine.module


def _optimizer_factory(ds: dict, optim: Optim):
    offload = ds.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
    if offload in ("cpu", "nvme"):
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return lambda params: DeepSpeedCPUAdam(params, lr=optim.lr, weight_decay=optim.weight_decay, adamw_mode=True)
    return optim.optimizer


class DeepSpeed(Local):
    """The strategy on DeepSpeed engines (see pipeline/strategy.py): each trained model in an engine of its own
    (its optimizer state and gradients partitioned under ZeRO-1/2, its weights too under ZeRO-3), the frozen models
    as inference-only ZeRO-3 engines when sharded (`frozen.zero3`, `frozen.offload` keeping the shards in CPU
    memory) or whole copies, and under ZeRO-3 the models built sharded from the start (transformers' zero.Init
    through HfDeepSpeedConfig), so that no process loads a whole model. For sampling the policy's shards are gathered
    on every process (`gather: true`, TRL's approach), or sampling runs on the shards with every process stepping
    together.

    Each micro-batch's loss is its share of the minibatch's: the engine neither divides it by the accumulation
    steps (scale_wrt_gas=False) nor averages the gradients over the processes (its all-reduce does, so the loss
    is multiplied by their number first). The engines step between micro-batches (no update: DeepSpeed
    accumulates) but not after the last one, where the gradients are reduced and about to be applied: step()
    first checks that every gradient is finite on every process, then lets the engines apply the update
    (clipping by the config's gradient_clipping, stepping the learning-rate schedule)."""

    def __init__(self, ds: dict, frozen_zero3: bool = True, frozen_offload: bool = False, gather: bool = True):
        import deepspeed

        super().__init__()
        # DeepSpeed's communication layer over the process group the run set up (pipeline.distributed): its configs
        # read the number of processes from it, zero.Init's too
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        self.ds, self.stage = ds, zero_stage(ds)
        self.shards_weights = self.stage == 3
        self.shards_frozen = self.shards_weights and frozen_zero3
        self.frozen_offload, self.gather = frozen_offload, gather
        self.sync_generation = self.shards_weights and not gather and distributed.world_size() > 1
        self.engines: dict[str, object] = {}
        self.frozen: list = []  # inference engines, kept alive for as long as their modules are used

    def describe(self) -> str:
        return f"DeepSpeed ZeRO-{self.stage}, {distributed.world_size()} processes"

    @contextlib.contextmanager
    def loading(self):
        """Under ZeRO-3, while open, transformers builds models sharded (the HfDeepSpeedConfig object must live)."""
        alive = zero3_loading(self.ds) if self.shards_weights else None
        try:
            yield
        finally:
            del alive

    def place_frozen(self, module):
        if module is None or not self.shards_frozen:
            return super().place_frozen(module)
        return frozen_engine(module, inference_config(self.ds, self.frozen_offload), self.frozen)

    def prepare(self, modules: dict, optim: Optim) -> list:
        import deepspeed

        make_opt = _optimizer_factory(self.ds, optim)
        out = []
        for name, module in modules.items():
            if module is None:
                out.append(None)
                continue
            # the schedule: a callable optimizer -> LR scheduler; the engine steps it with each applied update and
            # keeps its state in its checkpoints
            engine, *_ = deepspeed.initialize(model=module, optimizer=make_opt, config=self.ds,
                                              lr_scheduler=optim.schedule,
                                              model_parameters=[p for p in module.parameters() if p.requires_grad])
            self.names.append(name)
            self.engines[name] = engine
            out.append(engine)
        self.device = self.engines[self.names[0]].device
        return out

    @property
    def lr(self) -> float:
        return float(self.engines[self.names[0]].get_lr()[0])

    def zero_grad(self) -> None:  # the engines zero their gradients after each update
        pass

    def backward(self, losses: dict) -> None:
        for name, loss in losses.items():
            engine = self.engines[name]
            engine.backward(loss * engine.dp_world_size, scale_wrt_gas=False)
            if not engine.is_gradient_accumulation_boundary():
                engine.step()

    def step(self, check) -> float:
        bad = [nonfinite_gradients(e) for e in self.engines.values()]  # every engine, every process: collectives
        check(grad_norm=float("inf") if any(bad) else 0.0)  # raises before any engine applies the update
        for e in self.engines.values():
            e.step()
        norms = [e.get_global_grad_norm() for e in self.engines.values()]
        norms = [float(n) for n in norms if n is not None]
        return sum(n * n for n in norms) ** 0.5 if norms else 0.0

    def save(self, path) -> None:
        """Each engine's checkpoint (ZeRO shards of weights and optimizer from every process)."""
        for name, engine in self.engines.items():
            engine.save_checkpoint(str(path / name), tag="state")

    def load(self, path) -> None:
        # DeepSpeed's reader, made to use torch.load(weights_only=True) by load_zero_config
        for name, engine in self.engines.items():
            loaded, _ = engine.load_checkpoint(str(path / name), tag="state")
            if loaded is None:
                raise UsageError(f"--resume: {path / name} holds no DeepSpeed checkpoint for this run")

    def plain(self, module, rebuild):
        """Every process takes part (ZeRO-3 shards gathered one submodule at a time); rank 0 loads the gathered
        weights into rebuild(), a plain model that loads without DeepSpeed."""
        if module is None:
            return None
        state = full_state_dict(module)
        if not distributed.is_main():
            return None
        plain = rebuild()
        plain.load_state_dict(state)
        return plain

    @contextlib.contextmanager
    def whole(self, prepared):
        """Under ZeRO-3 with gather: every shard gathered on every process and the engine's hooks removed (so that
        generate's many small forwards do not gather again), put back afterwards."""
        if not (self.shards_weights and self.gather):
            yield prepared
            return
        import deepspeed
        from trl.models.utils import add_hooks, remove_hooks

        with deepspeed.zero.GatheredParameters(list(prepared.module.parameters())):
            remove_hooks(prepared)
            try:
                yield prepared
            finally:
                add_hooks(prepared)


def select(ds: dict | None, frozen_zero3: bool = True, frozen_offload: bool = False, gather: bool = True) -> Local:
    """The strategy for this launch: DeepSpeed with a ZeRO config, data parallel on several processes without one,
    one process otherwise."""
    if ds is not None:
        return DeepSpeed(ds, frozen_zero3, frozen_offload, gather)
    return DataParallel() if distributed.world_size() > 1 else Local()


def nonfinite_gradients(engine) -> bool:
    """True on every process when any gradient the engine is about to apply is inf or NaN. Call after the
    backward that ends the accumulation, before engine.step(): the ZeRO optimizers hold the reduced gradient
    partitions then, and their own overflow check reduces the answer over the processes."""
    stage = engine.zero_optimization_stage()
    if stage >= 1:
        return bool(engine.optimizer.has_overflow(partition_gradients=stage >= 2))
    local = any(p.grad is not None and not torch.isfinite(p.grad).all() for p in engine.module.parameters())
    return distributed.any_rank(local)


def full_state_dict(module) -> dict | None:
    """Every process calls this; rank 0 gets a CPU copy of the module's whole state dict (ZeRO-3 shards
    gathered one submodule at a time, so no process ever holds more than one layer extra); others get None."""
    import deepspeed

    out: dict[str, torch.Tensor] = {}
    for prefix, sub in module.named_modules():
        params = list(sub.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(params, enabled=bool(params)):
            if distributed.is_main():
                buffers = [(n, b) for n, b in sub.named_buffers(recurse=False)
                           if n not in sub._non_persistent_buffers_set]
                for name, t in list(sub.named_parameters(recurse=False)) + buffers:
                    key = f"{prefix}.{name}" if prefix else name
                    out[key] = t.detach().to("cpu", copy=True)
    return out if distributed.is_main() else None


# --------------------------------------------------------------------------- saving and tear-down


@contextlib.contextmanager
def built_whole():
    """While open, transformers builds models whole on this process even while a ZeRO-3 config is active (the global a
    trainer's arguments set): for work one process does alone, such as merging an adapter on rank 0, where building
    sharded (zero.Init) would wait forever for the other processes."""
    from transformers.integrations import deepspeed as hf

    saved = hf._hf_deepspeed_config_weak_ref
    hf.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf._hf_deepspeed_config_weak_ref = saved


def save_trainer_model(trainer, tokenizer, out_dir, merge: bool, trust_remote_code: bool = False,
                       revision: str | None = None) -> bool:
    """A TRL/HF trainer's model under DeepSpeed: every rank takes part (ZeRO-3 weights are gathered) and rank 0
    writes a plain safetensors model that loads without DeepSpeed, an adapter merged unless `merge` is false (kept,
    it records its base's `revision`). Returns True for an adapter."""
    import os
    import shutil

    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if distributed.is_main():
        shutil.rmtree(tmp, ignore_errors=True)
    distributed.barrier()
    for config in (getattr(trainer.model, "peft_config", None) or {}).values():
        if revision is not None:  # the adapter's base at its revision, not the hub's main, when loaded later
            config.revision = revision
    trainer.save_model(str(tmp))  # collective under ZeRO-3; rank 0 writes
    is_peft = hasattr(trainer.model, "peft_config")
    if distributed.is_main():
        if is_peft and merge:
            from pipeline.models import load_model

            # an adapter directory loads merged into its base (at the revision its adapter_config records), with the
            # head its task has: a reward model's adapter carries its trained score head
            with built_whole():  # rank 0 alone: under ZeRO-3 a sharded build would wait for the others
                merged = load_model(str(tmp), "fp32", trust_remote_code, head="auto")
            shutil.rmtree(tmp)
            merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, out_dir)
    distributed.barrier()
    return is_peft and not merge


def forget() -> None:
    """HF keeps the last stage's DeepSpeed config globally; the next stage must load its models unpartitioned."""
    import sys

    if "transformers.integrations.deepspeed" in sys.modules:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
