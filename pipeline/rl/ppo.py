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

The training forward scores exactly the distribution the rollout was sampled from: logits are
divided by the sampling temperature everywhere log-probabilities are taken (old, new, reference,
KL, held-out KL), sampling uses an explicit GenerationConfig (nothing from the model's
generation_config.json), and dropout is off in every model for the whole stage, so that before
the first update the importance ratio is exactly 1 (TRL's and OpenRLHF's PPO do the same).

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


def disable_dropout(model: nn.Module) -> None:
    """Dropout off for good (not only in eval mode): every nn.Dropout (LoRA's lora_dropout included) and the
    float dropout rates attention modules read in training mode (e.g. Llama's attention_dropout)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for name, value in vars(m).items():
            if "dropout" in name and isinstance(value, float):
                setattr(m, name, 0.0)


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


def split_lm(model):
    """(backbone, LM head) of a causal LM, through a peft wrapper. Calling them apart lets PPO take the last
    hidden state alone (not every layer's, as output_hidden_states would keep) and run the vocabulary projection
    only on the response positions (not on every prompt token): the [batch, length, vocabulary] logits are
    most of a forward's memory."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.get_decoder(), base.get_output_embeddings()


def response_logits(model, input_ids, attention_mask, position_ids, start: int):
    """(logits predicting the tokens from position `start` on, the last hidden states there)."""
    backbone, head = split_lm(model)
    h = backbone(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    h = h[:, start - 1 : -1]
    return head(h), h


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
            backbone, _ = split_lm(self.policy)
            h = backbone(input_ids=input_ids, attention_mask=attention_mask,
                         position_ids=position_ids).last_hidden_state[:, start - 1 : -1]
            out = None
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
        for m in (policy, critic, reference):
            if m is not None:
                disable_dropout(m)
        if lora:
            self.reference = None
        else:
            self.reference = reference if reference is not None else copy.deepcopy(policy)
            self.reference.eval().requires_grad_(False)
        cfg = policy.config if hasattr(policy, "config") else policy.base_model.config
        dtype = next(policy.parameters()).dtype  # one dtype per engine (DeepSpeed flattens them together)
        head = ValueHead(cfg.hidden_size).to(dtype) if value_model == "head" else None
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
        params = [p for p in self.actor_module.parameters() if p.requires_grad]
        if self.critic_module is not None:
            params += [p for p in self.critic_module.parameters() if p.requires_grad]
        return params

    def train(self, mode: bool = True) -> None:
        for m in (self.actor_module, self.critic_module):
            if m is not None:
                m.train(mode)

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

    def backward(self, policy_loss: torch.Tensor, value_loss: torch.Tensor, weight: float) -> None:
        ((policy_loss + value_loss) * weight).backward()

    def step(self, check) -> float:
        gn = torch.nn.utils.clip_grad_norm_(self.models.trainable_parameters(), self.max_grad_norm)
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


class SampledLogprobs:
    """A logits processor that records, for each sampled token, its log-probability under the distribution the
    sampler drew it from (logits / temperature; PPO samples with nothing else applied). It keeps one row of
    logits per sequence, where `output_scores` would keep all of them ([batch, new tokens, vocabulary]). TRL
    1.12's PPO takes its old log-probs from the sampler's logits in the same way; call `finish` with the last
    sampled tokens afterwards. Transformers applies user processors before its temperature warper: the
    temperature is applied here."""

    def __init__(self, temperature: float):
        self.temperature, self.rows, self.out = temperature, None, []

    def _collect(self, tokens: torch.Tensor) -> None:
        if self.rows is not None:
            logits, lse = self.rows
            self.out.append(logits.gather(1, tokens[:, None].to(logits.device)).squeeze(1) - lse)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self._collect(input_ids[:, -1])  # the token sampled from the previous row
        logits = scores.float() / self.temperature
        self.rows = (logits, torch.logsumexp(logits, -1))
        return scores

    def finish(self, last: torch.Tensor) -> torch.Tensor:
        self._collect(last)
        return torch.stack(self.out, 1)


def generate(models: PPOModels, prompts: list, max_new_tokens: int, keep_scores: bool = False) -> Rollout:
    """Sample one response per prompt at the models' temperature (pure sampling: no top-k, top-p or penalties,
    whatever the model's generation_config.json says). keep_scores: also keep the sampler's own log-probs
    (ro.sampler_logp, masked after each response's end), which PPO uses as its old log-probs."""
    from transformers import LogitsProcessorList

    tok = models.tok
    query, qmask = left_pad([chat_ids(tok, p) for p in prompts], tok.pad_token_id)
    query, qmask = query.to(models.device), qmask.to(models.device)
    config = generation_config(tok, max_new_tokens, models.temperature, 1.0, return_dict_in_generate=True)
    recorder = SampledLogprobs(models.temperature) if keep_scores else None
    extra = {"logits_processor": LogitsProcessorList([recorder])} if recorder else {}
    models.train(False)
    with torch.no_grad(), models.generation() as policy:
        out = generate_with(policy, config, query, qmask, synced_gpus=models.sync_generation, **extra)
    response = out.sequences[:, query.shape[1]:]
    is_eos = response == tok.eos_token_id
    # keep everything up to and including the first EOS
    after = (is_eos.cumsum(1) - is_eos.long()) > 0
    mask = (~after).float()
    if response.shape[1] == 0:
        raise InvalidInput("the policy generated no tokens (max_new_tokens is 0?)")
    response = response.masked_fill(after, tok.pad_token_id)
    eos = is_eos.any(1)
    texts = tok.batch_decode(response, skip_special_tokens=True)
    ro = Rollout(prompts, [t.strip() for t in texts], query, qmask, response, mask, eos)
    if recorder is not None:
        ro.sampler_logp = recorder.finish(out.sequences[:, -1])[:, : response.shape[1]] * mask
    return ro


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

    `optimizer` is a LocalOptimizer or (DeepSpeed) an EngineOptimizer. Under several processes
    each holds its share of the rollout; the metrics returned are means over all of them.
    """
    from pipeline import distributed

    with torch.no_grad():
        kl = losses.kl_estimate(ro.logp, ro.ref_logp, hp.kl_estimator) * ro.mask
        rewards = losses.shape_rewards(ro.scores, kl, ro.mask, kl_ctl.value, clip=hp.reward_clip)
        adv, returns = losses.gae(rewards, ro.values, ro.mask, hp.gamma, hp.lam)
        if hp.whiten_advantages:
            adv = losses.masked_whiten(adv, ro.mask)
    B = ro.response.shape[0]
    stats: dict[str, list[float]] = {}
    models.train(True)  # dropout is off in every model (disable_dropout): train mode changes nothing numerically
    g = torch.Generator().manual_seed(step)
    for _ in range(hp.epochs):
        order = torch.randperm(B, generator=g)
        for start in range(0, B, hp.minibatch_size):
            mb = order[start : start + hp.minibatch_size]
            optimizer.zero_grad()
            # micro-batches of similar response lengths (less padding); the minibatch's gradient is their sum
            mb = mb[torch.sort(ro.mask[mb].sum(1).cpu(), stable=True).indices]
            micro = [mb[i : i + hp.micro_batch_size] for i in range(0, len(mb), hp.micro_batch_size)]
            bad_loss = None
            for idx in micro:
                logp, ent, values = models.forward(ro, idx, entropy_grad=hp.entropy_coef > 0)
                m = ro.mask[idx]
                pg, pst = losses.policy_loss(logp, ro.logp[idx], adv[idx], m, hp.clip, hp.dual_clip)
                vl, vst = losses.value_loss(values, ro.values[idx], returns[idx], m, hp.value_clip)
                entropy = losses.masked_mean(ent, m)
                loss = pg + hp.vf_coef * vl - hp.entropy_coef * entropy
                if bad_loss is None and not torch.isfinite(loss):
                    bad_loss = loss.detach()
                optimizer.backward(pg - hp.entropy_coef * entropy, hp.vf_coef * vl, len(idx) / len(mb))
                for k, v in {"policy_loss": pg.item(), "value_loss": vl.item(), "entropy": entropy.item(),
                             **pst, **vst}.items():
                    stats.setdefault(k, []).append(v)
            stats.setdefault("lr", []).append(optimizer.lr)
            # one check per minibatch, before its update: the losses of its micro-batches and the gradient norm
            loss_check = {"loss": bad_loss if bad_loss is not None else torch.tensor(0.0)}
            stats.setdefault("grad_norm", []).append(optimizer.step(lambda **v: check_finite(step, **loss_check, **v)))
    models.train(False)
    out = {f"ppo/{k}": sum(v) / len(v) for k, v in stats.items()}
    out.update({
        "ppo/kl": kl.sum(1).mean().item(),
        "ppo/kl_coef": kl_ctl.value,
        "ppo/response_length": ro.mask.sum(1).mean().item(),
        "ppo/eos_rate": ro.eos.float().mean().item(),
        "ppo/explained_variance": losses.explained_variance(ro.values, returns, ro.mask),
        "ppo/advantage_mean": losses.masked_mean(adv, ro.mask).item(),
        "ppo/return_mean": losses.masked_mean(returns, ro.mask).item(),
    })
    out = distributed.mean_over_ranks(out)  # every process holds the same share: means of means are means
    scores = distributed.gather(ro.scores)
    out["ppo/reward_mean"] = scores.mean().item()
    out["ppo/reward_std"] = scores.std().item() if len(scores) > 1 else 0.0
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
    """Mean reward (and rule reward) of samples on held-out prompts (at the rollout temperature), and the KL to
    the reference of the distribution they were sampled from."""
    rewards, rules, kls, samples = [], [], [], []
    dev = models.device
    gpus = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=gpus):  # a fixed seed here; training's RNG stream is left as it was
        torch.manual_seed(seed)
        for i in range(0, len(prompts), batch_size):
            ro = generate(models, prompts[i : i + batch_size], max_new_tokens)
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
