"""PPO's maths as pure functions on tensors (import it as `losses`: `F` stays torch.nn.functional). Each is
unit-tested against numbers worked by hand (tests/unit/test_rl_losses.py).

Shapes: B sequences x T response tokens, right-padded; `mask` is 1 on real response tokens.

Where each piece comes from:
- clipped surrogate: Schulman et al. 2017, "Proximal Policy Optimization Algorithms", arXiv:1707.06347, eq. 7
  (L^CLIP); the objective with a value loss and an entropy bonus is its eq. 9;
- dual clip: Ye et al. 2020, "Mastering Complex Control in MOBA Games with Deep Reinforcement Learning",
  arXiv:1912.09729 (a second bound, c * |A|, on the loss of negative advantages);
- value clipping: OpenAI baselines' ppo2, discussed in Engstrom et al. 2020, "Implementation Matters in Deep
  Policy Gradients", arXiv:2005.12729;
- GAE: Schulman et al. 2016, "High-Dimensional Continuous Control Using Generalized Advantage Estimation",
  arXiv:1506.02438, eq. 16 (A = sum_l (gamma lambda)^l delta_{t+l}, computed backwards as a recursion);
- KL-shaped reward, r = score - beta * KL per token: Ziegler et al. 2019, "Fine-Tuning Language Models from
  Human Preferences", arXiv:1909.08593, §2 (and Stiennon et al. 2020, arXiv:2009.01325, eq. 2); its adaptive
  beta controller: Ziegler et al. 2019, §2.2;
- the k1 / k2 / k3 KL estimators: J. Schulman, "Approximating KL Divergence" (2020), joschu.net/blog/kl-approx.html;
- the implementation details shared with TRL 1.12 and OpenRLHF (EOS kept in the response mask, whitened
  advantages, the score on the last token): Huang et al. 2024, "The N+ Implementation Details of RLHF with PPO",
  arXiv:2403.17031.

Loss aggregation: a loss is a token mean over the whole minibatch, however the minibatch is split into
micro-batches and processes. The losses below take `num_tokens`, the minibatch's response-token count over all
its micro-batches and all processes; each micro-batch returns its masked sum divided by that count, so the
micro-batches' gradients add up to the gradient of the minibatch's token mean (pipeline/rl/ppo.py undoes
DeepSpeed's division by the accumulation steps and its mean over processes). Without `num_tokens` they are plain
masked means.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rlhf.batching import logprobs_from_logits  # noqa: F401  (the same maths everywhere a token is scored)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """H = logsumexp(z) - sum softmax(z) * z, per position."""
    logits = logits.float()
    p = F.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


def response_mask(response: torch.Tensor, eos_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mask, ended): mask is 1 on every sampled token up to and including the first EOS and 0 after it (the EOS is
    part of the response: its probability is what the policy learns to end with); ended [B] is True where the
    response holds an EOS. E.g. with EOS = 2: [[5, 2, 7], [5, 6, 7]] -> [[1, 1, 0], [1, 1, 1]], [True, False]."""
    is_eos = response == eos_token_id
    after_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0  # an EOS strictly before this position
    return (~after_eos).float(), is_eos.any(1)


def token_mean(x: torch.Tensor, mask: torch.Tensor, num_tokens: float | torch.Tensor | None = None) -> torch.Tensor:
    """sum(x * mask) / num_tokens: with `num_tokens` the token count of a whole minibatch (all micro-batches, all
    processes), a micro-batch's share of the minibatch's token mean; without it, the masked mean."""
    if num_tokens is None:
        return masked_mean(x, mask)
    return (x * mask.to(x.dtype)).sum() / num_tokens


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    n = mask.sum()
    if unbiased and n > 1:
        var = var * n / (n - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the masked entries; padded entries become 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token estimators of KL(policy || reference) from samples of the policy (Schulman, 2020, "Approximating
    KL Divergence").

    With r = ref_logp - logp:  k1 = -r;  k2 = r^2 / 2;  k3 = exp(r) - 1 - r  (unbiased, always >= 0).
    """
    r = ref_logp - logp
    if estimator == "k1":
        return -r
    if estimator == "k2":
        return 0.5 * r**2
    if estimator == "k3":
        return torch.expm1(r) - r
    raise ValueError(f"unknown KL estimator {estimator!r}")


def shape_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef: float,
                  clip: float | None = None) -> torch.Tensor:
    """Per-token rewards: -kl_coef * kl on every response token, plus the sequence score on the last one
    (Ziegler et al. 2019, §2; Stiennon et al. 2020, eq. 2: R = r - beta * log(pi / pi_ref)).

    scores [B] (already normalised/clipped here if `clip`), kl [B, T], mask [B, T] -> [B, T].
    """
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    rewards = -kl_coef * kl * mask
    last = mask.sum(1).long().clamp(min=1) - 1  # index of each sequence's last response token
    rewards[torch.arange(rewards.shape[0]), last] += scores.to(rewards.dtype)
    return rewards


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over right-padded responses (Schulman et al. 2016, eq. 16, as a backward
    recursion).

    delta_t = r_t + gamma * V_{t+1} - V_t, with V after the last real token = 0;
    A_t = delta_t + gamma * lam * A_{t+1}; returns = A + V. Padded positions get 0.
    """
    mask = mask.to(values.dtype)
    values, rewards = values * mask, rewards * mask
    T = rewards.shape[1]
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        adv[:, t] = a * m
        # carry only through real tokens: past the end, the next value and advantage are zero
        next_value = values[:, t] * m
        next_adv = a * m
    return adv, (adv + values) * mask


def policy_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                clip: float = 0.2, dual_clip: float | None = None,
                num_tokens: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """Clipped surrogate (PPO eq. 7, negated to a loss): -min(ratio * A, clip(ratio, 1-eps, 1+eps) * A), averaged
    over tokens (token_mean: over `num_tokens` when given).

    With dual_clip c > 1, for A < 0 the loss is also capped at -c * A (Ye et al., 2020).
    Also returns this micro-batch's masked means of the clip fraction, approx KL (mean of (ratio - 1) - log ratio,
    the k3 estimator) and the ratio.
    """
    log_ratio = (logp - old_logp) * mask
    ratio = torch.exp(log_ratio)
    loss1 = -advantages * ratio
    loss2 = -advantages * ratio.clamp(1 - clip, 1 + clip)
    loss = torch.max(loss1, loss2)
    if dual_clip is not None:
        loss = torch.where(advantages < 0, torch.min(loss, -dual_clip * advantages), loss)
    stats = {
        "clipfrac": masked_mean((loss2 > loss1).float(), mask).item(),
        "approx_kl": masked_mean(ratio - 1 - log_ratio, mask).item(),
        "ratio_mean": masked_mean(ratio, mask).item(),
    }
    return token_mean(loss, mask, num_tokens), stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None = 0.2, num_tokens: float | torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """0.5 * max((V - R)^2, (clip(V, V_old +- eps) - R)^2), averaged over tokens (token_mean: over `num_tokens`
    when given)."""
    loss = (values - returns) ** 2
    clipfrac = 0.0
    if clip is not None:
        clipped = old_values + (values - old_values).clamp(-clip, clip)
        loss_c = (clipped - returns) ** 2
        clipfrac = masked_mean((loss_c > loss).float(), mask).item()
        loss = torch.max(loss, loss_c)
    return 0.5 * token_mean(loss, mask, num_tokens), {"vf_clipfrac": clipfrac}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> float:
    """1 - Var(R - V) / Var(R): 1 is a perfect critic, 0 no better than the mean."""
    var_r = masked_var(returns, mask)
    return (1 - masked_var(returns - values, mask) / var_r).item() if var_r > 0 else float("nan")


class FixedKLController:
    def __init__(self, coef: float):
        self.value = coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"value": self.value}

    def load_state_dict(self, d: dict) -> None:
        self.value = d["value"]


class AdaptiveKLController:
    """Ziegler et al. (2019): beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n_steps / horizon."""

    def __init__(self, coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = max(-0.2, min(0.2, current_kl / self.target - 1))
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict) -> None:
        self.value, self.target, self.horizon = d["value"], d["target"], d["horizon"]
