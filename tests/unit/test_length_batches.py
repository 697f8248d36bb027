"""Batches in order of length: the reward model's scoring (score_ids), the log-prob passes and the evaluate stage's
sampling pad each batch to its own longest row, so that HH-length spreads (50 to 800 tokens) do not make half of a
batch padding; every row's result is the one it gets alone, in the caller's order."""

import pytest


def test_batches_in_order_of_length_by_hand():
    from pipeline.generation import batches

    assert batches([3, 9, 1, 7, 2], 2, by_length=True) == [[2, 4], [0, 3], [1]]
    assert batches([3, 9, 1, 7, 2], 2) == [[0, 1], [2, 3], [4]]  # file order unless asked


@pytest.fixture(scope="module")
def contextual(tiny_path):
    """The tiny model with larger weights, so that what it gives depends on its input (conftest.contextual_lm), and a
    one-output score model built from the tiny model."""
    from transformers import AutoModelForSequenceClassification

    from pipeline.models import load_tokenizer
    from tests.conftest import contextual_lm

    tok, lm = load_tokenizer(tiny_path), contextual_lm(tiny_path)
    scorer = AutoModelForSequenceClassification.from_pretrained(tiny_path, num_labels=1)
    scorer.config.pad_token_id = tok.pad_token_id
    return tok, lm, scorer.eval()


def test_score_ids_batches_by_length_and_keeps_each_score(contextual, monkeypatch):
    from reward import scoring
    from reward.scoring import score_ids

    tok, _, scorer = contextual
    seqs = [[7 + i % 50 for i in range(n)] for n in (5, 40, 6, 41, 7)]
    widths = []
    hook = scorer.register_forward_pre_hook(lambda m, args, kw: widths.append(kw["input_ids"].shape[1]),
                                            with_kwargs=True)
    try:
        together = score_ids(scorer, seqs, tok.pad_token_id, batch_size=2)
    finally:
        hook.remove()
    assert widths == [6, 40, 41]  # [5, 6], [7, 40], [41]; in file order they padded to 40, 41 and 7
    alone = [score_ids(scorer, [s], tok.pad_token_id)[0] for s in seqs]
    assert together == pytest.approx(alone, abs=1e-5)
    monkeypatch.setattr(scoring, "SORT_WINDOW", 2)  # windows of 2 rows: each score still lands on its own row
    assert score_ids(scorer, seqs, tok.pad_token_id, batch_size=2) == pytest.approx(alone, abs=1e-5)


def test_sampling_by_length_gives_each_prompt_its_own_answer(contextual):
    """Greedy answers do not depend on the batch: sampled in order of length, each comes back to its own prompt."""
    from pipeline.generation import chat_ids, sample_ids

    tok, lm, _ = contextual
    prompts = ["Tell me about the old mountain in the north and its long winter.", "Hi", "Describe the lake.",
               "Tell me about the river and the bridge and the town beside them.", "Why?"]
    ids = [chat_ids(tok, p) for p in prompts]
    by_length = sample_ids(lm, tok, ids, 1, 0.0, max_new_tokens=6, batch_size=2, by_length=True)
    alone = [sample_ids(lm, tok, [i], 1, 0.0, max_new_tokens=6, batch_size=1)[0] for i in ids]
    assert by_length == alone and len({tuple(a[0]) for a in alone}) > 1
