"""PPO's models: the policy (and its value head) as one trained module, a critic read at every token, the reference,
and one forward that returns what PPO needs (log-probs under the sampling distribution, entropies, values).

- policy: trained (full, or LoRA adapters);
- reference: with LoRA, the same weights with the adapter disabled (no second copy); otherwise a frozen copy;
- value: a linear head on the policy's last hidden state (`value_model: head`), or a critic initialised from the
  reward model (`critic`: its backbone and score head, read at every token; it must share the policy's tokenizer).

Log-probabilities come from the model's own output logits (its soft-capping or scaling included: Gemma 2, Granite,
Cohere) divided by the sampling temperature wherever they are taken (old, new, reference, KL, held-out KL), and every
stochastic layer (dropout, layerdrop, drop-path, router jitter) is off in every model for the whole stage, checked at
start-up, so that before the first update the importance ratio is exactly 1 (TRL's and OpenRLHF's PPO do the same).
How the trained modules run (one process, data parallel, DeepSpeed) is the strategy's (pipeline/strategy.py):
`PPOModels.prepare(strategy, optim)`.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn as nn

from rlhf.batching import keeps_logits, position_ids
from rlhf.errors import InvalidInput
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
                    **({"logits_to_keep": keep} if keeps_logits(base) else {}))
    finally:
        hook.remove()
    logits, h = out.logits[:, -keep:-1], seen["h"][:, -keep:-1]
    return logits, h


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

    `actor` and `critic` are what the forward calls: the modules themselves until `prepare(strategy, optim)` hands
    them to a strategy (pipeline/strategy.py), then what it returns (DeepSpeed engines, for one); `generation()`
    hands out the policy for sampling (ZeRO-3: its shards gathered).
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
        self.head_width = _base(policy).get_output_embeddings().in_features
        head = ValueHead(self.head_width).to(dtype) if value_model == "head" else None
        self.actor_module = Actor(policy, head)
        self.critic_module = Critic(critic, *critic_scale) if critic is not None else None
        self.actor, self.critic = self.actor_module, self.critic_module
        self.strategy = None
        self.device = next(policy.parameters()).device  # where rollouts live (the trained models' device)

    def prepare(self, strategy, optim) -> None:
        """The trained models (the policy with its value head; a critic) to `strategy`, each optimised by `optim`
        (pipeline.strategy.Optim); the forward calls what the strategy returns from now on."""
        self.strategy = strategy
        self.actor, self.critic = strategy.prepare({"actor": self.actor_module, "critic": self.critic_module}, optim)
        self.device = strategy.device

    @contextlib.contextmanager
    def generation(self):
        """The policy to sample from: under ZeRO-3 (gather) every shard gathered on every process while it samples."""
        if self.strategy is None:
            yield self.policy
            return
        with self.strategy.whole(self.actor):
            yield self.policy

    @property
    def sync_generation(self) -> bool:
        """Sampling on ZeRO-3 shards: every process runs generate's steps together (synced_gpus)."""
        return bool(self.strategy is not None and self.strategy.sync_generation)

    def losses(self, policy_loss: torch.Tensor, value_loss: torch.Tensor) -> dict:
        """Each trained model's loss: the value loss trains the critic, or the value head with the policy."""
        if self.critic_module is None:
            return {"actor": policy_loss + value_loss}
        return {"actor": policy_loss, "critic": value_loss}

    @property
    def policy(self):
        return self.actor_module.policy

    @property
    def value_head(self):
        return self.actor_module.value_head

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
