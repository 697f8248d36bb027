"""`rlhf plan`: before launch, each training stage's peak memory per device under ZeRO-0/1/2/3, with and without
offload, which of them fit, and which of those is fastest; `rlhf run --plan-check` refuses a stage that fits in
none.

    rlhf plan configs/examples/llama-7b-gpus.yaml --gpus 8 --gpu-memory 80GB
    rlhf plan configs/quickstart.yaml --gpus 1 --gpu-memory 24GB --cpu

The estimate is a sum of parts, per process (device), in bytes:
- weights: every model the stage holds: the trained one (policy, or reward model), frozen ones (reference, reward
  model for PPO) and a critic; in the training precision (2 bytes in bf16/fp16, 4 in fp32);
- mixed-precision master weights (4 bytes per trained parameter), gradients (2 or 4) and Adam's two moments (8):
  the classic 16 bytes per trained parameter in mixed precision, 16 in fp32 too (4 + 4 + 8); what is trained is
  what the stage trains: every weight (full), LoRA's adapters, the layers above `freeze_layers` (freeze: the
  embeddings frozen, and the output layer with them when tied), or prompt tuning's virtual tokens;
- the precision the stage runs in: `precision` (auto: bf16 on GPUs), fp32 on a CPU, and fp32 for PPO without
  DeepSpeed (it trains in fp32 on one process; `precision` applies under DeepSpeed);
- ZeRO divides by the number of processes: stage 1 the optimizer states and master weights, stage 2 also the
  gradients, stage 3 also the weights (PPO's frozen models too, with frozen.zero3); offload moves the optimizer
  states and master weights (and under ZeRO-3 the weights) to CPU memory;
- activations of one micro-batch: 34*s*b*h bytes per layer in 16-bit (Korthikanti et al., 2022, without the
  attention scores, which SDPA and flash attention do not keep), twice that in fp32; with gradient checkpointing
  each layer's input plus one layer's full activations; with freeze, only the trained layers keep theirs (no
  gradient flows below them); plus the fp32 logits and their log-softmax ([b, s, vocabulary]; PPO's on the
  response positions only; none for a reward model);
- generation (PPO, GRPO, RLOO): the KV cache, 2 * layers * kv heads * head dim * (prompt + new tokens) * batch;
  PPO under ZeRO-3 with rollout.gather_zero3 (the default) also holds the whole policy while it samples;
- runtime: 1.0 GiB on a GPU (CUDA context and allocator slack); on a CPU run the libraries' resident memory;
- on a CPU run, the C allocator's retention: glibc's heap keeps the activations freed during a backward pass
  apart from the gradient buffers allocated meanwhile, so resident memory grows by about the activations again
  (measured: with MALLOC_MMAP_THRESHOLD_=131072 it does not, at a 30% cost in speed).

It is an estimate: within about a quarter of what is measured on this project's CPU runs (tests/integration/
test_plan.py), and on GPUs with the usual caveats (fragmentation, temporary buffers, a vocabulary that does
not divide evenly).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rlhf.errors import UsageError
from pipeline.models import resolve

GIB = 1024**3
# The libraries' resident memory on a CPU run (measured here with the tiny model, whose weights are negligible):
# torch, transformers, peft, TRL's trainers and datasets for the TRL-based stages; PPO imports no trainer.
CPU_RUNTIME = {"trl": 540 * 2**20, "own": 420 * 2**20}  # a TRL trainer's process, our own loop's (PPO)
GPU_RUNTIME = 1.0 * GIB
PROMPT_TOKENS = 256  # the longest prompt assumed for online stages (rlhf plan --prompt-tokens)

# Shapes of well-known hub models, so that planning needs no download.
KNOWN = {
    "meta-llama/Llama-2-7b-hf": {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 32, "intermediate": 11008,
                                 "vocab": 32000, "tied": False},
    "meta-llama/Llama-2-13b-hf": {"hidden": 5120, "layers": 40, "heads": 40, "kv_heads": 40, "intermediate": 13824,
                                  "vocab": 32000, "tied": False},
    "meta-llama/Llama-2-70b-hf": {"hidden": 8192, "layers": 80, "heads": 64, "kv_heads": 8, "intermediate": 28672,
                                  "vocab": 32000, "tied": False},
}


@dataclass
class Shape:
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool = True
    head_dim: int = 0

    def __post_init__(self):
        self.head_dim = self.head_dim or self.hidden // self.heads

    @property
    def layer_params(self) -> int:
        """One decoder layer: attention (q, o: h x h; k, v: h x kv), gated MLP (3 h x i), two norms."""
        kv = self.kv_heads * self.head_dim
        q = self.heads * self.head_dim
        return self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate + 2 * self.hidden

    @property
    def params(self) -> int:
        """A Llama-style decoder: its layers, the embeddings (and an untied output layer), the final norm."""
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.layer_params + embed + self.hidden

    def frozen_below(self, n: int) -> int:
        """Trainable parameters with the embeddings and the lowest n layers frozen (tuning: freeze); tied output
        weights are the embeddings, so they stay frozen too."""
        return self.params - self.vocab * self.hidden - n * self.layer_params

    def lora_params(self, r: int, targets) -> int:
        """LoRA's trainable parameters: r * (in + out) for every targeted linear of every layer."""
        kv, q = self.kv_heads * self.head_dim, self.heads * self.head_dim
        dims = {"q_proj": (self.hidden, q), "k_proj": (self.hidden, kv), "v_proj": (self.hidden, kv),
                "o_proj": (q, self.hidden), "gate_proj": (self.hidden, self.intermediate),
                "up_proj": (self.hidden, self.intermediate), "down_proj": (self.intermediate, self.hidden)}
        names = list(dims) if targets == "all-linear" else [t for t in targets if t in dims]
        return self.layers * sum(r * sum(dims[n]) for n in names)


def shape_of(ref: str) -> Shape:
    """A model reference's shape: a known hub id, or the config.json of a local or built-in model."""
    if ref in KNOWN:
        return Shape(**KNOWN[ref])
    import json

    path = Path(resolve(ref))
    cfg_file = path / "config.json"
    if not cfg_file.exists():
        raise UsageError(f"plan: cannot read the shape of {ref!r} (no {cfg_file}); use a local model or a known "
                         f"hub id ({', '.join(KNOWN)})")
    c = json.loads(cfg_file.read_text())
    try:
        return Shape(hidden=c["hidden_size"], layers=c["num_hidden_layers"], heads=c["num_attention_heads"],
                     kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                     intermediate=c["intermediate_size"], vocab=c["vocab_size"],
                     tied=bool(c.get("tie_word_embeddings", False)), head_dim=c.get("head_dim") or 0)
    except KeyError as exc:
        raise UsageError(f"plan: {cfg_file}: no {exc.args[0]!r}; the plan knows decoder-only (Llama-style) shapes "
                         "with these keys at the top level") from None


@dataclass
class Work:
    """What one training stage holds and computes, per process."""

    shape: Shape
    method: str
    trainable: int  # trained parameters of the main model
    frozen_models: int = 0  # whole frozen copies (reference, reward model)
    critic: int = 0  # a second trained model (PPO's critic)
    batch: int = 1  # micro-batch, sequences
    seq: int = 512
    generate: int = 0  # new tokens sampled per sequence (0: no generation)
    gen_batch: int = 0
    checkpointing: bool = False
    pairs: int = 1  # DPO and reward models forward chosen and rejected
    gather_for_generation: bool = False  # PPO under ZeRO-3 with rollout.gather_zero3: the whole policy to sample
    lm_head: bool = True  # logits over the vocabulary (not for a reward model); PPO's on response positions only
    frozen_sharded: bool = True  # under ZeRO-3 the frozen models are sharded too (PPO: frozen.zero3)
    grad_layers: int = 0  # layers that keep activations for the backward pass (0: all; freeze: those trained)
    own_loop: bool = False  # our own training loop (PPO) rather than a TRL trainer: its process's runtime memory
    notes: list = field(default_factory=list)


def work_of(stage, cfg, procs: int = 1, prompt_tokens: int = PROMPT_TOKENS) -> Work | None:
    """The Work of a training stage config, per process; None for stages that do not train. What the stage computes
    is what it declares (StageBlock.memory: batch, sequence, pairs, generation, frozen models, ...); what it trains
    follows from its model and tuning (full, lora, freeze, prompt_tuning). Online stages (PPO, GRPO, RLOO) have no
    prompt-length setting: `prompt_tokens` stands for their longest prompt."""
    declared = stage.memory(procs, prompt_tokens)
    if declared is None:
        return None
    ref = next(r for r, kind in stage.inputs().values() if kind == "model")
    shape = shape_of(_model_ref(cfg, ref))
    tuning = getattr(stage, "tuning", "full")
    trainable = (shape.lora_params(stage.lora.r, stage.lora.target_modules) if tuning == "lora"
                 else stage.prompt_tuning.num_virtual_tokens * shape.hidden if tuning == "prompt_tuning"
                 else shape.frozen_below(stage.freeze_layers) if tuning == "freeze" else shape.params)
    declared = dict(declared)
    critic = declared.pop("critic", False)
    declared.pop("fp32_without_deepspeed", None)
    w = Work(shape, stage.stage, trainable, checkpointing=getattr(stage, "gradient_checkpointing", False), **declared)
    w.critic = shape.params if critic else 0
    if tuning == "freeze":
        w.grad_layers = shape.layers - stage.freeze_layers
    return w


def _model_ref(cfg, ref: str) -> str:
    """Follow stage:NAME references back to the model reference the chain starts from."""
    seen = set()
    while ref.startswith("stage:") and ref not in seen:
        seen.add(ref)
        up = cfg.stage(ref[6:])
        ref = getattr(up, "policy", None) or getattr(up, "model", None) or ref
    return cfg.model_spec(ref).ref


def estimate(w: Work, zero: int, offload: bool, procs: int, precision: str, on_cpu: bool) -> dict[str, float]:
    """Peak bytes per process by part, for one ZeRO stage and offload choice."""
    s = w.shape
    wbytes = 4 if precision == "fp32" else 2
    mixed = precision != "fp32"
    shard3 = procs if zero == 3 else 1
    trained = w.trainable + w.critic
    parts = {
        "weights": (s.params + w.critic) * wbytes / shard3
        + w.frozen_models * s.params * wbytes / (shard3 if w.frozen_sharded else 1),
        "master weights": trained * 4 / (procs if zero >= 1 else 1) if mixed and not offload else 0.0,
        "gradients": trained * wbytes / (procs if zero >= 2 else 1),
        "optimizer states": 0.0 if offload else trained * 8 / (procs if zero >= 1 else 1),
    }
    if offload and zero == 3 and not on_cpu:  # parameters live in CPU memory; one layer is gathered at a time
        frozen_whole = 0 if w.frozen_sharded else w.frozen_models * s.params * wbytes
        parts["weights"] = (s.params / s.layers) * wbytes * (1 + w.frozen_models * w.frozen_sharded + bool(w.critic)) \
            + frozen_whole
    if offload and on_cpu:  # on a CPU run "offload" moves nothing: it is all host memory
        parts["optimizer states"] = trained * 8 / (procs if zero >= 1 else 1)
        parts["master weights"] = trained * 4 / (procs if zero >= 1 else 1) if mixed else 0.0
    act_bytes = 2 if mixed else 4
    tokens = w.batch * w.pairs * w.seq
    per_layer = 17 * tokens * s.hidden * act_bytes  # 34 s b h bytes in 16-bit; SDPA keeps no s x s scores
    layers = w.grad_layers or s.layers  # frozen lower layers keep nothing for a backward pass that stops above them
    activations = (tokens * s.hidden * act_bytes * layers + per_layer) if w.checkpointing else per_layer * layers
    logit_tokens = w.batch * w.pairs * (w.generate or w.seq) if w.lm_head else 0
    parts["activations"] = activations + 2 * logit_tokens * s.vocab * 4  # + fp32 logits and their log-softmax
    if on_cpu:  # glibc's heap does not reuse the activations freed during backward for the gradients made then
        parts["allocator"] = activations
    if w.generate:
        parts["KV cache"] = 2 * s.layers * s.kv_heads * s.head_dim * w.seq * w.gen_batch * wbytes
    if zero == 3 and w.gather_for_generation and procs > 1:  # sampling gathers every shard of the policy
        parts["gathered policy"] = s.params * wbytes * (1 - 1 / procs)
    parts["runtime"] = (CPU_RUNTIME["own" if w.own_loop else "trl"]) if on_cpu else GPU_RUNTIME
    return parts


def host_bytes(w: Work, zero: int, procs: int, precision: str) -> float:
    """What offload puts in CPU memory, per process: optimizer states and master weights (their ZeRO shard),
    and under ZeRO-3 the weights' shards too."""
    trained, shard = w.trainable + w.critic, (procs if zero >= 1 else 1)
    out = trained * (8 + (4 if precision != "fp32" else 0)) / shard
    if zero == 3:
        out += (w.shape.params * (1 + w.frozen_models) + w.critic) * (4 if precision == "fp32" else 2) / procs
    return out


def options(w: Work, procs: int, precision: str, on_cpu: bool, per_node: int = 1,
            zero0_precision: str | None = None) -> list[dict]:
    """Every ZeRO stage with and without offload: its peak per process, the CPU memory offload needs per node,
    and a rough speed rank. `zero0_precision`: the precision of the ZeRO-0 option when it differs (PPO without
    DeepSpeed)."""
    out = []
    for zero in (0, 1, 2, 3):
        for offload in (False, True):
            if offload and zero == 0:
                continue
            prec = zero0_precision if zero == 0 and zero0_precision else precision
            parts = estimate(w, zero, offload, procs, prec, on_cpu)
            # faster first: no offload, then lower ZeRO stages (less communication)
            cost = zero + (4 if offload else 0)
            host = host_bytes(w, zero, procs, precision) * per_node if offload and not on_cpu else 0.0
            out.append({"zero": zero, "offload": offload, "precision": prec, "bytes": sum(parts.values()),
                        "parts": parts, "host_bytes_per_node": host, "cost": cost})
    return out


def parse_memory(text: str) -> float:
    units = {"gb": GIB, "gib": GIB, "mb": 1024**2, "mib": 1024**2, "tb": 1024**4}
    t = text.strip().lower()
    for u, mult in units.items():
        if t.endswith(u):
            return float(t[: -len(u)]) * mult
    return float(t) * GIB


def plan(cfg, gpus: int, nodes: int, memory: float, on_cpu: bool = False, only=None,
         prompt_tokens: int = PROMPT_TOKENS) -> list[dict]:
    """Per training stage: its options, which fit in `memory` per device, and the fastest of those."""
    procs = gpus * nodes
    rows = []
    for st in cfg.stages:
        if only and st.name not in only:
            continue
        w = work_of(st, cfg, procs, prompt_tokens)
        if w is None:
            continue
        precision = _precision(st, on_cpu)
        opts = options(w, procs, precision, on_cpu, gpus, zero0_precision=_precision(st, on_cpu, zero=0))
        fits = [o for o in opts if o["bytes"] <= memory]
        best = min(fits, key=lambda o: o["cost"]) if fits else None
        rows.append({"stage": st.name, "method": st.stage, "precision": _precision(st, on_cpu, zero=1 if getattr(st, "deepspeed", None) else 0),
                     "params": w.shape.params, "trainable": w.trainable + w.critic, "options": opts, "best": best})
    return rows


def _precision(stage, on_cpu: bool, zero: int = 1) -> str:
    """The precision a stage trains in under ZeRO stage `zero`: fp32 on a CPU; on GPUs `auto` is bf16; a stage that
    declares it trains in fp32 without DeepSpeed (PPO) does so at ZeRO-0 with no `deepspeed:`, whatever `precision`
    says."""
    fp32_alone = (stage.memory(1, PROMPT_TOKENS) or {}).get("fp32_without_deepspeed", False)
    if on_cpu or (fp32_alone and zero == 0 and not stage.deepspeed):
        return "fp32"
    return "bf16" if stage.precision == "auto" else stage.precision


def chosen(stage) -> tuple[int, bool]:
    """(ZeRO stage, offload) of a stage's `deepspeed:` JSON; (0, False) without one."""
    import json

    from pipeline.deepspeed import zero_stage  # deferred: it imports torch

    if not getattr(stage, "deepspeed", None):
        return 0, False
    try:
        ds = json.loads(Path(stage.deepspeed).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UsageError(f"{stage.deepspeed}: cannot read the DeepSpeed config: {exc}") from None
    z = ds.get("zero_optimization", {})
    off = any((z.get(k) or {}).get("device", "none") not in ("none", None) for k in ("offload_optimizer", "offload_param"))
    return zero_stage(ds), off


def local_devices() -> tuple[int, float, bool]:
    """(processes, memory per process in bytes, on_cpu) of this launch: the GPUs' memory, or on a CPU run the
    host's available memory shared by the launcher's processes (WORLD_SIZE)."""
    import os

    import torch

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if torch.cuda.is_available():
        return world, float(torch.cuda.get_device_properties(0).total_memory), False
    avail = 0.0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            avail = int(line.split()[1]) * 1024.0
    return world, avail / world, True


def check(cfg, only=None) -> list[str]:
    """`rlhf run --plan-check`: each selected training stage's estimate for this machine under the ZeRO
    setting it will run with; a UsageError naming the stages that cannot fit (and what would)."""
    procs, memory, on_cpu = local_devices()
    lines, refused = [], []
    for row in plan(cfg, procs, 1, memory, on_cpu, only):
        st = cfg.stage(row["stage"])
        zero, off = chosen(st)
        mine = next(o for o in row["options"] if o["zero"] == zero and o["offload"] == off)
        text = (f"{row['stage']}: about {mine['bytes'] / GIB:.1f} GiB per process under ZeRO-{zero}"
                f"{' + offload' if off else ''} ({procs} process(es), {memory / GIB:.1f} GiB each)")
        if mine["bytes"] <= memory:
            lines.append("plan-check: " + text)
            continue
        fits = [f"ZeRO-{o['zero']}{' + offload' if o['offload'] else ''} ({o['bytes'] / GIB:.1f} GiB)"
                for o in row["options"] if o["bytes"] <= memory]
        refused.append(text + ("; would fit: " + ", ".join(fits) if fits else
                               "; nothing fits: more devices, LoRA, gradient checkpointing or a smaller batch"))
    if refused:
        raise UsageError("plan-check: not launched, a stage would not fit in memory:\n  " + "\n  ".join(refused))
    return lines


def parse_memory_arg(text: str) -> float:
    try:
        value = parse_memory(text)
    except ValueError:
        value = -1.0
    if value <= 0:
        raise UsageError(f"--gpu-memory {text}: expected a size such as 80GB, 24GiB or 512MB")
    return value


def render(rows: list[dict], memory: float, procs: int) -> str:
    lines = [f"per device: {memory / GIB:.1f} GiB, {procs} process(es)"]
    for r in rows:
        trained = f"{r['trainable'] / 1e6:,.1f}M" if r["trainable"] >= 1e6 else f"{r['trainable']:,}"
        lines.append(f"\n{r['stage']} ({r['method']}, {r['precision']}): {r['params'] / 1e9:.2f}B parameters, "
                     f"{trained} trained")
        for o in r["options"]:
            tag = "fits" if o["bytes"] <= memory else "too big"
            best = "  <- fastest that fits" if r["best"] is o else ""
            host = f"  (+{o['host_bytes_per_node'] / GIB:,.0f} GiB CPU memory per node)" if o["host_bytes_per_node"] else ""
            prec = f"  ({o['precision']})" if o["precision"] != r["precision"] else ""
            lines.append(f"  ZeRO-{o['zero']}{' + offload' if o['offload'] else '          '}  "
                         f"{o['bytes'] / GIB:8.1f} GiB  {tag}{best}{host}{prec}")
        if r["best"] is None:
            lines.append("  nothing fits: more devices, LoRA, gradient checkpointing or a smaller batch")
    return "\n".join(lines)
