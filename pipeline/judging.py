"""Judge configs (`configs/judges/*.yaml`) and building a judge from one: the models a judge needs are loaded here
(pipeline.models), so that the judges themselves (feedback/judges/) take what they use and load nothing.

    type: rule | local | http | reward_model
    rule: feedback.synthetic:rule_score      # rule
    model: smollm2-135m-instruct             # local: a model reference; reward_model: an artifact path
    revision: null                           # local: a hub id's branch, tag or commit
    trust_remote_code: false                 # local, reward_model: run the model's own code (your decision only)
    http: {base_url, model, api_key_env, timeout, max_retries, backoff_base, backoff_max, concurrency,
           top_logprobs, ...}
    batch_size: 8                            # local, reward_model: prompts a forward
    template: pairwise.yaml                  # relative to this file
    constitution: constitution.yaml          # principles; `principles: all | sample | none`, `n_principles`
    position: {policy: agree_or_tie | average, disagreement: tie | abstain, tie_band: 0.05}
    cache: default                           # default ($RLHF_CACHE/judge-cache.sqlite) | none | a path
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from feedback.judges.cache import CachedJudge, VerdictCache
from feedback.judges.prompting import load_principles, load_template
from pipeline.blocks import Strict, validate
from pipeline.models import BUILTIN, cache_dir, load_causal_lm, load_tokenizer, resolve
from rlhf.errors import UsageError
from rlhf.yaml import load_yaml
from feedback.judges.reward_model import RewardModelJudge
from pipeline.artifacts import manifest_hash
from reward.scoring import RewardScorer


class PositionConfig(Strict):
    policy: Literal["agree_or_tie", "average"] = "agree_or_tie"
    disagreement: Literal["tie", "abstain"] = "tie"
    tie_band: float = Field(0.05, ge=0, lt=0.5)


class HTTPConfig(Strict):
    base_url: str = Field(description="http(s)://host[:port]/path: no credentials, query or fragment")
    model: str
    api_key_env: str | None = Field(None, description="name of the environment variable holding the key")
    timeout: float = Field(30.0, gt=0)
    max_retries: int = Field(4, ge=0)
    backoff_base: float = Field(0.5, ge=0)
    backoff_max: float = Field(30.0, ge=0)
    concurrency: int = Field(4, ge=1)
    max_tokens: int = Field(8, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_logprobs: int = Field(20, ge=0, le=20, description="ask for the first answer token's top log-probabilities "
                              "and read P(A) from them (0: parse the answer text only)")
    price_per_1k_prompt: float = Field(0.0, ge=0)
    price_per_1k_completion: float = Field(0.0, ge=0)
    max_response_bytes: int = Field(1 << 20, ge=1024, description="a longer response body is malformed")

    @model_validator(mode="after")
    def _plain_url(self):
        from urllib.parse import urlsplit

        u = urlsplit(self.base_url)
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError("base_url must be an http:// or https:// URL with a host")
        # a URL is written into judge identities, verdict records and manifests: it must hold no secret
        if u.username or u.password:
            raise ValueError("base_url must not hold credentials (user:password@); put the key in an environment "
                             "variable and name it with api_key_env")
        if u.query or u.fragment:
            raise ValueError("base_url must not have a query string or fragment (keys in URLs end up in logs and "
                             "manifests); use api_key_env")
        return self


class JudgeConfig(Strict):
    type: Literal["rule", "local", "http", "reward_model"]
    rule: str | None = None
    model: str | None = None
    http: HTTPConfig | None = None
    template: str = "pairwise.yaml"
    constitution: str | None = "constitution.yaml"
    principles: Literal["all", "sample", "none"] = "all"
    n_principles: int = Field(2, ge=1)
    position: PositionConfig = Field(default_factory=PositionConfig)
    cache: str = "default"
    batch_size: int = Field(8, ge=1, description="local and reward_model judges: prompts scored in one forward (the "
                            "two orders of a pair share one); more is faster on a GPU or a many-core CPU, costs memory")
    trust_remote_code: bool = Field(False, description="local and reward_model judges: run the model's own code "
                                    "(auto_map); never taken from an artifact's files")
    revision: str | None = Field(None, description="local judges: the hub id's branch, tag or commit to load (pin "
                                 "it, above all with trust_remote_code: the default branch can change)")

    @model_validator(mode="before")
    @classmethod
    def _no_secrets(cls, data: Any) -> Any:
        http = data.get("http") if isinstance(data, dict) else None
        for where, block in (("", data), ("http.", http)):
            if isinstance(block, dict) and ("api_key" in block or "key" in block):
                raise ValueError(f"{where}api_key: never put a key in a config; name its environment variable "
                                 "with http.api_key_env")
        return data

    @model_validator(mode="after")
    def _needs(self):
        need = {"rule": "rule", "local": "model", "http": "http", "reward_model": "model"}[self.type]
        if getattr(self, need) is None:
            raise ValueError(f"{need}: a '{self.type}' judge needs '{need}'")
        if self.revision is not None:
            if self.type != "local":
                raise ValueError(f"revision: pins the hub model of a 'local' judge; it has no effect on a "
                                 f"'{self.type}' judge")
            if self.model in BUILTIN or Path(self.model).expanduser().exists():
                raise ValueError(f"revision has no effect for '{self.model}' (a built-in model or a local "
                                 "directory): it pins a hub id's branch, tag or commit")
        return self


def load_judge_config(path: str | Path) -> tuple[JudgeConfig, Path]:
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a judge config is a mapping with a 'type'")
    return validate(JudgeConfig, data, str(path)), Path(path).resolve().parent


def _resolve(base: Path, rel: str) -> Path:
    p = Path(rel)
    return p if p.is_absolute() else base / p


def build_judge(path: str | Path):
    """A judge config file -> (judge, config, template hash). The judge is cached unless `cache: none`."""
    cfg, base = load_judge_config(path)
    template = load_template(_resolve(base, cfg.template)) if cfg.type in ("local", "http") else None
    principles = load_principles(_resolve(base, cfg.constitution)) if template and cfg.constitution else []
    if cfg.type == "rule":
        from feedback.judges.rule import RuleJudge

        judge = RuleJudge(cfg.rule)
    elif cfg.type == "reward_model":
        judge = _reward_model_judge(cfg)
    elif cfg.type == "local":
        from feedback.judges.local import LocalJudge

        # trust_remote_code and revision come from the judge config (the user's), never from a model's files
        path_ = resolve(cfg.model)
        tok = load_tokenizer(path_, cfg.trust_remote_code, cfg.revision)
        model = load_causal_lm(path_, "fp32", cfg.trust_remote_code, cfg.revision).eval()
        judge = LocalJudge(model, tok, cfg.model, template, principles, cfg.principles, cfg.n_principles,
                           batch_size=cfg.batch_size, revision=cfg.revision)
    else:
        from feedback.judges.http import HTTPJudge

        judge = HTTPJudge(template=template, principles=principles, principle_mode=cfg.principles,
                          n_principles=cfg.n_principles, **cfg.http.model_dump())
    # The cache key covers the template and the constitution: editing either invalidates old verdicts.
    thash = hashlib.sha256((template.hash() + "\n".join(principles)).encode()).hexdigest()[:16] if template else ""
    if cfg.cache != "none":
        cache_path = cache_dir() / "judge-cache.sqlite" if cfg.cache == "default" else Path(cfg.cache)
        judge = CachedJudge(judge, VerdictCache(cache_path), thash)
    return judge, cfg, thash


def _reward_model_judge(cfg: JudgeConfig):
    """A reward-model artifact as a judge; its identity (for the verdict cache) is the artifact's manifest hash."""
    # trust_remote_code comes from the judge config (the user's), never from the artifact's manifest
    scorer = RewardScorer.from_artifact(cfg.model, batch_size=cfg.batch_size, trust_remote_code=cfg.trust_remote_code)
    try:
        identity = manifest_hash(cfg.model)
    except OSError:
        identity = str(cfg.model)
    return RewardModelJudge(scorer, identity)
