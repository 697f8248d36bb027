"""AI preferences stage (RLAIF): sample candidates from a policy, let a judge pick, write preferences.

    rlhf run configs/tiny-rlaif.yaml --stage ai_preferences

k responses per prompt are sampled from the policy (batched; temperature, top-p, max new
tokens, seeded), paired (round robin best-versus-worst, or random pairs), judged in both orders
(configs/judges/*.yaml), and written as a `preferences` artifact in exactly the canonical schema
with `source: "ai"` and the judge's details on each pair, so the reward and DPO stages read it
unchanged. Pairs the judge abstained on are counted and listed in `unlabelled.jsonl`.

    RUN_DIR/ai_preferences/
      manifest.json        # kind: preferences; counts; judge: identity, calls, retries, tokens, cost,
                           # position_consistency, cache hits
      preferences.jsonl    # train pairs
      eval.jsonl           # held-out pairs (prompts not in train)
      unlabelled.jsonl     # judged pairs without a label (abstentions), with reasons
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from pipeline.blocks import StageBlock, Strict
from rlhf.errors import InvalidInput
from feedback.label import MIN_POSITION_CONSISTENCY, check_consistency, label
from feedback.schema import write_pairs
from pipeline.artifacts import write_jsonl
from pipeline.data import read_prompts, resolve_data_path, split_by_prompt
from pipeline.distributed import say
from pipeline.generation import sample
from pipeline.judging import build_judge
from pipeline.models import load_causal_lm, load_tokenizer


class CandidatesConfig(Strict):
    k: int = Field(4, ge=2, description="responses sampled per prompt")
    temperature: float = Field(1.0, ge=0, description="sampling temperature of the candidates; must be > 0 (at 0 the "
                               "k candidates are identical)")
    top_p: float = Field(1.0, gt=0, le=1, description="nucleus sampling of the candidates (1: off)")
    max_new_tokens: int = Field(32, ge=1, description="longest candidate response, in tokens")
    batch_size: int = Field(16, ge=1, description="prompts sampled together (each with its k candidates)")

    @model_validator(mode="after")
    def _sampled(self):
        if self.temperature <= 0:  # transformers would refuse k > 1 greedy sequences, deep inside generate
            raise ValueError("candidates.temperature: 0 is greedy decoding, which gives the k candidates of a prompt "
                             "identical (nothing to judge); use a temperature > 0, e.g. 1.0")
        return self


class AIPreferencesStageConfig(StageBlock):
    stage: Literal["ai_preferences"] = Field(description="the method: AI-judge labels of the policy's samples (RLAIF)")
    policy: str = Field(description="stage:NAME of a policy artifact, a key of `models`, or a model reference")
    prompts: str = Field(description="file of {'prompt': ...} rows, e.g. synthetic:prompts")
    prompts_split: str | None = Field(None, description="prompts is a DatasetDict directory: the split to read "
                                      "(default: train)")
    judge: str = Field(description="a judge config, e.g. configs/judges/rule.yaml")
    candidates: CandidatesConfig = Field(default_factory=CandidatesConfig, description="how the candidate responses "
                                         "are sampled")
    pairing: Literal["round_robin", "random"] = Field("round_robin", description="round_robin: judge every pair, keep "
                                                      "best vs worst; random: judge random disjoint pairs")
    max_prompts: int | None = Field(None, ge=1, description="label only the first N prompts of the file (default: "
                                    "all)")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="share of prompts whose pairs go to the eval split")
    min_position_consistency: float = Field(MIN_POSITION_CONSISTENCY, ge=0, le=1, description="below this share "
                                            "of pairs judged alike in both orders, the labels are refused")
    allow_inconsistent: bool = Field(False, description="write the labels of a judge below min_position_consistency "
                                     "anyway, with a warning (e.g. a demo of the mechanics)")

    def inputs(self) -> dict[str, tuple[str, str]]:
        return {"policy": (self.policy, "model"), "prompts": (self.prompts, "data"), "judge": (self.judge, "data")}


Config = AIPreferencesStageConfig  # the registry's handle (pipeline/stages/__init__.py)


def label_with_policy(policy_path: str, prompts: list, judge_config: str, cand: CandidatesConfig, pairing: str,
                      seed: int, trust_remote_code: bool = False, revision: str | None = None):
    """Sample candidates, judge them; returns (pairs, unlabelled, stats, judge identity)."""
    judge, jcfg, _ = build_judge(judge_config)  # before sampling: a bad judge config fails fast
    tok = load_tokenizer(policy_path, trust_remote_code, revision)
    model = load_causal_lm(policy_path, "fp32", trust_remote_code, revision)
    candidates = sample(model, tok, prompts, n=cand.k, temperature=cand.temperature, top_p=cand.top_p,
                        max_new_tokens=cand.max_new_tokens, batch_size=cand.batch_size, seed=seed,
                        desc="sampling candidates")
    del model
    pairs, unlabelled, stats = label(prompts, candidates, judge, jcfg.position, pairing, seed)
    return pairs, unlabelled, stats, {"name": judge.name, **judge.identity(), "position": jcfg.position.model_dump()}


def run(cfg: AIPreferencesStageConfig, ctx) -> dict:
    prompts = read_prompts(resolve_data_path(cfg.prompts), cfg.max_prompts, split=cfg.prompts_split)
    policy_path, info = ctx.model_path(cfg.policy, role="policy")
    pairs, unlabelled, stats, judge_id = label_with_policy(policy_path, prompts, cfg.judge, cfg.candidates,
                                                           cfg.pairing, ctx.seed, info.get("trust_remote_code", False),
                                                           info.get("revision"))
    if not pairs:
        raise InvalidInput(f"[{ctx.name}] the judge labelled no pairs ({stats})")
    warning = check_consistency(stats, cfg.min_position_consistency, cfg.allow_inconsistent, f"[{ctx.name}]")
    if warning:
        say(warning)
    train, evals = split_by_prompt(pairs, cfg.eval_fraction, ctx.seed)
    write_pairs(ctx.work_dir / "preferences.jsonl", train)
    write_pairs(ctx.work_dir / "eval.jsonl", evals)
    write_jsonl(ctx.work_dir / "unlabelled.jsonl", unlabelled)
    counts = {"prompts": len(prompts), "candidates": len(prompts) * cfg.candidates.k, "pairs": len(pairs),
              "train": len(train), "eval": len(evals), "unlabelled": len(unlabelled),
              "ties": sum(p.tie for p in pairs), "consistent_labels": stats["consistent_labels"]}
    pc = stats.get("position_consistency")
    read = stats.get("read")  # a model judge: pairs read from token probabilities or parsed text
    cost = (f", {stats['prompt_tokens'] + stats['completion_tokens']} tokens, cost {stats['cost']:g}"
            if "prompt_tokens" in stats else "")
    summary = (f"{len(pairs)} AI-judged pairs ({stats.get('labelled', 0)} preferences, {counts['ties']} ties) from "
               f"{len(prompts)} prompts x {cfg.candidates.k} candidates ({len(unlabelled)} abstained); position "
               f"consistency {'n/a' if pc is None else f'{pc:.3f}'}, {stats['consistent_labels']} of "
               f"{stats.get('labelled', 0)} labels from a verdict both orders agreed on; "
               f"{stats.get('requests', stats['judge_calls'])} judge calls{cost}"
               + (f"; read from {', '.join(f'{k} {v}' for k, v in sorted(read.items()))}" if read else "")
               + ("; BELOW min_position_consistency, written because allow_inconsistent is true" if warning else ""))
    return {"kind": "preferences",
            "outputs": {"train": "preferences.jsonl", "eval": "eval.jsonl", "unlabelled": "unlabelled.jsonl"},
            "counts": counts,
            "metrics": {"judge/position_consistency": pc} if pc is not None else {},
            "extra": {"source": "ai", "judge": {**judge_id, "stats": stats},
                      "split": {"by": "prompt", "seed": ctx.seed, "eval_fraction": cfg.eval_fraction}},
            "summary": summary}
