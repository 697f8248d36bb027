"""The local judge in batches: the same probabilities as one prompt at a time, the two orders of a pair in one
forward, and a padding or masking mistake large enough for these tolerances to catch (tiny model, offline)."""

import pytest
import torch

from feedback.judges import JudgeItem, judge_both_orders
from feedback.judges.local import LocalJudge, pair_key
from feedback.judges.prompting import load_template
from pipeline.models import load_causal_lm, load_tokenizer
from tests.conftest import ROOT

TOL = 1e-5  # fp32: a row batched with padding scores within ~1e-7 of the row alone

# responses of very different lengths, so a batch pads some rows by dozens of tokens
ITEMS = [JudgeItem(f"Tell me about thing {i}.", "Fine." + " It is calm and lovely." * (2 * i),
                   "It is dull." + " Very dull indeed." * (4 - i), id=str(i)) for i in range(5)]


@pytest.fixture(scope="module")
def tiny_judge(tiny_path):
    model, tok = load_causal_lm(tiny_path, "fp32"), load_tokenizer(tiny_path)
    template = load_template(ROOT / "configs" / "judges" / "pairwise.yaml")
    return lambda batch_size: LocalJudge(model, tok, "tiny", template, [], "none", batch_size=batch_size)


def test_batched_probabilities_equal_one_by_one(tiny_judge):
    one, batched = tiny_judge(1), tiny_judge(4)
    alone = judge_both_orders(one, ITEMS, "average", "tie", 0.0)
    together = judge_both_orders(batched, ITEMS, "average", "tie", 0.0)
    assert one.forwards == 2 * len(ITEMS) and batched.forwards == 3  # 10 prompts, 4 a forward (pairs kept whole)
    for a, b in zip(alone, together):
        for x, y in ((a.forward, b.forward), (a.backward, b.backward)):
            assert y.prob_a == pytest.approx(x.prob_a, abs=TOL) and x.choice == y.choice and y.read == "logprobs"
        assert (a.choice, a.consistent) == (b.choice, b.consistent)
        assert b.prob_a == pytest.approx(a.prob_a, abs=TOL)


def test_padding_and_mask_mistakes_exceed_the_tolerance(tiny_judge):
    """Why TOL can be trusted: forgetting the mask, or padding on the right and reading the last column, moves the
    probabilities by far more than TOL on these rows, so the test above would fail on either mistake."""
    judge = tiny_judge(2)
    short, long_ = judge.prompt_ids(ITEMS[0]), judge.prompt_ids(ITEMS[4])
    assert len(long_) - len(short) > 10
    alone = judge.choice_probs([short])[0]
    assert judge.choice_probs([long_, short])[1] == pytest.approx(alone, abs=TOL)  # the judge's own batching

    def forward(ids, mask):
        logits = judge.model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits[:, -1].float()
        return torch.softmax(logits, -1)[:, judge.choice_ids].tolist()

    pad, width, gap = judge.pad_id, len(long_), len(long_) - len(short)
    left = [[pad] * gap + short, long_]
    with torch.no_grad():
        no_mask = forward(left, [[1] * width] * 2)[0]
        right = forward([short + [pad] * gap, long_], [[1] * len(short) + [0] * gap, [1] * width])[0]
    p_a = lambda pa, pb: pa / (pa + pb)  # noqa: E731 - the judge's P(A)
    for wrong in (no_mask, right):
        assert abs(p_a(*wrong) - p_a(*alone)) > 100 * TOL


def test_both_orders_of_a_pair_share_a_forward(tiny_judge):
    """judge_both_orders hands the judge every pair's first order, then every second order; batched in that order,
    a pair's two orders met in different forwards. Each forward now holds both orders of the pairs it scores."""
    judge = tiny_judge(2)
    batches = []

    def record(module, args, kw):  # the rows of each forward, padding removed
        ids, mask = kw["input_ids"], kw["attention_mask"]
        batches.append([tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask)])

    hook = judge.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        judge_both_orders(judge, ITEMS[:3])
    finally:
        hook.remove()
    key_of = {}
    for it in ITEMS[:3]:
        for order in (it, JudgeItem(it.prompt, it.response_b, it.response_a, it.id)):
            key_of[tuple(judge.prompt_ids(order))] = pair_key(it)
    assert [len(b) for b in batches] == [2, 2, 2]
    for batch in batches:
        keys = [key_of[row] for row in batch]
        assert len(set(keys)) == 1 and batch[0] != batch[1], "a forward holds the two orders of one pair"


def test_cached_local_verdicts_say_how_they_were_read(tiny_judge, tmp_path):
    """The demo's second run took its local verdicts from the cache, stored before verdicts recorded how they were
    read, and its summary had no `read` count: a local judge's verdicts are all read from probabilities."""
    from feedback.judges import Verdict
    from feedback.judges.cache import CachedJudge, VerdictCache

    judge = tiny_judge(2)
    cache = VerdictCache(tmp_path / "c.sqlite")
    key = VerdictCache.key(judge.identity(), "", ITEMS[0])
    cache.put(key, Verdict.from_dict({"choice": "a", "prob_a": 0.6, "raw": "p(A)=0.6 p(B)=0.4"}))  # an old entry
    got = CachedJudge(judge, cache).judge(ITEMS[:2])
    assert got[0].cached and got[0].prob_a == 0.6 and [v.read for v in got] == ["logprobs", "logprobs"]
