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

Everything the rollout does not train runs under torch.no_grad() in eval mode. A non-finite
loss, gradient norm or reward stops the loop with the step named, before anything is saved.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from pipeline.errors import InvalidInput
from pipeline.generation import chat_ids, left_pad, sampling_kwargs
from pipeline.rl import functional as F


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
    scores: torch.Tensor | None = None
    logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    values: torch.Tensor | None = None


def position_ids(mask: torch.Tensor) -> torch.Tensor:
    return (mask.cumsum(-1) - 1).clamp(min=0)


class PPOModels:
    """Policy (+ value head or critic) and the reference, with one forward that returns what PPO needs."""

    def __init__(self, policy, tokenizer, value_model: str = "head", critic=None, lora: bool = False):
        self.policy, self.tok, self.lora = policy, tokenizer, lora
        self.reference = None if lora else copy.deepcopy(policy).eval().requires_grad_(False)
        self.critic = critic
        hidden = policy.config.hidden_size if hasattr(policy, "config") else policy.base_model.config.hidden_size
        self.value_head = ValueHead(hidden) if value_model == "head" else None

    def trainable_parameters(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if self.value_head is not None:
            params += list(self.value_head.parameters())
        if self.critic is not None:
            params += [p for p in self.critic.parameters() if p.requires_grad]
        return params

    def train(self, mode: bool = True) -> None:
        for m in (self.policy, self.value_head, self.critic):
            if m is not None:
                m.train(mode)

    def forward(self, ro: Rollout, idx=None, with_values: bool = True, reference: bool = False):
        """Log-probs of the response tokens [B, R], entropies [B, R], values [B, R] (or None)."""
        q, qm, r, m = ro.query, ro.query_mask, ro.response, ro.mask
        if idx is not None:
            q, qm, r, m = q[idx], qm[idx], r[idx], m[idx]
        ids = torch.cat([q, r], 1)
        att = torch.cat([qm, m.long()], 1)
        pos = position_ids(att)
        P = q.shape[1]
        if reference:
            if self.lora:
                with self.policy.disable_adapter():
                    out = self.policy(input_ids=ids, attention_mask=att, position_ids=pos)
            else:
                out = self.reference(input_ids=ids, attention_mask=att, position_ids=pos)
            logits = out.logits[:, P - 1 : -1]
            return F.logprobs_from_logits(logits, r), None, None
        out = self.policy(input_ids=ids, attention_mask=att, position_ids=pos,
                          output_hidden_states=with_values and self.value_head is not None)
        logits = out.logits[:, P - 1 : -1]
        logp = F.logprobs_from_logits(logits, r)
        ent = F.entropy_from_logits(logits)
        values = None
        if with_values:
            if self.value_head is not None:
                values = self.value_head(out.hidden_states[-1][:, P - 1 : -1].float())
            else:
                backbone = self.critic.base_model if hasattr(self.critic, "base_model") else self.critic.model
                h = backbone(input_ids=ids, attention_mask=att, position_ids=pos).last_hidden_state
                values = self.critic.score(h[:, P - 1 : -1]).squeeze(-1).float()
        return logp, ent, values


def generate(models: PPOModels, prompts: list, temperature: float, top_p: float, max_new_tokens: int) -> Rollout:
    tok = models.tok
    query, qmask = left_pad([chat_ids(tok, p) for p in prompts], tok.pad_token_id)
    models.policy.eval()
    with torch.no_grad():
        out = models.policy.generate(input_ids=query, attention_mask=qmask, max_new_tokens=max_new_tokens,
                                     pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                     **sampling_kwargs(temperature, top_p))
    response = out[:, query.shape[1]:]
    is_eos = response == tok.eos_token_id
    # keep everything up to and including the first EOS
    after = (is_eos.cumsum(1) - is_eos.long()) > 0
    mask = (~after).float()
    if response.shape[1] == 0:
        raise InvalidInput("the policy generated no tokens (max_new_tokens is 0?)")
    response = response.masked_fill(after, tok.pad_token_id)
    eos = is_eos.any(1)
    texts = tok.batch_decode(response, skip_special_tokens=True)
    return Rollout(prompts, [t.strip() for t in texts], query, qmask, response, mask, eos)


class RewardFunction:
    """Sequence scores for (prompt, response text): a reward-model artifact and/or a rule."""

    def __init__(self, model_path: str | None = None, rule: str | None = None, normalize: bool = True):
        from feedback.judges.rule import load_callable

        self.scorer = None
        if model_path:
            from reward.scoring import RewardScorer

            self.scorer = RewardScorer.from_artifact(model_path)
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
    for name, v in values.items():
        t = v if isinstance(v, torch.Tensor) else torch.tensor(float(v))
        if not torch.isfinite(t).all():
            raise InvalidInput(f"PPO step {step}: {name} is not finite ({t.flatten()[:4].tolist()}); stopping "
                               "before anything is saved. Check the reward function, lower optim.lr, or enable "
                               "reward clipping.")


def ppo_step(models: PPOModels, optimizer, ro: Rollout, hp, kl_ctl, step: int, max_grad_norm: float) -> dict:
    """One PPO update on a scored rollout: KL-shaped rewards, GAE, then epochs of clipped updates."""
    with torch.no_grad():
        kl = F.kl_estimate(ro.logp, ro.ref_logp, hp.kl_estimator) * ro.mask
        rewards = F.shape_rewards(ro.scores, kl, ro.mask, kl_ctl.value, clip=hp.reward_clip)
        adv, returns = F.gae(rewards, ro.values, ro.mask, hp.gamma, hp.lam)
        if hp.whiten_advantages:
            adv = F.masked_whiten(adv, ro.mask)
    B = ro.response.shape[0]
    stats: dict[str, list[float]] = {}
    models.train(True)
    g = torch.Generator().manual_seed(step)
    for _ in range(hp.epochs):
        order = torch.randperm(B, generator=g)
        for start in range(0, B, hp.minibatch_size):
            mb = order[start : start + hp.minibatch_size]
            optimizer.zero_grad(set_to_none=True)
            micro = [mb[i : i + hp.micro_batch_size] for i in range(0, len(mb), hp.micro_batch_size)]
            for idx in micro:
                logp, ent, values = models.forward(ro, idx)
                m = ro.mask[idx]
                pg, pst = F.policy_loss(logp, ro.logp[idx], adv[idx], m, hp.clip, hp.dual_clip)
                vl, vst = F.value_loss(values, ro.values[idx], returns[idx], m, hp.value_clip)
                entropy = F.masked_mean(ent, m)
                loss = pg + hp.vf_coef * vl - hp.entropy_coef * entropy
                check_finite(step, loss=loss)
                (loss * len(idx) / len(mb)).backward()
                for k, v in {"policy_loss": pg.item(), "value_loss": vl.item(), "entropy": entropy.item(),
                             **pst, **vst}.items():
                    stats.setdefault(k, []).append(v)
            gn = torch.nn.utils.clip_grad_norm_(models.trainable_parameters(), max_grad_norm)
            check_finite(step, grad_norm=gn)
            stats.setdefault("grad_norm", []).append(gn.item())
            optimizer.step()
    models.train(False)
    seq_kl = kl.sum(1)
    out = {f"ppo/{k}": sum(v) / len(v) for k, v in stats.items()}
    out.update({
        "ppo/reward_mean": ro.scores.mean().item(),
        "ppo/reward_std": ro.scores.std().item() if B > 1 else 0.0,
        "ppo/kl": seq_kl.mean().item(),
        "ppo/kl_coef": kl_ctl.value,
        "ppo/response_length": ro.mask.sum(1).mean().item(),
        "ppo/eos_rate": ro.eos.float().mean().item(),
        "ppo/explained_variance": F.explained_variance(ro.values, returns, ro.mask),
        "ppo/advantage_mean": F.masked_mean(adv, ro.mask).item(),
        "ppo/return_mean": F.masked_mean(returns, ro.mask).item(),
    })
    kl_ctl.update(out["ppo/kl"], B)
    return out


def score_rollout(models: PPOModels, ro: Rollout, reward_fn: RewardFunction, missing_eos_penalty: float | None,
                  step: int) -> None:
    """Fill in scores, old log-probs, reference log-probs and values (no gradients, eval mode)."""
    scores = reward_fn(ro.prompts, ro.responses)
    if missing_eos_penalty is not None:
        scores = scores - missing_eos_penalty * (~ro.eos).float()
    check_finite(step, reward=scores)
    models.train(False)
    with torch.no_grad():
        ro.logp, _, ro.values = models.forward(ro)
        ro.ref_logp, _, _ = models.forward(ro, reference=True)
    ro.scores = scores


def evaluate(models: PPOModels, prompts: list, reward_fn: RewardFunction | None, rule=None, temperature: float = 1.0,
             top_p: float = 1.0, max_new_tokens: int = 32, seed: int = 0, batch_size: int = 64) -> dict:
    """Mean reward (and rule reward) of samples on held-out prompts, and the KL to the reference."""
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    rewards, rules, kls, samples = [], [], [], []
    for i in range(0, len(prompts), batch_size):
        ro = generate(models, prompts[i : i + batch_size], temperature, top_p, max_new_tokens)
        with torch.no_grad():
            logp, _, _ = models.forward(ro, with_values=False)
            ref, _, _ = models.forward(ro, reference=True)
        kls += (F.kl_estimate(logp, ref, "k1") * ro.mask).sum(1).tolist()
        if reward_fn is not None:
            rewards += reward_fn(ro.prompts, ro.responses).tolist()
        if rule is not None:
            rules += [float(rule(p, r)) for p, r in zip(ro.prompts, ro.responses)]
        samples += list(zip(ro.prompts, ro.responses))[:2]
    torch.set_rng_state(state)
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
    """Everything needed to continue after `step`: weights (safetensors), optimizer, RNG, KL controller."""
    import json

    from safetensors.torch import save_model

    save_model(models.policy, str(path / "policy.safetensors"))
    if models.value_head is not None:
        save_model(models.value_head, str(path / "value_head.safetensors"))
    if models.critic is not None:
        save_model(models.critic, str(path / "critic.safetensors"))
    torch.save(optimizer.state_dict(), path / "optimizer.pt")
    torch.save({"torch": torch.get_rng_state()}, path / "rng.pt")
    (path / "state.json").write_text(json.dumps({"step": step, "kl_controller": kl_ctl.state_dict(), **extra}))


def load_state(path, models: PPOModels, optimizer, kl_ctl) -> dict:
    """Restore save_state's files (torch.load only with weights_only=True)."""
    import json

    from safetensors.torch import load_model

    load_model(models.policy, str(path / "policy.safetensors"))
    if models.value_head is not None:
        load_model(models.value_head, str(path / "value_head.safetensors"))
    if models.critic is not None:
        load_model(models.critic, str(path / "critic.safetensors"))
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    torch.set_rng_state(torch.load(path / "rng.pt", weights_only=True)["torch"])
    state = json.loads((path / "state.json").read_text())
    kl_ctl.load_state_dict(state["kl_controller"])
    return state


def kl_ceiling_message(step: int, kl: float, ceiling: float) -> str:
    return (f"PPO step {step}: KL to the reference is {kl:.3f}, above kl.ceiling {ceiling}: the policy has moved far "
            "from where it started, which usually means reward hacking or a learning rate that is too high. "
            "Lower optim.lr, raise kl.coef, or enable kl.adaptive.")


def is_finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)
