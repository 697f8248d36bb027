"""The PPO update on a scored rollout, held-out evaluation, and the loop's resumable state.

    stats = ppo_step(models, strategy, ro, hp, kl_ctl, step)   # KL-shaped rewards, GAE, epochs of clipped updates
    held_out = evaluate(models, prompts, reward_fn, rule, max_new_tokens, seed)

The same training at any micro-batch size and process count:
- each response is sampled from its own random stream, seeded by (seed, step, its place in the step's batch)
  (rollout.RowSampler), so the rollout does not depend on how the prompts are split over processes;
- once scored, every process holds the whole rollout (rollout.gather_rollout); each minibatch is drawn from it in
  the same order on every process and split evenly between them;
- each loss is a token mean over the whole minibatch: every micro-batch backwards its masked sum divided by the
  minibatch's token count (losses.token_mean), and the strategy adds the micro-batches' and processes' gradients
  up (pipeline/strategy.py). Logged statistics are token-weighted the same way. One process with micro_batch_size
  1, 8 or the whole minibatch, and N processes, give the same update to float precision.

Everything the rollout does not train runs under torch.no_grad() in eval mode. A non-finite loss, gradient norm or
reward stops the loop with the step named, before the update is applied and before anything is saved.
"""

from __future__ import annotations

import torch

from pipeline import distributed
from rlhf.errors import InvalidInput
from pipeline.rl import losses
from pipeline.rl.rollout import check_finite, generate, row_seeds  # noqa: F401  (check_finite: the loop's)


def ppo_step(models, strategy, ro, hp, kl_ctl, step: int) -> dict:
    """One PPO update on a scored rollout: KL-shaped rewards, GAE, then epochs of clipped updates.

    `models` are PPOModels prepared with `strategy` (pipeline/strategy.py); `ro` is the whole rollout
    (gather_rollout: every process holds all of it). Each minibatch is drawn in the same order on any number of processes and
    split evenly between them; each process cuts its share into micro-batches of similar response lengths. Every
    loss is the minibatch's token mean: a micro-batch backwards its masked token sum divided by the minibatch's
    token count, so the update does not depend on micro_batch_size, on sorting or on the number of processes.
    The statistics returned are token-weighted means over every micro-batch of the step, on every process.
    """
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
            strategy.zero_grad()
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
                strategy.backward(models.losses(pg - hp.entropy_coef * entropy, hp.vf_coef * vl))
                k = float(m.sum())
                scale = float(n_tokens)  # the losses above are token sums over n_tokens: times n_tokens, the sums
                for name, v in {"policy_loss": pg.item() * scale, "value_loss": vl.item() * scale,
                                "entropy": entropy.item() * scale,
                                **{name: v * k for name, v in {**pst, **vst}.items()}}.items():
                    sums[name] = sums.get(name, 0.0) + v
                tokens += k
            per_minibatch["lr"].append(strategy.lr)
            # one check per minibatch, before its update: the losses of its micro-batches and the gradient norm
            loss_check = {"loss": bad_loss if bad_loss is not None else torch.tensor(0.0)}
            per_minibatch["grad_norm"].append(strategy.step(lambda **v: check_finite(step, **loss_check, **v)))
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


def evaluate(models, prompts: list, reward_fn, rule=None, max_new_tokens: int = 32,
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


def save_state(path, strategy, kl_ctl, step: int, extra: dict) -> None:
    """Everything needed to continue after `step`: weights, optimizer and schedule states (strategy.save), the RNG
    state of every process, the KL controller and the data position. Every process calls it."""
    import json

    strategy.save(path)
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state()
    torch.save(rng, path / f"rng-{distributed.rank()}.pt")
    if distributed.is_main():
        (path / "state.json").write_text(json.dumps({"step": step, "kl_controller": kl_ctl.state_dict(), **extra}))


def load_state(path, strategy, kl_ctl) -> dict:
    """Restore save_state's files (torch.load only with weights_only=True)."""
    import json

    strategy.load(path)
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
