"""A prompt-tuned policy samples what it scores, and answers and scores the same in a batch as alone (issue 20,
item 2).

peft puts prompt tuning's virtual tokens before the whole input, padding included, and ignores position ids, so in
a left-padded batch a row is computed at other positions than alone (in compare-tuning the prompt-tuning row's
rule reward moved from 0.700 at batch 1 to 0.556 at batch 32). And with the installed peft and transformers, its
generation from the KV cache loses the prompt after the first tokens, so even alone it sampled answers its own
forward pass does not give. Sampling and scoring such models go by batches of equal length, with no padding, and
without the cache; a plain model keeps its padded, cached batches.

The tiny model's random initialisation is too flat for its answers to depend on the context (it repeats one token
whatever it is given), so its weights are drawn larger here: a model whose next token depends on what came before."""

import pytest


@pytest.fixture(scope="module")
def models(tiny_path):
    import torch
    from peft import PromptTuningConfig, get_peft_model

    from pipeline.models import load_tokenizer
    from tests.conftest import contextual_lm

    def contextual():
        return contextual_lm(tiny_path)

    tuned = get_peft_model(contextual(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():  # trained virtual tokens, not near-zero ones: they must matter to the answer
        tuned.prompt_encoder["default"].embedding.weight.normal_(0, 1.0)
    return load_tokenizer(tiny_path), tuned.eval(), contextual()


PROMPTS = ["Tell me about the river.", "Hi", "Tell me about the old mountain in the north.", "Describe it.",
           "Tell me about the lake."]


def _argmax_path(model, prompt_ids: list[int], response: list[int]) -> list[int]:
    """The greedy tokens one teacher-forced forward of prompt + response gives at each response position."""
    import torch

    x = torch.tensor([prompt_ids + response])
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -x.shape[1]:]
    return logits[len(prompt_ids) - 1 : -1].argmax(-1).tolist()


def test_a_prompt_tuned_policy_samples_what_its_forward_pass_gives(models):
    from pipeline.generation import chat_ids, sample_ids

    tok, tuned, plain = models
    for model in (tuned, plain):
        for prompt in PROMPTS[:3]:
            ids = chat_ids(tok, prompt)
            greedy = sample_ids(model, tok, [ids], 1, 0.0, 1.0, 10, 1, seed=0)[0][0]
            assert len(set(greedy)) > 2, "a model whose answer depends on its context"
            assert greedy == _argmax_path(model, ids, greedy), (type(model).__name__, prompt)


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


def test_a_served_prompt_tuned_policy_answers_what_its_forward_pass_gives(models, tmp_path):
    """rlhf serve policy loads a prompt-tuning adapter as it is (it cannot be merged) and generates with it: without
    the KV cache, as the samplers do, so its greedy answer is its own."""
    import asyncio

    from pipeline.generation import chat_ids
    from pipeline.serve.engine import Engine, Job
    from pipeline.serve.options import ServeOptions
    from pipeline.serve.schema import Message

    tok, tuned, _ = models
    tuned.get_base_model().save_pretrained(tmp_path / "base")  # the contextual base, which the adapter names
    tuned.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    tuned.save_pretrained(tmp_path / "adapter")
    tok.save_pretrained(tmp_path / "adapter")
    engine = Engine(str(tmp_path / "adapter"), "prompt", ServeOptions(concurrency=1))
    ids = chat_ids(tok, PROMPTS[0])
    loop = asyncio.new_event_loop()  # the job's channel to a server's event loop (none runs here)
    try:
        job = Job(loop, [Message(role="user", content=PROMPTS[0])], max_tokens=10, temperature=0.0, top_p=1.0,
                  seed=None, logprobs=False, top_logprobs=0, stream=False)
        engine._run(job)
    finally:
        loop.close()
    assert job.prompt_ids == ids
    assert len(set(job.tokens)) > 2 and job.tokens == _argmax_path(engine.model, ids, job.tokens)
