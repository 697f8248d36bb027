"""The shipped synthetic task: files match the generator; the rule is what its docstring says."""

import json

from feedback import synthetic


def test_shipped_files_match_generator():
    for name in synthetic.FILES:
        assert synthetic.path(name).read_text(encoding="utf-8") == synthetic.render(name), (
            f"feedback/data/{name} is stale: run python -m feedback.synthetic")


def test_rule_score_hand_computed():
    p = "Tell me about the river."
    assert synthetic.rule_score(p, "The river is calm and lovely.") == 1.0  # 0.8 * 1 + 0.2
    assert synthetic.rule_score(p, "The river is dull.") == 0.2  # 0.8 * 0 + 0.2
    assert synthetic.rule_score(p, "It is nice.") == 0.4  # 0.8 * 0.5, no topic
    assert synthetic.rule_score(p, "The lake is calm and dull.") == 0.4  # p=n=1: 0.5 sentiment, wrong topic


def test_preference_pairs_prefer_the_rule():
    rows = [json.loads(line) for line in synthetic.path("preferences").read_text().splitlines()]
    assert len(rows) == 600
    assert all(synthetic.rule_score(r["prompt"], r["chosen"]) > synthetic.rule_score(r["prompt"], r["rejected"])
               for r in rows)
    sft = [json.loads(line) for line in synthetic.path("sft").read_text().splitlines()]
    scores = [synthetic.rule_score(r["messages"][0]["content"], r["messages"][1]["content"]) for r in sft]
    mean = sum(scores) / len(scores)
    assert 0.4 < mean < 0.8, "SFT demonstrations are of mixed quality on purpose"
