"""The local judge in batches: the same probabilities as one prompt at a time, the two orders of a pair in one
forward, and a padding or masking mistake large enough for these tolerances to catch (tiny model, offline). The
reference is the judge without the shared-prefix cache at batch size 1: every prompt tokenized and forwarded whole."""

import pytest
import torch

from feedback.judges import JudgeItem, judge_both_orders
from feedback.judges.local import LocalJudge, pair_key
from feedback.judges.prompting import load_template
from pipeline.models import load_causal_lm, load_tokenizer
from rlhf.batching import after_prefix
from tests.conftest import ROOT

TOL = 1e-5  # fp32: a row batched with padding scores within ~1e-7 of the row alone

# responses of very different lengths, so a batch pads some rows by dozens of tokens
ITEMS = [JudgeItem(f"Tell me about thing {i}.", "Fine." + " It is calm and lovely." * (2 * i),
                   "It is dull." + " Very dull indeed." * (4 - i), id=str(i)) for i in range(5)]


@pytest.fixture(scope="module")
def tiny_judge(tiny_path):
    model, tok = load_causal_lm(tiny_path, "fp32"), load_tokenizer(tiny_path)
    template = load_template(ROOT / "configs" / "judges" / "pairwise.yaml")
    return lambda batch_size, prefix_cache=True: LocalJudge(model, tok, "tiny", template, [], "none",
                                                            batch_size=batch_size, prefix_cache=prefix_cache)


@pytest.mark.parametrize("batch_size", [1, 4])
def test_batched_probabilities_equal_one_by_one(tiny_judge, batch_size):
    """Batched and prefix-cached (at batch size 1 too) against the reference, on rows that pad by dozens of tokens
    between the cached prefix and their own: the same P(A) in every order, the same labels."""
    one, batched = tiny_judge(1, prefix_cache=False), tiny_judge(batch_size)
    alone = judge_both_orders(one, ITEMS, "average", "tie", 0.0)
    together = judge_both_orders(batched, ITEMS, "average", "tie", 0.0)
    # 10 prompts, 4 a forward (pairs kept whole); the chat template's system turn and the instructions are shared
    assert one.forwards == 2 * len(ITEMS) and batched.forwards == {1: 10, 4: 3}[batch_size]
    assert one.prefix_tokens == 0 and batched.prefix_tokens > 20
    for a, b in zip(alone, together):
        for x, y in ((a.forward, b.forward), (a.backward, b.backward)):
            assert y.prob_a == pytest.approx(x.prob_a, abs=TOL) and x.choice == y.choice and y.read == "logprobs"
        assert (a.choice, a.consistent) == (b.choice, b.consistent)
        assert b.prob_a == pytest.approx(a.prob_a, abs=TOL)


def test_prompts_tokenized_as_a_list_equal_one_at_a_time(tiny_judge):
    judge = tiny_judge(4)
    assert judge.prompts_ids(ITEMS) == [judge.prompt_ids(it) for it in ITEMS]


def test_rows_after_a_cached_prefix_are_masked_and_positioned_as_alone():
    """Hand-computed: two rows after a 3-token prefix; the shorter one padded between the prefix and its token."""
    ids, mask, positions = after_prefix([[5, 6], [7]], 3, 0)
    assert ids.tolist() == [[5, 6], [0, 7]]
    assert mask.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 1]]
    assert positions.tolist()[0] == [3, 4] and positions.tolist()[1][1] == 3  # the padding's position is unread


def test_prefix_position_and_mask_mistakes_exceed_the_tolerance(tiny_judge):
    """Why the equality above can be trusted for the cached path: a short row after the cached prefix, padded to a
    long one, scores within TOL of its whole prompt alone; positions restarting at 0 after the prefix, or a mask
    that lets the row see its padding, move P(A) by more than TOL (so a mistake in either fails the tests). The
    margin for positions is small (about 5x TOL): the random tiny model attends almost uniformly, so where a token
    sits matters little to it; fixed weights and inputs make it the same on every run."""
    judge = tiny_judge(2)
    short, long_ = judge.prompt_ids(ITEMS[0]), judge.prompt_ids(ITEMS[4])
    n = judge.shared_prefix([short, long_])
    assert n > 20 and len(long_) - len(short) > 10
    cache = judge.prefix_cache(short[:n])
    alone = judge.choice_probs([short])[0]
    assert judge.choice_probs([long_[n:], short[n:]], (cache, n))[1] == pytest.approx(alone, abs=TOL)

    def forward(mask, positions):
        import copy

        rows = copy.deepcopy(cache)
        rows.batch_repeat_interleave(2)
        with torch.inference_mode():
            logits = judge.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                                 **{judge._cache_kw: rows}).logits[:, -1].float()
        return torch.softmax(logits, -1)[1, judge.choice_ids].tolist()

    ids, mask, positions = after_prefix([long_[n:], short[n:]], n, judge.pad_id)
    assert forward(mask, positions) == pytest.approx(alone, abs=TOL)
    from_zero = forward(mask, positions - n)
    sees_padding = forward(torch.ones_like(mask), positions)
    p_a = lambda pa, pb: pa / (pa + pb)  # noqa: E731 - the judge's P(A)
    assert abs(p_a(*from_zero) - p_a(*alone)) > 3 * TOL
    assert abs(p_a(*sees_padding) - p_a(*alone)) > 10 * TOL


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

    def record(module, args, kw):  # the rows of each forward after the shared prefix's, padding removed
        if "attention_mask" in kw:  # not the prefix's forward
            ids, mask = kw["input_ids"], kw["attention_mask"][:, -kw["input_ids"].shape[1]:]
            batches.append([tuple(row[m.bool()].tolist()) for row, m in zip(ids, mask)])

    hook = judge.model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        judge_both_orders(judge, ITEMS[:3])
    finally:
        hook.remove()
    key_of = {}
    for it in ITEMS[:3]:
        for order in (it, JudgeItem(it.prompt, it.response_b, it.response_a, it.id)):
            key_of[tuple(judge.prompt_ids(order)[judge.prefix_tokens:])] = pair_key(it)
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


def test_a_sliding_window_model_scores_without_the_prefix_cache(tiny_path):
    """A sliding window is counted in columns of the batch, and padding between a cached prefix and a row would move
    it: a row's first tokens would see padding where alone they see the prefix's last ones. Such a model (a 2-layer
    Mistral with a 256-token window, shorter than these ~600-token prompts; random weights) forwards its prompts
    whole, and its batched probabilities equal one-by-one ones (with the prefix cached, P(A) moved by ~7e-5)."""
    from transformers import MistralConfig, MistralForCausalLM

    tok = load_tokenizer(tiny_path)
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             sliding_window=256, pad_token_id=tok.pad_token_id)).eval()
    template = load_template(ROOT / "configs" / "judges" / "pairwise.yaml")
    make = lambda b, cache: LocalJudge(model, tok, "mistral", template, [], "none", batch_size=b,  # noqa: E731
                                       prefix_cache=cache)
    one, batched = make(1, False), make(4, True)
    alone, together = (judge_both_orders(j, ITEMS, "average", "tie", 0.0) for j in (one, batched))
    assert batched.prefix_tokens == 0
    for a, b in zip(alone, together):
        assert b.forward.prob_a == pytest.approx(a.forward.prob_a, abs=TOL)
        assert b.backward.prob_a == pytest.approx(a.backward.prob_a, abs=TOL)


def test_each_batch_of_verdicts_reaches_the_cache_before_the_next_batch_runs(tiny_path, tmp_path):
    """A labelling run killed part way keeps what it judged: CachedJudge stores the local judge's verdicts batch by
    batch (they used to be stored only when the whole run returned)."""
    from feedback.judges.cache import CachedJudge, VerdictCache

    model, tok = load_causal_lm(tiny_path, "fp32"), load_tokenizer(tiny_path)
    template = load_template(ROOT / "configs" / "judges" / "pairwise.yaml")
    cache = VerdictCache(tmp_path / "verdicts.sqlite")
    stored_before_batch = []

    class Watched(LocalJudge):  # the real judge; it notes how many verdicts the cache holds as each batch starts
        def choice_probs(self, rows, prefix):
            stored_before_batch.append(cache._db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0])
            return super().choice_probs(rows, prefix)

    judge = CachedJudge(Watched(model, tok, "tiny", template, [], "none", batch_size=2), cache)
    assert len(judge.judge(ITEMS[:5])) == 5
    assert stored_before_batch == [0, 2, 4]


def test_a_peft_wrapped_judge_projects_only_the_last_position(tiny_path):
    """A judge model loaded as an unmerged adapter is a peft wrapper, whose forward shows only **kwargs: the judge
    still asks its base model for the last position's logits alone (the [batch, length, vocabulary] logits are most
    of a forward's memory), and gives the same P(A) as the plain model."""
    from peft import LoraConfig, get_peft_model

    model, tok = load_causal_lm(tiny_path, "fp32"), load_tokenizer(tiny_path)
    template = load_template(ROOT / "configs" / "judges" / "pairwise.yaml")
    plain = judge_both_orders(LocalJudge(model, tok, "tiny", template, [], "none", batch_size=2), ITEMS[:2],
                              "average", "tie", 0.0)
    wrapped = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=True)).eval()
    projected = []
    wrapped.get_base_model().lm_head.register_forward_hook(lambda m, i, out: projected.append(out.shape[1]))
    got = judge_both_orders(LocalJudge(wrapped, tok, "tiny", template, [], "none", batch_size=2), ITEMS[:2],
                            "average", "tie", 0.0)
    assert projected and set(projected) == {1}
    for a, b in zip(plain, got):
        assert b.prob_a == pytest.approx(a.prob_a, abs=TOL)
