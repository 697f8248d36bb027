"""The shipped synthetic task: a learnable, checkable stand-in for "be a pleasant assistant".

A user asks about a topic ("Tell me about the river."); a response describes it with
adjectives ("The river is calm and lovely."). The rule `rule_score` prefers responses that
mention the topic and use only positive adjectives; a program checks it exactly, so later
stages can use it as a verifiable reward and as a rule judge (`feedback.synthetic:rule_score`).

The SFT demonstrations are deliberately of mixed quality (positive, negative and mixed
descriptions), so that the SFT policy follows the format but is only sometimes pleasant:
the preference stages (reward model, PPO, DPO) have something measurable to improve.

The files in `feedback/data/` are written by `python -m feedback.synthetic` and a test
checks that they equal what this module generates.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

from feedback.rules import rule

DATA_DIR = Path(__file__).parent / "data"
SEED = 1234

TOPICS = [
    "river", "garden", "city", "library", "mountain", "forest", "bakery", "ocean", "bridge", "village",
    "museum", "market", "castle", "lake", "island", "desert", "meadow", "harbor", "school", "park",
    "train", "kitchen", "festival", "concert", "painting", "novel", "song", "movie", "sunrise", "winter",
    "summer", "autumn", "morning", "evening", "storm", "puppy", "kitten", "horse", "beach", "valley",
    "cafe", "theater", "station", "farm", "orchard", "canal", "tower", "square",
]  # fmt: skip
TEMPLATES = [
    "Tell me about the {t}.",
    "Describe the {t} in one sentence.",
    "What do you think of the {t}?",
    "Say something about the {t}.",
]
POSITIVE = ["lovely", "bright", "calm", "charming", "pleasant", "cheerful", "beautiful", "friendly", "warm", "wonderful"]
NEGATIVE = ["awful", "gloomy", "dull", "ugly", "boring", "dreadful", "nasty", "dirty", "noisy", "cold"]
_WORD = re.compile(r"[a-z]+")


def prompts() -> list[str]:
    return [tpl.format(t=t) for t in TOPICS for tpl in TEMPLATES]


def topic_of(prompt: str) -> str | None:
    for t in TOPICS:
        if re.search(rf"\bthe {t}\b", prompt):
            return t
    return None


@rule
def rule_score(prompt: str, response: str) -> float:
    """Score in [0, 1]: 0.8 for sentiment, 0.2 for mentioning the topic.

    Sentiment is (1 + (p - n) / (p + n)) / 2 over the positive (p) and negative (n) adjectives
    of the shipped lists, and 0.5 when there are none. So "The river is calm and lovely." scores
    0.8 * 1 + 0.2 = 1.0, "The river is dull." 0.2, and "It is nice." 0.4.
    """
    words = _WORD.findall(response.lower())
    p = sum(w in POSITIVE for w in words)
    n = sum(w in NEGATIVE for w in words)
    sentiment = 0.5 if p + n == 0 else (1 + (p - n) / (p + n)) / 2
    t = topic_of(prompt)
    mentions = 1.0 if t is not None and t in words else 0.0
    return round(0.8 * sentiment + 0.2 * mentions, 6)


def _describe(rng: random.Random, topic: str, mood: str) -> str:
    if mood == "positive":
        a, b = rng.sample(POSITIVE, 2)
    elif mood == "negative":
        a, b = rng.sample(NEGATIVE, 2)
    else:
        a, b = rng.choice(POSITIVE), rng.choice(NEGATIVE)
        if rng.random() < 0.5:
            a, b = b, a
    form = rng.randrange(3)
    if form == 0:
        return f"The {topic} is {a} and {b}."
    if form == 1:
        return f"I find the {topic} {a} and {b}."
    return f"The {topic} feels {a}, even {b}."


def sft_examples(n: int = 600, seed: int = SEED) -> list[dict]:
    """Chat demonstrations: 40% positive, 40% negative, 20% mixed descriptions."""
    rng = random.Random(seed)
    ps = prompts()
    rows = []
    for i in range(n):
        prompt = ps[i % len(ps)]
        mood = rng.choices(["positive", "negative", "mixed"], weights=[4, 4, 2])[0]
        reply = _describe(rng, topic_of(prompt), mood)
        rows.append({"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]})
    rng.shuffle(rows)
    return rows


def preference_pairs(n: int = 600, seed: int = SEED + 1) -> list[dict]:
    """Pairs whose chosen response has a strictly higher `rule_score` than the rejected one."""
    rng = random.Random(seed)
    ps = prompts()
    rows = []
    moods = [("positive", "negative"), ("positive", "mixed"), ("mixed", "negative")]
    for i in range(n):
        prompt = ps[i % len(ps)]
        topic = topic_of(prompt)
        good, bad = moods[rng.choices(range(3), weights=[6, 2, 2])[0]]
        chosen = _describe(rng, topic, good)
        rejected = _describe(rng, topic, bad)
        margin = rule_score(prompt, chosen) - rule_score(prompt, rejected)
        assert margin > 0, (prompt, chosen, rejected)
        rows.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    rng.shuffle(rows)
    return rows


def unpaired_rows(n: int = 600, seed: int = SEED + 2) -> list[dict]:
    """Single answers labelled the way a thumbs up/down would be: desirable (`label` true) when `rule_score` is at
    least 0.8 (only positive adjectives), else undesirable. About one answer in three is desirable, so the kto
    stage's default weights have an imbalance to balance."""
    rng = random.Random(seed)
    ps = prompts()
    rows = []
    for i in range(n):
        prompt = ps[i % len(ps)]
        mood = rng.choice(["positive", "negative", "mixed"])
        completion = _describe(rng, topic_of(prompt), mood)
        rows.append({"prompt": prompt, "completion": completion, "label": rule_score(prompt, completion) >= 0.8})
    rng.shuffle(rows)
    return rows


def prompt_pool() -> list[dict]:
    return [{"prompt": p} for p in prompts()]


def corpus() -> list[str]:
    """Text the tiny model's tokenizer is trained on (the task's vocabulary plus plain English)."""
    lines = [m["content"] for ex in sft_examples() for m in ex["messages"]]
    lines += [r["chosen"] + " " + r["rejected"] for r in preference_pairs()]
    lines += [
        "You are a helpful assistant. Answer the question clearly and kindly.",
        "The quick brown fox jumps over the lazy dog. 0123456789 +-*/=()[]{}<>!?.,;:'\"",
        "Human: Assistant: user assistant system",
    ]
    return lines


FILES = {"sft.jsonl": sft_examples, "preferences.jsonl": preference_pairs, "prompts.jsonl": prompt_pool,
         "unpaired.jsonl": unpaired_rows}


def render(name: str) -> str:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in FILES[name]())


def path(name: str) -> Path:
    """`synthetic:sft` -> the shipped file feedback/data/sft.jsonl."""
    p = DATA_DIR / (name if name.endswith(".jsonl") else f"{name}.jsonl")
    if p.name not in FILES:
        raise KeyError(f"no synthetic dataset '{name}' (have: {', '.join(f[:-6] for f in FILES)})")
    return p


if __name__ == "__main__":
    DATA_DIR.mkdir(exist_ok=True)
    for fname in FILES:
        (DATA_DIR / fname).write_text(render(fname), encoding="utf-8")
        print(f"wrote {DATA_DIR / fname}")
