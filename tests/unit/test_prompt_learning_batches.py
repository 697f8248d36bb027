"""A prompt-tuned policy answers and scores the same in a batch as alone (issue 20, item 2).

peft puts prompt tuning's virtual tokens before the whole input, padding included, and ignores position ids, so in
a left-padded batch a row is computed at other positions than alone (in compare-tuning the prompt-tuning row's
rule reward moved from 0.700 at batch 1 to 0.556 at batch 32). Sampling and scoring such models go by batches of
equal length, with no padding; a plain model keeps its padded batches."""

import pytest


@pytest.fixture(scope="module")
def models(tiny_path):
    import torch
    from peft import PromptTuningConfig, get_peft_model

    from pipeline.models import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_path)
    torch.manual_seed(0)
    tuned = get_peft_model(load_causal_lm(tiny_path), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():  # trained virtual tokens, not near-zero ones: they must matter to the answer
        tuned.prompt_encoder["default"].embedding.weight.normal_(0, 5.0)
    return tok, tuned, load_causal_lm(tiny_path)


PROMPTS = ["Tell me about the river.", "Hi", "Tell me about the old mountain in the north.", "Describe it.",
           "Tell me about the lake."]


def test_prompt_tuned_log_probs_and_greedy_answers_are_the_same_batched_and_alone(models):
    from pipeline.generation import chat_ids, response_logprobs, sample_ids

    tok, tuned, plain = models
    ids = [chat_ids(tok, p) for p in PROMPTS]
    assert len({len(i) for i in ids}) > 2, "prompts of several lengths: a padded batch would pad them"
    for model in (tuned, plain):
        alone = [sample_ids(model, tok, [i], 1, 0.0, 1.0, 8, 1, seed=0)[0][0] for i in ids]
        batched = [r[0] for r in sample_ids(model, tok, ids, 1, 0.0, 1.0, 8, batch_size=8, seed=0)]
        assert batched == alone
        one = [response_logprobs(model, tok, [i], [r], 1.0, batch_size=1)[0] for i, r in zip(ids, alone)]
        together = response_logprobs(model, tok, ids, alone, 1.0, batch_size=8)
        assert together == pytest.approx(one, abs=1e-4)


def test_batches_group_rows_of_equal_length_only_for_prompt_learning(models):
    from pipeline.generation import batches, prompt_learning

    _, tuned, plain = models
    assert prompt_learning(tuned) and not prompt_learning(plain)
    assert batches([3, 5, 3, 5, 3], 2) == [[0, 1], [2, 3], [4]]
    assert batches([3, 5, 3, 5, 3], 2, unpadded=True) == [[0, 2], [4], [1, 3]]
