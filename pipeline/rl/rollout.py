"""A PPO step's rollout: sample one response per prompt, each from its own seed (the same responses on any number of
processes and in any batch), score it, take the old and reference log-probs and values, and put the whole scored
rollout on every process.

    ro = generate(models, prompts, max_new_tokens, keep_scores=True, seeds=row_seeds(seed, step, rows))
    score_rollout(models, ro, reward_fn, missing_eos_penalty, step)
    ro = gather_rollout(ro, pad_id)

Sampling uses an explicit GenerationConfig (nothing from the model's generation_config.json) at the models'
temperature with no top-k or top-p: the importance ratio needs each sampled token's probability under the policy,
and the sampler records exactly that (PPO's old log-probs, as TRL 1.12 takes them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pipeline import distributed
from rlhf.errors import InvalidInput
from pipeline.generation import chat_ids, generation_config
from rlhf.batching import left_pad
from pipeline.generation import generate as generate_with
from pipeline.rl import losses
from pipeline.rl.models import disable_dropout
from feedback.judges.rule import load_callable


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


def generate(models, prompts: list, max_new_tokens: int, keep_scores: bool = False,
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


def score_rollout(models, ro: Rollout, reward_fn: RewardFunction, missing_eos_penalty: float | None,
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
