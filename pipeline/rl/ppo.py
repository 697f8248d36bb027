"""The PPO loop: rollout -> score -> reference log-probs and values -> GAE -> PPO epochs.

The models:
- policy: trained (full, or LoRA adapters);
- reference: with LoRA, the same weights with the adapter disabled (no second copy); otherwise a
  frozen copy;
- value: a linear head on the policy's last hidden state (`value_model: head`), or a critic
  initialised from the reward model (`critic`: its backbone and score head, read at every token;
  it must share the policy's tokenizer);
- reward: a reward-model artifact (any tokenizer; scored on text through reward.scoring), or a
  rule `module:function(prompt, response) -> float`.

On one process a torch optimizer trains them (LocalOptimizer); under DeepSpeed the policy and
value head run in one engine and a critic in another (pipeline/deepspeed.py), each process
holding its share of the rollout.

The training forward scores exactly the distribution the rollout was sampled from: log-probabilities come
from the model's own output logits (its soft-capping or scaling included: Gemma 2, Granite, Cohere) divided
by the sampling temperature everywhere they are taken (old, new, reference, KL, held-out KL), sampling uses
an explicit GenerationConfig (nothing from the model's generation_config.json), and every stochastic layer
(dropout, layerdrop, drop-path) is off in every model for the whole stage, checked at start-up, so that
before the first update the importance ratio is exactly 1 (TRL's and OpenRLHF's PPO do the same).

The same training at any micro-batch size and process count:
- each response is sampled from its own random stream, seeded by (seed, step, its place in the step's
  batch) (RowSampler), so the rollout does not depend on how the prompts are split over processes;
- once scored, every process holds the whole rollout (gather_rollout); each minibatch is drawn from it in
  the same order on every process and split evenly between them;
- each loss is a token mean over the whole minibatch: every micro-batch backwards its masked sum divided by
  the minibatch's token count (losses.token_mean), and under DeepSpeed the engine's division by the
  accumulation steps and its mean over processes are undone. Logged statistics are token-weighted the same
  way. One process with micro_batch_size 1, 8 or the whole minibatch, and N processes, give the same update
  to float precision.

Everything the rollout does not train runs under torch.no_grad() in eval mode. A non-finite
loss, gradient norm or reward stops the loop with the step named, before the update is applied
and before anything is saved.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass

import torch
import torch.nn as nn

from pipeline.errors import InvalidInput
from pipeline.generation import chat_ids, generation_config, left_pad
from pipeline.generation import generate as generate_with
from pipeline.rl import losses


# attribute names of the rates stochastic layers read in training mode: dropout (Llama's attention_dropout,
# peft's lora_dropout rates), layerdrop (OPT, BioGPT, wav2vec-style decoders skip whole layers), drop-path /
# stochastic depth (DropPath modules' drop_prob) and the noise mixture-of-experts routers add (Mixtral's
# router_jitter_noise, PhiMoE's input_jitter_noise, DBRX's moe_jitter_eps)
_STOCHASTIC = ("dropout", "layerdrop", "drop_path", "drop_prob", "jitter")


def disable_dropout(model: nn.Module):
    """Every stochastic layer off for good (not only in eval mode): every dropout module (LoRA's lora_dropout
    included) and every float rate named like dropout, layerdrop, drop_path, drop_prob or jitter on any module, and
    on the model's config (some layers read it at each forward). check_deterministic then proves nothing random is
    left. Returns a function that puts the config's own rates back, for saving: a model trained here keeps the
    dropout its config had for whoever trains it next."""
    saved: list[tuple[object, str, float]] = []
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = 0.0
        for name, value in list(vars(m).items()):
            if any(k in name for k in _STOCHASTIC) and isinstance(value, float):
                setattr(m, name, 0.0)
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            for name, value in config.to_dict().items():
                if any(k in name for k in _STOCHASTIC) and isinstance(value, float) and value:
                    saved.append((config, name, value))
                    setattr(config, name, 0.0)

    def restore() -> None:
        for config, name, value in saved:
            setattr(config, name, value)

    return restore


def refuse_random_forwards(run, modules: list, what: str) -> None:
    """Run `run()` (a list of output tensors) twice with `modules` in training mode; the outputs must agree to the
    rounding of their dtype (a few units in the last place, so that a GPU's reductions in another order pass) or
    something still draws random numbers: refused, saying so. Every process calls it (ZeRO-3: collective)."""
    modes = [m.training for m in modules]
    for m in modules:
        m.train(True)
    try:
        with torch.no_grad():
            first, second = run(), run()
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    for a, b in zip(first, second):
        tol = 8 * torch.finfo(a.dtype).eps * max(1.0, a.float().abs().max().item())
        diff = (a.float() - b.float()).abs().max().item()
        if diff > tol:
            raise InvalidInput(
                f"{what} is not deterministic in training mode: two forwards of the same input differ by {diff:.3g} "
                "with dropout, layerdrop, drop-path and router jitter switched off. Some layer draws random numbers "
                "under another name, which would make the importance ratio and the KL to the reference noise; find "
                "it and set its rate to 0 in the model's config")


class ValueHead(nn.Module):
    def __init__(self, hidden: int):
        super().__init__()
        self.linear = nn.Linear(hidden, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h).squeeze(-1)


@dataclass
class Rollout:
    prompts: list
    responses: list[str]
    query: torch.Tensor  # [B, P] left-padded
    query_mask: torch.Tensor
    response: torch.Tensor  # [B, R] right-padded, EOS kept, after it pad
    mask: torch.Tensor  # [B, R] 1 on response tokens (EOS included)
    eos: torch.Tensor  # [B] bool: the response ended with EOS
    sampler_logp: torch.Tensor | None = None  # [B, R] the sampler's own log-probs (generate(keep_scores=True))
    scores: torch.Tensor | None = None
    logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def response_hidden(model, input_ids, attention_mask, position_ids, start: int) -> torch.Tensor:
    """The last hidden states at the positions predicting the tokens from `start` on (the value head's input):
    the decoder alone, no vocabulary projection."""
    h = _base(model).get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                   use_cache=False).last_hidden_state
    return h[:, start - 1 : -1]


def response_logits(model, input_ids, attention_mask, position_ids, start: int):
    """(logits predicting the tokens from position `start` on, the last hidden states there).

    The logits are the model's own output: its forward runs whole, so whatever it does after the LM head (Gemma 2's
    final_logit_softcapping, Granite's logits_scaling, Cohere's logit_scale) is applied exactly as when it samples.
    `logits_to_keep` limits the vocabulary projection to the response positions (the [batch, length, vocabulary]
    logits are most of a forward's memory), and a hook on the LM head takes its input, the last hidden state
    there, for the value head (output_hidden_states would keep every layer's)."""
    base = _base(model)
    keep = input_ids.shape[1] - start + 1
    seen = {}
    hook = base.get_output_embeddings().register_forward_pre_hook(lambda module, args: seen.__setitem__("h", args[0]))
    try:
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                    **({"logits_to_keep": keep} if _keeps_logits(base) else {}))
    finally:
        hook.remove()
    logits, h = out.logits[:, -keep:-1], seen["h"][:, -keep:-1]
    return logits, h


def _keeps_logits(model) -> bool:
    """Whether the model's forward takes `logits_to_keep` (every causal LM of transformers 4.50+; remote code may
    not): without it the forward computes every position's logits and the response positions are sliced after."""
    import inspect

    return "logits_to_keep" in inspect.signature(model.forward).parameters


class Actor(nn.Module):
    """The policy and (value_model: head) its value head as one module: one DeepSpeed engine trains both."""

    def __init__(self, policy, value_head: ValueHead | None = None):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, input_ids, attention_mask, position_ids, start: int, values: bool = True, logits: bool = True):
        """Logits predicting the tokens from position `start` on (or None: values only, no vocabulary
        projection), and the values there (or None)."""
        if logits:
            out, h = response_logits(self.policy, input_ids, attention_mask, position_ids, start)
        else:
            out, h = None, response_hidden(self.policy, input_ids, attention_mask, position_ids, start)
        want = values and self.value_head is not None
        v = self.value_head(h.to(self.value_head.linear.weight.dtype)).float() if want else None
        return out, v


class Critic(nn.Module):
    """A reward model read at every token (value_model: critic): its backbone and score head give a value per
    position. With the reward model's normalisation statistics (`mean`, `std`), values are on the scale of the
    normalised rewards they are trained to predict (OpenRLHF's critic does the same)."""

    def __init__(self, model, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        self.model, self.mean, self.std = model, mean, std

    def forward(self, input_ids, attention_mask, position_ids, start: int):
        backbone = self.model.base_model if hasattr(self.model, "base_model") else self.model.model
        h = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return (self.model.score(h[:, start - 1 : -1]).squeeze(-1).float() - self.mean) / self.std


class PPOModels:
    """Policy (+ value head or critic) and the reference, with one forward that returns what PPO needs.

    `actor` and `critic` are what gets called: the modules themselves, or the DeepSpeed engines
    wrapping them (pipeline/deepspeed.py); `generation()` hands out the policy for sampling.
    """

    def __init__(self, policy, tokenizer, value_model: str = "head", critic=None, lora: bool = False,
                 reference=None, temperature: float = 1.0, critic_scale: tuple[float, float] = (0.0, 1.0)):
        if not temperature > 0:
            raise ValueError("PPO needs a sampling temperature > 0 (greedy decoding has no log-probabilities)")
        self.tok, self.lora, self.temperature = tokenizer, lora, temperature
        # every stochastic layer off; the configs' own rates go back before anything is saved (restore_configs)
        self._restore = [disable_dropout(m) for m in (policy, critic, reference) if m is not None]
        if lora:
            self.reference = None
        else:
            self.reference = reference if reference is not None else copy.deepcopy(policy)
            self.reference.eval().requires_grad_(False)
        dtype = next(policy.parameters()).dtype  # one dtype per engine (DeepSpeed flattens them together)
        # the value head reads what the LM head reads: its input width (OPT-350m projects 1024 to 512 before it)
        width = _base(policy).get_output_embeddings().in_features
        head = ValueHead(width).to(dtype) if value_model == "head" else None
        self.actor_module = Actor(policy, head)
        self.critic_module = Critic(critic, *critic_scale) if critic is not None else None
        self.actor, self.critic = self.actor_module, self.critic_module
        self.generation = lambda: contextlib.nullcontext(self.policy)  # ZeRO-3: gathers the weights
        self.sync_generation = False  # True: sharded ZeRO-3 generation, every process steps together
        self.engines: list = []  # DeepSpeed engines, kept alive for as long as the models are used
        self.device = next(policy.parameters()).device  # where rollouts live (the trained models' device)

    @property
    def policy(self):
        return self.actor_module.policy

    @property
    def value_head(self):
        return self.actor_module.value_head

    def trainable_parameters(self):
        return [p for group in self.parameter_groups() for p in group]

    def parameter_groups(self) -> list[list]:
        """The trained parameters by model, as DeepSpeed holds them in engines (and OpenRLHF in optimizers): the policy
        with its value head, then the critic. Each group's gradients are clipped on their own."""
        groups = [[p for p in self.actor_module.parameters() if p.requires_grad]]
        if self.critic_module is not None:
            groups.append([p for p in self.critic_module.parameters() if p.requires_grad])
        return groups

    def train(self, mode: bool = True) -> None:
        for m in (self.actor_module, self.critic_module):
            if m is not None:
                m.train(mode)

    def check_deterministic(self) -> None:
        """Two train-mode forwards of the trained models on the same input must agree: a stochastic layer that
        disable_dropout did not find (a rate under another name, a custom module) would add noise to the importance
        ratio and the KL. Every process calls it (under ZeRO-3 the forwards are collective)."""
        ids = self.tok("Tell me about the river and the old stone bridge.")["input_ids"][:16]
        ids = torch.tensor([ids if len(ids) > 1 else [0, 0]], device=self.device)
        att = torch.ones_like(ids)
        pos = position_ids(att)

        def run():
            logits, values = self.actor(ids, att, pos, 1)
            critic = self.critic(ids, att, pos, 1) if self.critic is not None else None
            return [t for t in (logits, values, critic) if t is not None]

        refuse_random_forwards(run, [m for m in (self.actor_module, self.critic_module) if m is not None],
                               f"the policy ({type(_base(self.policy)).__name__}) or its value model")

    def restore_configs(self) -> None:
        """The models' configs get their own dropout rates back (before saving; the live modules keep theirs off)."""
        for restore in self._restore:
            restore()

    def _tempered(self, logits: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        return logits if self.temperature == 1.0 else logits / self.temperature

    def forward(self, ro: Rollout, idx=None, with_values: bool = True, reference: bool = False,
                entropy_grad: bool = True, logprobs: bool = True):
        """Log-probs of the response tokens [B, R] under the sampling distribution (logits / temperature),
        entropies of that distribution [B, R], values [B, R] (or None). entropy_grad=False: the entropy is a
        statistic only (entropy_coef 0), computed without keeping its graph. logprobs=False: values only (log-probs
        and entropies None).

        The forward runs on the selected rows without the columns that are padding in all of them (the prompts'
        common left padding, the responses' common tail after the longest one ends); outputs are padded back to
        [B, R] with zeros there, positions every loss masks out."""
        q, qm, r, m = ro.query, ro.query_mask, ro.response, ro.mask
        if idx is not None:
            q, qm, r, m = q[idx], qm[idx], r[idx], m[idx]
        R = r.shape[1]
        first = int(qm.any(0).long().argmax())  # the first column holding a prompt token of any row
        L = max(1, int(m.sum(1).max()))  # the longest response (EOS included)
        q, qm, r, m = q[:, first:], qm[:, first:], r[:, :L], m[:, :L]
        ids = torch.cat([q, r], 1)
        att = torch.cat([qm, m.long()], 1)
        pos = position_ids(att)
        P = q.shape[1]
        full = lambda x: x if x is None or L == R else torch.nn.functional.pad(x, (0, R - L))  # noqa: E731
        if reference:
            if self.lora:
                with self.policy.disable_adapter():
                    logits, _ = self.actor(ids, att, pos, P, values=False)
            else:
                logits, _ = response_logits(self.reference, ids, att, pos, P)
            return full(losses.logprobs_from_logits(self._tempered(logits), r)), None, None
        logp = ent = values = None
        if logprobs or (with_values and self.critic is None):
            logits, values = self.actor(ids, att, pos, P, values=with_values, logits=logprobs)
            if logprobs:
                logits = self._tempered(logits)
                logp = losses.logprobs_from_logits(logits, r)
                with torch.set_grad_enabled(torch.is_grad_enabled() and entropy_grad):
                    ent = losses.entropy_from_logits(logits)
        if with_values and self.critic is not None:
            values = self.critic(ids, att, pos, P)
        return full(logp), full(ent), full(values)


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where the parameters' device has one (CPU and CUDA do): the same update,
    about ten times faster on a CPU than the per-tensor loop torch picks there by default (what transformers'
    default `adamw_torch_fused`, and so TRL, uses too)."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except RuntimeError:  # a device or dtype without the fused kernel
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class LocalOptimizer:
    """One process: a torch optimizer over every trainable parameter, gradients clipped together, and the
    learning-rate schedule stepped once per optimizer step."""

    def __init__(self, models: PPOModels, optimizer, max_grad_norm: float, scheduler=None):
        self.models, self.optimizer, self.max_grad_norm, self.scheduler = models, optimizer, max_grad_norm, scheduler

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, policy_loss: torch.Tensor, value_loss: torch.Tensor) -> None:
        """One micro-batch's share of the minibatch's losses (its token sums over the minibatch's token count):
        the gradients of the micro-batches add up to the minibatch's."""
        (policy_loss + value_loss).backward()

    def step(self, check) -> float:
        """Clip the policy's (with its value head) and the critic's gradients each to max_grad_norm, as their DeepSpeed
        engines do, check them, update. Returns the norm over both, before clipping."""
        norms = torch.stack([torch.nn.utils.clip_grad_norm_(group, self.max_grad_norm)
                             for group in self.models.parameter_groups()])
        gn = norms.square().sum().sqrt()
        check(grad_norm=gn)  # before the update: a non-finite gradient never reaches the weights
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        return gn.item()

    def _weights(self):
        m = self.models
        critic = m.critic_module.model if m.critic_module is not None else None
        return [(mod, f"{name}.safetensors") for mod, name in ((m.policy, "policy"), (m.value_head, "value_head"),
                                                             (critic, "critic")) if mod is not None]

    def save(self, path) -> None:
        from safetensors.torch import save_model

        for module, name in self._weights():
            save_model(module, str(path / name))
        torch.save(self.optimizer.state_dict(), path / "optimizer.pt")
        if self.scheduler is not None:
            torch.save(self.scheduler.state_dict(), path / "scheduler.pt")

    def load(self, path) -> None:
        from safetensors.torch import load_model

        for module, name in self._weights():
            load_model(module, str(path / name))
        self.optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
        if self.scheduler is not None:
            if not (path / "scheduler.pt").exists():
                raise InvalidInput(f"{path}: no scheduler.pt; the checkpoint was written without a schedule")
            self.scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))


def row_seeds(seed: int, step, rows) -> list[int]:
    """One sampling seed per response, from (run seed, step, the response's place in the step's batch): the same
    response is drawn whether the batch is sampled on one process or split over several."""
    import hashlib

    return [int.from_bytes(hashlib.blake2b(f"{seed}/{step}/{i}".encode(), digest_size=8).digest(), "little") >> 1
            for i in rows]


class RowSampler:
    """A logits processor that samples every row from softmax(logits / T) with the row's own random stream (one
    uniform per token, drawn for all `steps` at once from a generator seeded by the row's seed; inverse-CDF
    sampling, as torch.multinomial does), and hands generate() that choice as the only finite score, so generate
    runs greedy on it. A response then depends on its prompt and its seed alone,
    never on the other rows of the batch or on the number of processes. With `record`, it also keeps each sampled
    token's log-probability under logits / T, the sampler's own (PPO's old log-probs: TRL 1.12 takes them from the
    sampler's logits too), one row of logits per sequence where `output_scores` would keep all of them; call
    `finish` with the last sampled tokens afterwards."""

    def __init__(self, temperature: float, seeds: list[int], steps: int, record: bool = False):
        # each row's uniforms for every step at once (float64, from a CPU generator of its own): one draw per row
        # per generate() call rather than per token, the same numbers on any device
        self.uniforms = torch.stack([torch.rand(steps, generator=torch.Generator().manual_seed(s), dtype=torch.float64)
                                     for s in seeds]) if seeds else torch.zeros(0, steps, dtype=torch.float64)
        self.temperature, self.record, self.step = temperature, record, 0
        self.rows, self.out = None, []

    def _collect(self, tokens: torch.Tensor) -> None:
        if self.rows is not None:
            logits, lse = self.rows
            self.out.append(logits.gather(1, tokens[:, None].to(logits.device)).squeeze(1) - lse)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.uniforms.device != scores.device:
            self.uniforms = self.uniforms.to(scores.device)
        if self.record:
            self._collect(input_ids[:, -1])  # the token sampled from the previous row
        logits = scores.float() / self.temperature
        lse = torch.logsumexp(logits, -1)
        if self.record:
            self.rows = (logits, lse)
        u = self.uniforms[:, min(self.step, self.uniforms.shape[1] - 1)]
        self.step += 1
        cdf = torch.exp(logits.double() - lse.double()[:, None]).cumsum(-1)
        # the first token whose cumulative probability exceeds u (scaled by the total, which rounding keeps near 1)
        chosen = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True).clamp(max=cdf.shape[1] - 1)
        return torch.full_like(scores, float("-inf")).scatter_(1, chosen, 0.0)

    def finish(self, last: torch.Tensor) -> torch.Tensor:
        self._collect(last)
        return torch.stack(self.out, 1)


def generate(models: PPOModels, prompts: list, max_new_tokens: int, keep_scores: bool = False,
             seeds: list[int] | None = None) -> Rollout:
    """Sample one response per prompt at the models' temperature (pure sampling: no top-k, top-p or penalties,
    whatever the model's generation_config.json says), each from its own seed (`seeds`, one per prompt, see
    row_seeds; default: drawn from torch's global generator). keep_scores: also keep the sampler's own log-probs
    (ro.sampler_logp, masked after each response's end), which PPO uses as its old log-probs."""
    from transformers import LogitsProcessorList

    tok = models.tok
    query, qmask = left_pad([chat_ids(tok, p) for p in prompts], tok.pad_token_id)
    query, qmask = query.to(models.device), qmask.to(models.device)
    if seeds is None:
        seeds = torch.randint(0, 2**62, (len(prompts),)).tolist()
    sampler = RowSampler(models.temperature, seeds, max_new_tokens, record=keep_scores)
    config = generation_config(tok, max_new_tokens, 0.0, 1.0, return_dict_in_generate=True)  # greedy on RowSampler
    models.train(False)
    with torch.no_grad(), models.generation() as policy:
        out = generate_with(policy, config, query, qmask, synced_gpus=models.sync_generation,
                            logits_processor=LogitsProcessorList([sampler]))
    response = out.sequences[:, query.shape[1]:]
    if response.shape[1] == 0:
        raise InvalidInput("the policy generated no tokens (max_new_tokens is 0?)")
    mask, eos = losses.response_mask(response, tok.eos_token_id)
    response = response.masked_fill(mask == 0, tok.pad_token_id)
    texts = tok.batch_decode(response, skip_special_tokens=True)
    ro = Rollout(prompts, [t.strip() for t in texts], query, qmask, response, mask, eos)
    if keep_scores:
        ro.sampler_logp = sampler.finish(out.sequences[:, -1])[:, : response.shape[1]] * mask
    return ro


def gather_rollout(ro: Rollout, pad_id: int) -> Rollout:
    """The whole scored rollout on every process: each process's rows (it sampled every world-th prompt of the step,
    starting at its rank) gathered and put back in the step's order, so that the update draws its minibatches
    from the same rows, in the same order, on any number of processes. Prompts are re-padded on the left and
    responses on the right to the widest process's. The identity on one process."""
    from pipeline import distributed

    world = distributed.world_size()
    if world == 1:
        return ro
    widths = distributed.all_gather_object((ro.query.shape[1], ro.response.shape[1]))
    P, R, pad = max(w[0] for w in widths), max(w[1] for w in widths), pad_id

    def left(t, value):
        return torch.nn.functional.pad(t, (P - t.shape[1], 0), value=value)

    def right(t, value=0):
        return torch.nn.functional.pad(t, (0, R - t.shape[1]), value=value)

    n = len(ro.prompts)
    order = torch.tensor([r + world * i for r in range(world) for i in range(n)]).argsort()  # rank-major -> step order
    take = lambda t: distributed.gather(t)[order] if t is not None else None  # noqa: E731
    texts = distributed.all_gather_object((ro.prompts, ro.responses))
    prompts = [p for ps, _ in texts for p in ps]
    responses = [r for _, rs in texts for r in rs]
    return Rollout([prompts[i] for i in order], [responses[i] for i in order], take(left(ro.query, pad)),
                   take(left(ro.query_mask, 0)), take(right(ro.response, pad)), take(right(ro.mask)), take(ro.eos),
                   take(right(ro.sampler_logp)) if ro.sampler_logp is not None else None, take(ro.scores),
                   take(right(ro.logp)), take(right(ro.ref_logp)),
                   take(right(ro.values)) if ro.values is not None else None)


class RewardFunction:
    """Sequence scores for (prompt, response text): a reward-model artifact and/or a rule."""

    def __init__(self, model_path: str | None = None, rule: str | None = None, normalize: bool = True,
                 precision: str = "fp32", trust_remote_code: bool = False):
        from feedback.judges.rule import load_callable

        self.scorer = None
        if model_path:
            from reward.scoring import RewardScorer

            self.scorer = RewardScorer.from_artifact(model_path, precision=precision,
                                                     trust_remote_code=trust_remote_code)
            disable_dropout(self.scorer.model)
        self.rule = load_callable(rule) if rule else None
        self.normalize = normalize

    def __call__(self, prompts: list, responses: list[str]) -> torch.Tensor:
        total = torch.zeros(len(prompts))
        if self.scorer is not None:
            raw, norm = self.scorer.score(prompts, responses)
            total += torch.tensor(norm if self.normalize else raw)
        if self.rule is not None:
            total += torch.tensor([float(self.rule(p, r)) for p, r in zip(prompts, responses)])
        return total


def check_finite(step: int, **values) -> None:
    """Stop on a non-finite value; under several processes all of them stop together (one flag, reduced)."""
    from pipeline import distributed

    bad = None
    for name, v in values.items():
        t = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
        if not torch.isfinite(t).all():
            bad = f"{name} is not finite ({t.detach().flatten()[:4].tolist()})"
            break
    if distributed.any_rank(bad is not None) and bad is None:
        bad = "not finite on another process"
    if bad:
        raise InvalidInput(f"PPO step {step}: {bad}; stopping before anything is saved. Check the reward "
                           "function, lower optim.lr, or enable reward clipping.")


def ppo_step(models: PPOModels, optimizer, ro: Rollout, hp, kl_ctl, step: int) -> dict:
    """One PPO update on a scored rollout: KL-shaped rewards, GAE, then epochs of clipped updates.

    `ro` is the whole rollout (gather_rollout: every process holds all of it). `optimizer` is a LocalOptimizer or
    (DeepSpeed) an EngineOptimizer. Each minibatch is drawn in the same order on any number of processes and
    split evenly between them; each process cuts its share into micro-batches of similar response lengths. Every
    loss is the minibatch's token mean: a micro-batch backwards its masked token sum divided by the minibatch's
    token count, so the update does not depend on micro_batch_size, on sorting or on the number of processes.
    The statistics returned are token-weighted means over every micro-batch of the step, on every process.
    """
    from pipeline import distributed

    with torch.no_grad():
        kl = losses.kl_estimate(ro.logp, ro.ref_logp, hp.kl_estimator) * ro.mask
        rewards = losses.shape_rewards(ro.scores, kl, ro.mask, kl_ctl.value, clip=hp.reward_clip)
        adv, returns = losses.gae(rewards, ro.values, ro.mask, hp.gamma, hp.lam)
        if hp.whiten_advantages:
            adv = losses.masked_whiten(adv, ro.mask)
    B, rank, world = ro.response.shape[0], distributed.rank(), distributed.world_size()
    sums: dict[str, float] = {}  # token-weighted sums of the update's statistics (this process's micro-batches)
    tokens = 0.0
    per_minibatch: dict[str, list[float]] = {"lr": [], "grad_norm": []}
    models.train(True)  # every stochastic layer is off (disable_dropout): train mode changes nothing numerically
    g = torch.Generator().manual_seed(step)
    for _ in range(hp.epochs):
        order = torch.randperm(B, generator=g)
        for start in range(0, B, hp.minibatch_size):
            mb = order[start : start + hp.minibatch_size]
            n_tokens = ro.mask[mb].sum().clamp(min=1)  # the whole minibatch's response tokens, on every process
            share = mb[rank::world]
            optimizer.zero_grad()
            # micro-batches of similar response lengths (less padding); their gradients add up to the minibatch's
            share = share[torch.sort(ro.mask[share].sum(1).cpu(), stable=True).indices]
            bad_loss = None
            for i in range(0, len(share), hp.micro_batch_size):
                idx = share[i : i + hp.micro_batch_size]
                logp, ent, values = models.forward(ro, idx, entropy_grad=hp.entropy_coef > 0)
                m = ro.mask[idx]
                pg, pst = losses.policy_loss(logp, ro.logp[idx], adv[idx], m, hp.clip, hp.dual_clip, n_tokens)
                vl, vst = losses.value_loss(values, ro.values[idx], returns[idx], m, hp.value_clip, n_tokens)
                entropy = losses.token_mean(ent, m, n_tokens)
                loss = pg + hp.vf_coef * vl - hp.entropy_coef * entropy
                if bad_loss is None and not torch.isfinite(loss):
                    bad_loss = loss.detach()
                optimizer.backward(pg - hp.entropy_coef * entropy, hp.vf_coef * vl)
                k = float(m.sum())
                scale = float(n_tokens)  # the losses above are token sums over n_tokens: times n_tokens, the sums
                for name, v in {"policy_loss": pg.item() * scale, "value_loss": vl.item() * scale,
                                "entropy": entropy.item() * scale,
                                **{name: v * k for name, v in {**pst, **vst}.items()}}.items():
                    sums[name] = sums.get(name, 0.0) + v
                tokens += k
            per_minibatch["lr"].append(optimizer.lr)
            # one check per minibatch, before its update: the losses of its micro-batches and the gradient norm
            loss_check = {"loss": bad_loss if bad_loss is not None else torch.tensor(0.0)}
            per_minibatch["grad_norm"].append(optimizer.step(lambda **v: check_finite(step, **loss_check, **v)))
    models.train(False)
    names = sorted(sums)
    total = distributed.sum_over_ranks(torch.tensor([sums[n] for n in names] + [tokens], dtype=torch.float64))
    out = {f"ppo/{n}": (total[i] / total[-1].clamp(min=1)).item() for i, n in enumerate(names)}
    out.update({f"ppo/{k}": sum(v) / len(v) for k, v in per_minibatch.items()})
    scores = ro.scores
    out.update({
        "ppo/kl": kl.sum(1).mean().item(),
        "ppo/kl_coef": kl_ctl.value,
        "ppo/response_length": ro.mask.sum(1).mean().item(),
        "ppo/eos_rate": ro.eos.float().mean().item(),
        "ppo/explained_variance": losses.explained_variance(ro.values, returns, ro.mask),
        "ppo/advantage_mean": losses.masked_mean(adv, ro.mask).item(),
        "ppo/return_mean": losses.masked_mean(returns, ro.mask).item(),
        "ppo/reward_mean": scores.mean().item(),
        "ppo/reward_std": scores.std().item() if len(scores) > 1 else 0.0,
    })
    kl_ctl.update(out["ppo/kl"], len(scores))
    return out


def score_rollout(models: PPOModels, ro: Rollout, reward_fn: RewardFunction, missing_eos_penalty: float | None,
                  step: int, chunk: int | None = None) -> dict[str, float]:
    """Fill in scores, old log-probs, reference log-probs and values (no gradients, eval mode), the forwards in
    chunks of `chunk` sequences (None: all at once), which bounds their activation memory. Returns the seconds
    each part took (ppo/time/reward, ppo/time/old_logprobs_values, ppo/time/reference)."""
    t0 = time.perf_counter()
    scores = reward_fn(ro.prompts, ro.responses).to(models.device)
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~ro.eos).float()
    check_finite(step, reward=scores)
    t1 = time.perf_counter()
    models.train(False)
    n = ro.response.shape[0]
    # chunks of similar response lengths, so that each forward pads little (the results go back in place)
    order = torch.sort(ro.mask.sum(1), stable=True).indices.cpu()
    parts = [order[i : i + (chunk or n)] for i in range(0, n, chunk or n)]
    sampled = ro.sampler_logp is not None  # the sampler's own log-probs are the old ones (as in TRL 1.12)
    place = lambda outs: torch.cat(outs)[torch.argsort(order)]  # noqa: E731
    with torch.no_grad():
        own = [models.forward(ro, idx, entropy_grad=False, logprobs=not sampled) for idx in parts]
        t2 = time.perf_counter()
        ref = [models.forward(ro, idx, reference=True)[0] for idx in parts]
    ro.logp = ro.sampler_logp if sampled else place([o[0] for o in own])
    ro.values = place([o[2] for o in own]) if own[0][2] is not None else None
    ro.ref_logp = place(ref)
    ro.scores = scores
    return {"ppo/time/reward": t1 - t0, "ppo/time/old_logprobs_values": t2 - t1,
            "ppo/time/reference": time.perf_counter() - t2}


def evaluate(models: PPOModels, prompts: list, reward_fn: RewardFunction | None, rule=None, max_new_tokens: int = 32,
             seed: int = 0, batch_size: int = 64) -> dict:
    """Mean reward (and rule reward) of samples on held-out prompts (at the rollout temperature, each from its own
    seed: the same samples on any number of processes and in any batch), and the KL to the reference of the
    distribution they were sampled from. Training's random streams are not touched."""
    rewards, rules, kls, samples = [], [], [], []
    for i in range(0, len(prompts), batch_size):
        part = prompts[i : i + batch_size]
        ro = generate(models, part, max_new_tokens, seeds=row_seeds(seed, "eval", range(i, i + len(part))))
        with torch.no_grad():
            logp, _, _ = models.forward(ro, with_values=False)
            ref, _, _ = models.forward(ro, reference=True)
        kls += (losses.kl_estimate(logp, ref, "k1") * ro.mask).sum(1).tolist()
        if reward_fn is not None:
            rewards += reward_fn(ro.prompts, ro.responses).tolist()
        if rule is not None:
            rules += [float(rule(p, r)) for p, r in zip(ro.prompts, ro.responses)]
        samples += list(zip(ro.prompts, ro.responses))[:2]
    out = {"eval/kl": sum(kls) / len(kls)}
    if rewards:
        out["eval/reward_mean"] = sum(rewards) / len(rewards)
    if rules:
        out["eval/rule_reward_mean"] = sum(rules) / len(rules)
    return out | {"_samples": samples}


def cycle_batches(items: list, batch_size: int, seed: int):
    """Endless seeded epochs over `items`: (epoch, batch). The position is (epoch, index) for resume."""
    epoch = 0
    while True:
        g = torch.Generator().manual_seed(seed + epoch)
        order = torch.randperm(len(items), generator=g).tolist()
        for start in range(0, len(order) - batch_size + 1 if len(order) >= batch_size else 1, batch_size):
            yield epoch, [items[i] for i in order[start : start + batch_size]]
        epoch += 1


def save_state(path, models: PPOModels, optimizer, kl_ctl, step: int, extra: dict) -> None:
    """Everything needed to continue after `step`: weights and optimizer (optimizer.save), the RNG state of
    every process, the KL controller and the data position. Every process calls it."""
    import json

    from pipeline import distributed

    optimizer.save(path)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, path / f"rng-{distributed.rank()}.pt")
    if distributed.is_main():
        (path / "state.json").write_text(json.dumps({"step": step, "kl_controller": kl_ctl.state_dict(), **extra}))


def load_state(path, models: PPOModels, optimizer, kl_ctl) -> dict:
    """Restore save_state's files (torch.load only with weights_only=True)."""
    import json

    from pipeline import distributed

    optimizer.load(path)
    rng = path / f"rng-{distributed.rank()}.pt"
    if not rng.exists():
        raise InvalidInput(f"{path}: no {rng.name}; the checkpoint was written by another number of processes")
    states = torch.load(rng, weights_only=True)
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
    state = json.loads((path / "state.json").read_text())
    kl_ctl.load_state_dict(state["kl_controller"])
    return state


def kl_ceiling_message(step: int, kl: float, ceiling: float) -> str:
    return (f"PPO step {step}: KL to the reference is {kl:.3f}, above kl.ceiling {ceiling}: the policy has moved far "
            "from where it started, which usually means reward hacking or a learning rate that is too high. "
            "Lower optim.lr, raise kl.coef, or enable kl.adaptive.")
