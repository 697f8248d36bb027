"""Evaluate stage: is the final policy better than the SFT model, by how much, at what cost in KL?

    rlhf run configs/tiny.yaml --stage evaluate
    rlhf eval sft=runs/tiny/sft ppo=runs/tiny/ppo --prompts synthetic:prompts --rule feedback.synthetic:rule_score

Two or more policies (artifacts, model references, and optionally the base model prompted few-shot
with k examples from the SFT data: in-context learning as a baseline) answer the same held-out
prompts with the same sampling settings and seeds. Per policy: the mean reward-model score
(normalised, with the reward model's own tokenizer), the task's rule reward, the KL to a named
reference (sequence-level, from the generating policy's own log-probs), response length, share of
responses ending in EOS, distinct-1/2, and the mean score of each independent scorer (`scorers`: reward
models no policy was trained against). Pairwise: the win rate of each policy against a baseline by
a judge (any judge config), judged in both orders, and by the reward model and each scorer (the higher
score wins); ties counted half, with a 95% Wilson interval. Each win rate also comes length-controlled:
a logistic regression of the outcome on the length difference (tokens), whose intercept is the win rate
at equal length (`length_controlled`; preference models are known to favour longer answers).

    RUN_DIR/evaluate/
      manifest.json    # kind: eval; metrics eval/<policy>/<name>; "evaluate": policies, baseline, judge, ...
      samples.jsonl    # per prompt: each policy's response, its scores, its verdict against the baseline
      table.csv        # the same, one row per prompt
"""

from __future__ import annotations

import csv
import math
from typing import Literal

from pydantic import Field, model_validator

from pipeline.blocks import StageBlock, Strict
from rlhf.errors import InvalidInput
from feedback.judges import JudgeItem, judge_both_orders
from feedback.judges.rule import load_callable
from pipeline.artifacts import STAGE_NAME, write_atomic, write_jsonl
from pipeline.data import read_examples, read_prompts, resolve_data_path, split_by_prompt
from pipeline.distributed import say
from pipeline.generation import chat_ids, response_logprobs, sample_ids
from pipeline.judging import build_judge
from pipeline.models import load_causal_lm, load_tokenizer

NAME = r"^[A-Za-z0-9_-]+$"  # for pydantic (Rust regex: "$" is the end of the text); Python code uses STAGE_NAME
RESERVED = ("reward", "rule_reward")  # a scorer's metrics are eval/<policy>/<scorer>_mean: not these


class SamplingConfig(Strict):
    temperature: float = Field(1.0, ge=0, description="0: greedy")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling (1: off); refused at temperature 0")
    max_new_tokens: int = Field(32, ge=1, description="longest answer, in tokens")
    batch_size: int = Field(32, ge=1, description="prompts sampled together")

    @model_validator(mode="after")
    def _used(self):
        self.refuse_unused(("top_p",), self.temperature > 0, "at temperature 0 (greedy decoding)")
        return self


class FewShotConfig(Strict):
    """The base model prompted with k examples from the SFT data before each prompt (no training at all)."""

    name: str = Field("few_shot", pattern=NAME, description="its name in the table")
    model: str = Field(description="a key of `models` or a model reference (the base model)")
    k: int = Field(3, ge=1, description="examples (user and assistant turns) before each prompt")
    data: str = Field("synthetic:sft", description="SFT rows (messages or prompt/completion) to take examples from")
    split: str | None = Field(None, description="data is a DatasetDict directory: the split to read (default: "
                              "train)")


class EvaluateStageConfig(StageBlock):
    stage: Literal["evaluate"] = Field(description="the method: compare policies on the same held-out prompts")
    policies: dict[str, str] = Field(description="name -> stage:NAME, a key of `models`, or a model reference")
    few_shot: FewShotConfig | None = Field(None, description="also the base model prompted with k SFT examples (the "
                                           "in-context baseline)")
    prompts: str = Field(description="file of {'prompt': ...} rows; its held-out split is evaluated")
    prompts_split: str | None = Field(None, description="prompts is a DatasetDict directory: the split to read "
                                      "(default: train)")
    eval_fraction: float = Field(0.2, ge=0, lt=1, description="the held-out share (the split PPO and GRPO hold out "
                                 "with the same seed); 0 evaluates every prompt")
    max_prompts: int = Field(64, ge=1, description="evaluate at most the first N held-out prompts")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig, description="the same sampling settings for "
                                     "every policy")
    reward_model: str | None = Field(None, description="stage:NAME of a reward-model artifact")
    scorers: dict[str, str] = Field(default_factory=dict, description="name -> stage:NAME of a reward-model artifact "
                                    "that only scores (an independent scorer, e.g. trained on held-out pairs): its "
                                    "mean score and, with a baseline, its win rates")
    rule: str | None = Field(None, description="module:function(prompt, response) -> float")
    reference: str | None = Field(None, description="the policy KL is measured against (a name above)")
    judge: str | None = Field(None, description="a judge config for win rates against `baseline`")
    baseline: str | None = Field(None, description="the policy the others are judged against, by the judge (default "
                                 "with one: the first) and by the reward model and scorers")

    @model_validator(mode="after")
    def _check(self):
        names = list(self.policies) + ([self.few_shot.name] if self.few_shot else [])
        bad = [n for n in names if not STAGE_NAME.match(n)]
        if bad:
            raise ValueError(f"policies: names are letters, digits, '_' and '-' (they name metrics): {bad}")
        if len(set(names)) != len(names) or len(names) < 2:
            raise ValueError(f"policies: compare two or more policies with distinct names, got {names}")
        for key in ("reference", "baseline"):
            value = getattr(self, key)
            if value is not None and value not in names:
                raise ValueError(f"{key}: {value!r} is not one of the policies {names}")
        bad = [n for n in self.scorers if not STAGE_NAME.match(n) or n in RESERVED]
        if bad:
            raise ValueError(f"scorers: names are letters, digits, '_' and '-', and not {sorted(RESERVED)} (they name "
                             f"metrics): {bad}")
        if self.judge and self.baseline is None:
            self.baseline = names[0]
        self.refuse_unused(("baseline",), bool(self.judge or self.reward_model or self.scorers),
                           "without a judge, reward_model or scorers (win rates need one)")
        return self

    def inputs(self) -> dict[str, tuple[str, str]]:
        out = {f"policy:{n}": (ref, "model") for n, ref in self.policies.items()}
        out["prompts"] = (self.prompts, "data")
        if self.few_shot:
            out["few_shot_model"] = (self.few_shot.model, "model")
            out["few_shot_data"] = (self.few_shot.data, "data")
        if self.reward_model:
            out["reward_model"] = (self.reward_model, "artifact")
        for name, ref in self.scorers.items():
            out[f"scorer:{name}"] = (ref, "artifact")
        if self.judge:
            out["judge"] = (self.judge, "data")
        return out


Config = EvaluateStageConfig  # the registry's handle (pipeline/stages/__init__.py)


# --------------------------------------------------------------------------- the pieces


def few_shot_messages(rows: list[dict], k: int, seed: int) -> list[dict]:
    """k demonstrations (user, assistant turns) drawn, seeded, from SFT examples ({'messages': [...]})."""
    import random

    pairs = []
    for ex in rows:
        msgs = [m for m in ex["messages"] if m["role"] in ("user", "assistant")]
        for a, b in zip(msgs, msgs[1:]):
            if a["role"] == "user" and b["role"] == "assistant":
                pairs.append([a, b])
                break
    if len(pairs) < k:
        raise InvalidInput(f"few_shot.k is {k} but the SFT data has only {len(pairs)} usable examples")
    return [m for pair in random.Random(seed).sample(pairs, k) for m in pair]


def distinct_n(texts: list[str], n: int) -> float:
    """Distinct-n: unique word n-grams over all word n-grams of the responses (0 when there are none)."""
    grams = [tuple(ws[i : i + n]) for t in texts for ws in [t.split()] for i in range(len(ws) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def wilson(successes: float, n: int, z: float = 1.959964) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion (successes may be fractional: ties count half)."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def win_rate(verdicts: list[str]) -> dict:
    """From a policy's verdicts against the baseline: win rate (ties half) over the decided pairs, its interval."""
    decided = [v for v in verdicts if v != "abstain"]
    wins = sum(1.0 if v == "win" else 0.5 if v == "tie" else 0.0 for v in decided)
    low, high = wilson(wins, len(decided))
    rate = wins / len(decided) if decided else float("nan")
    return {"win_rate": rate, "win_rate_low": low, "win_rate_high": high, "pairs": len(decided),
            "abstained": len(verdicts) - len(decided)}


def length_controlled(outcomes: list[float], length_diffs: list[float], z: float = 1.959964) -> dict:
    """The win rate at equal length: a logistic regression P(win) = sigmoid(a + b * d) of each decided pair's
    outcome (1 win, 0.5 tie, 0 loss) on d, the policy's answer length minus the baseline's (tokens), fitted by
    Newton's method; sigmoid(a) is the win rate when the two answers are as long, its 95% interval sigmoid(a +- z se)
    from the fit's information matrix. With one outcome only (all wins, say) the fit has no finite intercept: the
    raw rate and its Wilson interval. {win_rate_lc, win_rate_lc_low, win_rate_lc_high, length_coef (per token)}."""
    n = len(outcomes)
    if n == 0 or len(set(outcomes)) == 1:
        low, high = wilson(sum(outcomes), n)
        return {"win_rate_lc": sum(outcomes) / n if n else float("nan"), "win_rate_lc_low": low,
                "win_rate_lc_high": high, "length_coef": 0.0 if n else float("nan")}
    scale = math.sqrt(sum(d * d for d in length_diffs) / n) or 1.0  # d in units of its RMS: a well-scaled fit
    xs = [d / scale for d in length_diffs]
    ridge = 1e-6  # keeps the matrix invertible when every d is 0 or the outcomes separate; changes nothing else

    def sig(t):
        return 1 / (1 + math.exp(-t)) if t >= 0 else math.exp(t) / (1 + math.exp(t))

    def info(a, b):  # the gradient and the information matrix (negative Hessian) of the penalised log-likelihood
        ps = [sig(a + b * x) for x in xs]
        ws = [p * (1 - p) for p in ps]
        g = (sum(y - p for y, p in zip(outcomes, ps)) - ridge * a,
             sum((y - p) * x for y, p, x in zip(outcomes, ps, xs)) - ridge * b)
        h = (sum(ws) + ridge, sum(w * x for w, x in zip(ws, xs)), sum(w * x * x for w, x in zip(ws, xs)) + ridge)
        return g, h

    a = b = 0.0
    for _ in range(100):
        (ga, gb), (haa, hab, hbb) = info(a, b)
        det = haa * hbb - hab * hab
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        a, b = a + da, b + db
        if max(abs(da), abs(db)) < 1e-10:
            break
    _, (haa, hab, hbb) = info(a, b)
    se = math.sqrt(hbb / (haa * hbb - hab * hab))
    return {"win_rate_lc": sig(a), "win_rate_lc_low": sig(a - z * se), "win_rate_lc_high": sig(a + z * se),
            "length_coef": b / scale}


def outcome(verdict: str) -> float:
    return {"win": 1.0, "tie": 0.5, "loss": 0.0}[verdict]


def win_rates(verdicts: list[str], lengths: list[int], base_lengths: list[int], prefix: str = "") -> dict:
    """win_rate() and length_controlled() of one policy's verdicts, as metrics named prefix + key."""
    decided = [(outcome(v), n - m) for v, n, m in zip(verdicts, lengths, base_lengths) if v != "abstain"]
    out = {**win_rate(verdicts), **length_controlled([y for y, _ in decided], [d for _, d in decided])}
    if prefix:  # the reward model's and scorers' win rates: named <prefix>win_rate...; pairs are the judge's names
        out = {prefix + k: v for k, v in out.items() if k not in ("pairs", "abstained")}
    return out


def score_verdicts(scores: list[float], base: list[float]) -> list[str]:
    """A scorer's verdict per prompt: the higher score wins (equal scores tie)."""
    return ["win" if a > b else "loss" if a < b else "tie" for a, b in zip(scores, base)]


class Policy:
    """One policy under evaluation: how to load it and how it sees a prompt."""

    def __init__(self, name: str, path: str, info: dict, context: list[dict] | None = None, ref: str = ""):
        self.name, self.path, self.info, self.context, self.ref = name, path, info, context or [], ref

    def load(self):
        trust, revision = self.info.get("trust_remote_code", False), self.info.get("revision")
        return load_tokenizer(self.path, trust, revision), load_causal_lm(self.path, "fp32", trust, revision)

    def prompt_ids(self, tok, prompt) -> list[int]:
        msgs = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
        return chat_ids(tok, self.context + msgs)


# --------------------------------------------------------------------------- sampling and scoring


def sample_policies(policies: list[Policy], prompts: list, sampling: SamplingConfig, seed: int) -> dict:
    """{name: {"tok", "prompt_ids", "ids", "texts", "logp"}}: each policy answers every prompt with the same seed;
    its own log-probability of each answer is kept for the KL. One model in memory at a time."""
    out = {}
    for pol in policies:
        say(f"[evaluate] sampling {pol.name} ({pol.ref})")
        tok, model = pol.load()
        prompt_ids = [pol.prompt_ids(tok, p) for p in prompts]
        ids = [r[0] for r in sample_ids(model, tok, prompt_ids, 1, sampling.temperature, sampling.top_p,
                                        sampling.max_new_tokens, sampling.batch_size, seed, desc=f"sampling {pol.name}",
                                        by_length=True)]
        logp = response_logprobs(model, tok, prompt_ids, ids, sampling.temperature, sampling.batch_size)
        texts = [tok.decode(r, skip_special_tokens=True).strip() for r in ids]
        out[pol.name] = {"tok": tok, "ids": ids, "texts": texts, "logp": logp,
                         "eos": [bool(r) and r[-1] == tok.eos_token_id for r in ids]}
        del model
    return out


def kl_to_reference(reference: Policy, samples: dict, prompts: list, sampling: SamplingConfig) -> dict:
    """{name: [sequence KL]}: log p_policy(y|x) - log p_reference(y|x) for each policy's own samples (a one-sample
    estimate of KL(policy || reference)); None for policies whose tokenizer differs from the reference's."""
    tok, model = reference.load()
    out = {}
    for name, s in samples.items():
        if s["tok"].get_vocab() != tok.get_vocab():
            out[name] = None
            continue
        ref = response_logprobs(model, tok, [reference.prompt_ids(tok, p) for p in prompts], s["ids"],
                                sampling.temperature, sampling.batch_size)
        out[name] = [a - b for a, b in zip(s["logp"], ref)]
    return out


def judge_against(judge_path: str, baseline: str, samples: dict, prompts: list) -> tuple[dict, dict]:
    """({name: [win | loss | tie | abstain per prompt]}, judge identity): every policy against the baseline, each
    pair judged in both orders (position bias becomes ties)."""
    judge, jcfg, _ = build_judge(judge_path)
    verdicts = {}
    base = samples[baseline]["texts"]
    for name, s in samples.items():
        if name == baseline:
            continue
        items = [JudgeItem(p, a, b, id=f"{name}:{i}") for i, (p, a, b) in enumerate(zip(prompts, s["texts"], base))]
        results = judge_both_orders(judge, items, jcfg.position.policy, jcfg.position.disagreement,
                                    jcfg.position.tie_band)
        verdicts[name] = [{"a": "win", "b": "loss", "tie": "tie"}.get(r.choice, "abstain") for r in results]
    return verdicts, {"name": judge.name, **judge.identity()}


# --------------------------------------------------------------------------- the evaluation


def evaluate(cfg: EvaluateStageConfig, policies: list[Policy], prompts: list, seed: int, reward_path: str | None,
             reward_trust: bool = False, scorer_paths: dict[str, str] | None = None):
    """The whole comparison: (metrics {eval/<policy>/<name>: value}, per-prompt rows, judge identity).
    reward_trust: whether the user lets the reward model run its own code (their config or flag); scorer_paths:
    {scorer name: its reward-model artifact directory} (loaded with trust_remote_code off)."""
    samples = sample_policies(policies, prompts, cfg.sampling, seed)
    by_name = {p.name: p for p in policies}
    kls = kl_to_reference(by_name[cfg.reference], samples, prompts, cfg.sampling) if cfg.reference else {}
    rewards, scored = {}, {}
    if reward_path or scorer_paths:
        from reward.scoring import RewardScorer
    if reward_path:
        scorer = RewardScorer.from_artifact(reward_path, trust_remote_code=reward_trust)
        rewards = {n: scorer.score(prompts, s["texts"])[1] for n, s in samples.items()}
    for sname, spath in (scorer_paths or {}).items():
        say(f"[evaluate] scoring with {sname}")
        scorer = RewardScorer.from_artifact(spath)
        scored[sname] = {n: scorer.score(prompts, s["texts"])[1] for n, s in samples.items()}
    rule = load_callable(cfg.rule) if cfg.rule else None
    rules = {n: [float(rule(p, t)) for p, t in zip(prompts, s["texts"])] for n, s in samples.items()} if rule else {}
    verdicts, judge_id = judge_against(cfg.judge, cfg.baseline, samples, prompts) if cfg.judge else ({}, None)

    metrics, rows = {}, []
    for name, s in samples.items():
        per = {"reward_mean": rewards.get(name), "rule_reward_mean": rules.get(name), "kl": kls.get(name),
               "response_length": [len(r) for r in s["ids"]], "eos_rate": [float(e) for e in s["eos"]]}
        for key, values in per.items():
            if values is not None:
                metrics[f"eval/{name}/{key}"] = sum(values) / len(values)
        metrics[f"eval/{name}/distinct_1"] = distinct_n(s["texts"], 1)
        metrics[f"eval/{name}/distinct_2"] = distinct_n(s["texts"], 2)
        for sname, by_policy in scored.items():
            metrics[f"eval/{name}/{sname}_mean"] = sum(by_policy[name]) / len(by_policy[name])
        lengths = [len(r) for r in s["ids"]]
        base_lengths = [len(r) for r in samples[cfg.baseline]["ids"]] if cfg.baseline else []
        if name in verdicts:
            metrics.update({f"eval/{name}/{k}": v for k, v in win_rates(verdicts[name], lengths, base_lengths).items()})
        if cfg.baseline and name != cfg.baseline:
            for source, by_policy in [("reward", rewards)] * bool(rewards) + list(scored.items()):
                vs = score_verdicts(by_policy[name], by_policy[cfg.baseline])
                metrics.update({f"eval/{name}/{k}": v
                                for k, v in win_rates(vs, lengths, base_lengths, f"{source}_").items()})
    for i, prompt in enumerate(prompts):
        rows.append({"prompt": prompt, "responses": {n: s["texts"][i] for n, s in samples.items()},
                     "scores": {n: {"reward": rewards[n][i] if n in rewards else None,
                                    "rule": rules[n][i] if n in rules else None,
                                    "kl": kls[n][i] if kls.get(n) is not None else None,
                                    "length": len(s["ids"][i]), "eos": s["eos"][i],
                                    **{sn: scored[sn][n][i] for sn in scored}} for n, s in samples.items()},
                     "verdicts": {n: v[i] for n, v in verdicts.items()}})
    return metrics, rows, judge_id


def write_outputs(out_dir, rows: list[dict], names: list[str], scorers: list[str] = ()) -> None:
    """samples.jsonl (one row per prompt) and table.csv (the same, flat: a column per policy and score)."""
    import io

    write_jsonl(out_dir / "samples.jsonl", rows)
    buf = io.StringIO()
    w = csv.writer(buf)
    cols = ["response", "reward", "rule", "kl", "length", "eos", *scorers, "verdict"]
    w.writerow(["prompt"] + [f"{n}.{c}" for n in names for c in cols])
    for r in rows:
        prompt = r["prompt"] if isinstance(r["prompt"], str) else " | ".join(m["content"] for m in r["prompt"])
        cells = [prompt]
        for n in names:
            sc = r["scores"][n]
            cells += [r["responses"][n], sc["reward"], sc["rule"], sc["kl"], sc["length"], sc["eos"],
                      *[sc.get(x) for x in scorers], r["verdicts"].get(n, "")]
        w.writerow(["" if c is None else c for c in cells])
    write_atomic(out_dir / "table.csv", buf.getvalue())


def table(metrics: dict, names: list[str], baseline: str | None, known: dict | None = None,
          scorers: list[str] = ()) -> str:
    """The table printed at the end: one row per policy, its scores, its win rate, and how it was made (trainable
    parameters, training time, peak memory, held-out loss) where its artifact says; then, when the reward model or
    scorers judged, their win rates against the baseline, raw and length-controlled."""
    known = known or {}
    cols = [("reward", "reward_mean"), *[(sn[:10], f"{sn}_mean") for sn in scorers], ("rule", "rule_reward_mean"),
            ("KL", "kl"), ("length", "response_length"), ("EOS", "eos_rate"), ("distinct-2", "distinct_2")]
    cols = [(h, k) for h, k in cols if any(f"eval/{n}/{k}" in metrics for n in names)]
    facts = [(h, k) for h, k in (("eval loss", "eval_loss"), ("trainable", "trainable"), ("train s", "train_seconds"),
                                 ("peak MiB", "peak_rss_mib")) if any(k in known.get(n, {}) for n in names)]
    judged = any(f"eval/{n}/win_rate" in metrics for n in names)
    head = (f"{'policy':14s}" + "".join(f"{h:>11s}" for h, _ in cols) + "".join(f"{h:>13s}" for h, _ in facts)
            + (f"  win rate vs {baseline} (95% CI)" if judged else ""))
    lines = [head, "-" * len(head)]
    for n in names:
        cells = "".join(f"{metrics[f'eval/{n}/{k}']:>11.3f}" if f"eval/{n}/{k}" in metrics else f"{'-':>11s}"
                        for _, k in cols)
        cells += "".join(_fact(known.get(n, {}).get(k)) for _, k in facts)
        if judged and f"eval/{n}/win_rate" in metrics:
            cells += (f"  {metrics[f'eval/{n}/win_rate']:.3f} [{metrics[f'eval/{n}/win_rate_low']:.3f}, "
                      f"{metrics[f'eval/{n}/win_rate_high']:.3f}] n={metrics[f'eval/{n}/pairs']}")
        lines.append(f"{n:14s}{cells}")
    return "\n".join(lines + win_rate_lines(metrics, names, baseline, scorers))


def win_rate_sources(metrics: dict, names: list[str], scorers: list[str] = ()) -> list[tuple[str, str]]:
    """(label, metric prefix) of each source of win rates in the metrics: the judge, the reward model, scorers."""
    sources = [("judge", ""), ("reward model", "reward_"), *[(f"scorer {sn}", f"{sn}_") for sn in scorers]]
    return [(label, pre) for label, pre in sources if any(f"eval/{n}/{pre}win_rate_lc" in metrics for n in names)]


def win_rate_lines(metrics: dict, names: list[str], baseline: str | None, scorers: list[str] = ()) -> list[str]:
    def cell(n, key):
        v = [metrics.get(f"eval/{n}/{key}{x}") for x in ("", "_low", "_high")]
        return f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" if None not in v else "-"

    sources = win_rate_sources(metrics, names, scorers)
    if not sources:
        return []
    head = f"{'win rate vs ' + str(baseline):24s}" + "".join(f"{label[:24]:>26s}{'length-controlled':>26s}"
                                                              for label, _ in sources)
    lines = ["", head, "-" * len(head)]
    for n in names:
        if n != baseline:
            lines.append(f"{n:24s}" + "".join(f"{cell(n, pre + 'win_rate'):>26s}{cell(n, pre + 'win_rate_lc'):>26s}"
                                              for _, pre in sources))
    return lines


def _fact(v) -> str:
    if v is None:
        return f"{'-':>13s}"
    return f"{v:>13,d}" if isinstance(v, int) else f"{v:>13.3f}" if abs(v) < 100 else f"{v:>13,.0f}"


def prompts_described(cfg: EvaluateStageConfig, used: int, available: int) -> str:
    """What the evaluated prompts are: the held-out split, or (eval_fraction 0) the file as given; and, when
    max_prompts cut them, how many there were (the HH recipe's "48 prompts" are the first 48 of its 223, and a file
    of held-out prompts evaluated whole is not split by this stage: "none split off", not "none held out")."""
    first = f"; the first {used} of {available}" if used < available else ""
    return (f"held-out prompts (eval_fraction {cfg.eval_fraction} of {cfg.prompts}{first})" if cfg.eval_fraction > 0
            else f"prompts ({'every prompt' if not first else 'prompts'} of {cfg.prompts}: eval_fraction 0, none split "
                 f"off{first})")


def held_out_prompts(cfg: EvaluateStageConfig, seed: int) -> tuple[list, int]:
    """(the prompts to evaluate: the first max_prompts of the held-out split, or of the file; how many there were)."""
    prompts = read_prompts(resolve_data_path(cfg.prompts), split=cfg.prompts_split)
    if cfg.eval_fraction > 0:
        _, prompts = split_by_prompt(prompts, cfg.eval_fraction, seed, prompt_of=lambda p: p)
    return prompts[: cfg.max_prompts], len(prompts)


def policy_facts(manifest: dict) -> dict:
    """What a policy artifact's manifest says about how it was made (for the comparison table)."""
    model, metrics = manifest.get("model") or {}, manifest.get("metrics") or {}
    facts = {"tuning": model.get("tuning"), "trainable": model.get("trainable"), "parameters": model.get("parameters"),
             "train_seconds": metrics.get("train/seconds"), "peak_rss_mib": metrics.get("memory/peak_rss_mib"),
             "eval_loss": metrics.get("eval/loss")}
    return {k: v for k, v in facts.items() if v is not None}


def resolve_policies(cfg: EvaluateStageConfig, resolve, seed: int) -> tuple[list[Policy], dict]:
    """The policies, and what is known of each (an artifact's training facts) for the manifest.
    resolve(ref, role) -> (model path, model info, the artifact's manifest or None): through the run for the stage
    (stage:NAME artifacts, model keys), through paths for `rlhf eval`."""
    policies, known = [], {}
    for name, ref in cfg.policies.items():
        path, info, manifest = resolve(ref, f"policies.{name}")
        policies.append(Policy(name, path, info, ref=ref))
        known[name] = {"ref": ref, "kind": "artifact" if manifest else "model", **policy_facts(manifest or {})}
    if cfg.few_shot:
        fs = cfg.few_shot
        path, info, _ = resolve(fs.model, "few_shot.model")
        rows, _ = read_examples(resolve_data_path(fs.data), "auto", "skip", [], fs.split, "few_shot.split")
        policies.append(Policy(fs.name, path, info, few_shot_messages(rows, fs.k, seed),
                               ref=f"{fs.model} prompted with {fs.k} examples"))
        known[fs.name] = {"ref": f"{fs.model}, few-shot (k={fs.k})", "kind": "few_shot", "trainable": 0}
    return policies, known


def compare(cfg: EvaluateStageConfig, resolve, reward_path: str | None, out_dir, seed: int,
            reward_trust: bool = False, scorer_paths: dict[str, str] | None = None) -> dict:
    """Run the comparison and write its outputs (samples.jsonl, table.csv) into out_dir: the stage's result."""
    prompts, available = held_out_prompts(cfg, seed)
    policies, known = resolve_policies(cfg, resolve, seed)
    described = prompts_described(cfg, len(prompts), available)
    say(f"[evaluate] {len(policies)} policies x {len(prompts)} {described}")
    metrics, rows, judge_id = evaluate(cfg, policies, prompts, seed, reward_path, reward_trust, scorer_paths)
    names, scorers = [p.name for p in policies], list(scorer_paths or {})
    write_outputs(out_dir, rows, names, scorers)
    say(table(metrics, names, cfg.baseline, known, scorers))
    return {"kind": "eval", "outputs": {"samples": "samples.jsonl", "table": "table.csv"}, "metrics": metrics,
            "counts": {"prompts": len(prompts), "policies": len(policies), "prompts_available": available},
            "extra": {"evaluate": {"policies": known, "baseline": cfg.baseline, "reference": cfg.reference,
                                   "judge": judge_id, "scorers": dict(cfg.scorers) if scorer_paths else {},
                                   "length_control": "logistic regression of the outcome on the length difference "
                                   "(tokens); the win rate at equal length",
                                   "prompts": len(prompts), "sampling": cfg.sampling.model_dump(), "seed": seed}}}


def recap(manifest: dict) -> str | None:
    """The comparison table of an up-to-date evaluate stage, from its manifest: a run whose stages are all skipped
    still ends with the results (the runner prints it after 'up to date')."""
    ev, metrics = manifest.get("evaluate") or {}, manifest.get("metrics") or {}
    known = ev.get("policies") or {}
    if not known or not metrics:
        return None
    head = f"[evaluate] {len(known)} policies x {ev.get('prompts', '?')} prompts, as last run:"
    return head + "\n" + table(metrics, list(known), ev.get("baseline"), known, list(ev.get("scorers") or {}))


def run(cfg: EvaluateStageConfig, ctx) -> dict:
    from transformers import set_seed

    def resolve(ref: str, role: str):
        path, info = ctx.model_path(ref, role=role)
        manifest = ctx.artifact(ref, ("policy",), role).manifest if ref.startswith("stage:") else None
        return path, info, manifest

    set_seed(ctx.seed)
    reward_art = ctx.artifact(cfg.reward_model, "reward_model", "reward_model") if cfg.reward_model else None
    scorer_paths = {n: str(ctx.artifact(ref, "reward_model", f"scorers.{n}").path) for n, ref in cfg.scorers.items()}
    out = compare(cfg, resolve, str(reward_art.path) if reward_art else None, ctx.work_dir, ctx.seed,
                  bool(cfg.reward_model) and ctx.trusts_remote_code(cfg.reward_model), scorer_paths)
    n = out["counts"]
    return {**out, "summary": f"{n['policies']} policies on {n['prompts']} "
                              f"{prompts_described(cfg, n['prompts'], n['prompts_available'])}; "
                              f"table in {ctx.run_dir / ctx.name / 'table.csv'}"}
