"""RLAIF labelling: candidates from a policy -> pairs -> a judge (both orders) -> canonical preference pairs.

Pairing:
- `round_robin`: every pair of a prompt's k candidates is judged; the candidate with the most
  wins (ties count half) is chosen, the one with the fewest rejected, and the pair is labelled
  by the judge's verdict on those two (a tie stays a tie).
- `random`: the candidates are shuffled (seeded) and paired off.
Identical candidates are not pairs; abstentions are not labels: both are counted.
"""

from __future__ import annotations

import random
from collections import Counter

from feedback.judges import JudgeItem, PairResult, judge_both_orders, position_consistency, read_counts
from feedback.schema import PreferencePair
from rlhf.errors import InvalidInput

MIN_POSITION_CONSISTENCY = 0.5  # below it, a judge's verdicts follow the answers' order more than the answers


def candidate_pairs(n: int, pairing: str, rng: random.Random) -> list[tuple[int, int]]:
    idx = list(range(n))
    if pairing == "random":
        rng.shuffle(idx)
        return [(min(idx[i], idx[i + 1]), max(idx[i], idx[i + 1])) for i in range(0, n - 1, 2)]
    return [(i, j) for i in idx for j in idx if i < j]


def best_vs_worst(judged: dict[tuple[int, int], PairResult]) -> tuple[int, int] | None:
    """Round robin: the (i, j) key of the pair (most wins, fewest wins); None if all candidates tie."""
    wins: Counter = Counter()
    for (i, j), r in judged.items():
        wins[i] += {"a": 1.0, "tie": 0.5}.get(r.choice, 0.0)
        wins[j] += {"b": 1.0, "tie": 0.5}.get(r.choice, 0.0)
    cands = sorted({c for key in judged for c in key})
    best = max(cands, key=lambda c: (wins[c], -c))
    worst = min(cands, key=lambda c: (wins[c], -c))
    return None if best == worst else (min(best, worst), max(best, worst))


def label(prompts: list, candidates: list[list[str]], judge, position, pairing: str = "round_robin",
          seed: int = 0) -> tuple[list[PreferencePair], list[dict], dict]:
    """Returns (pairs, unlabelled [{prompt, a, b, reason}], stats)."""
    rng = random.Random(seed)
    items, owners = [], []
    counts: Counter = Counter()
    for p_i, cands in enumerate(candidates):
        for i, j in candidate_pairs(len(cands), pairing, rng):
            if cands[i].strip() == cands[j].strip():
                counts["identical_candidates"] += 1
                continue
            items.append(JudgeItem(prompts[p_i], cands[i], cands[j], id=f"{p_i}:{i}:{j}"))
            owners.append((p_i, i, j))
    results = judge_both_orders(judge, items, position.policy, position.disagreement, position.tie_band)
    per_prompt: dict[int, dict[tuple[int, int], PairResult]] = {}
    for (p_i, i, j), r in zip(owners, results):
        per_prompt.setdefault(p_i, {})[(i, j)] = r
    pairs, unlabelled = [], []
    for p_i, judged in per_prompt.items():
        prompt, cands = prompts[p_i], candidates[p_i]
        if pairing == "round_robin":
            key = best_vs_worst(judged)
            if key is None:
                counts["all_candidates_tied"] += 1
                continue
            judged = {key: judged[key]}
        for (i, j), r in judged.items():
            if r.choice == "abstain":
                counts["abstained"] += 1
                why = r.forward.reason if r.forward.choice == "abstain" else r.backward.reason
                unlabelled.append({"prompt": prompt, "a": cands[i], "b": cands[j], "reason": why})
                continue
            winner, loser = (i, j) if r.choice in ("a", "tie") else (j, i)
            counts["tie" if r.choice == "tie" else "labelled"] += 1
            counts["consistent_labels"] += r.choice != "tie" and r.consistent is True
            pairs.append(PreferencePair(prompt=prompt, chosen=cands[winner], rejected=cands[loser], source="ai",
                                        tie=r.choice == "tie", judge=r.judge_record(judge, position.policy)))
    counts["consistent_labels"] += 0  # always reported, 0 included
    stats = {"judged_pairs": len(items), "judge_calls": 2 * len(items), **counts,
             "position_consistency": position_consistency(results), **judge.stats()}
    if read_counts(results):  # a model judge: how its verdicts were read (token probabilities or parsed text)
        stats["read"] = read_counts(results)
    return pairs, unlabelled, stats


def check_consistency(stats: dict, minimum: float, allow: bool, where: str) -> str | None:
    """Labels no better than a coin are not labels. When the judge's position consistency (the share of pairs on
    which both orders gave the same verdict) is below `minimum`, raise InvalidInput naming the numbers, so nothing is
    written; with `allow`, return the warning to print loudly instead. None when the judge passes (or no pair was
    judged in both orders)."""
    pc = stats.get("position_consistency")
    if pc is None or pc >= minimum:
        return None
    labels = stats.get("labelled", 0)
    msg = (f"{where}: the judge's position consistency is {pc:.3f}, below {minimum}: its verdicts follow which answer "
           f"comes first more than the answers, so its labels are no better than a coin ({stats.get('consistent_labels', 0)} "
           f"of {labels} labels came from a verdict both orders agreed on)")
    if not allow:
        raise InvalidInput(msg + "; no labels written. Use a stronger judge, or allow_inconsistent: true "
                           "(--allow-inconsistent) to write them anyway")
    return f"WARNING: {msg}; written anyway (allow_inconsistent): do not train on them as preferences"
