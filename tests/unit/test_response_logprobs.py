"""pipeline.generation.response_logprobs (the evaluate stage's log-probabilities, its KL to the reference) against
log p(response | prompt) computed by hand, one sequence at a time with the whole vocabulary's log-softmax: the
batched, left-padded version projects only the response positions onto the vocabulary (`logits_to_keep`) and must
give the same sums."""

import pytest
import torch

PROMPTS = [[5, 9, 14], [7, 3, 22, 31, 8, 12, 40, 6, 18, 27, 3, 15], [11], [4, 4, 19, 2, 33]]
RESPONSES = [[17, 25, 6], [], [9, 9, 9, 9, 9, 30], [13]]


@pytest.fixture(scope="module")
def model_and_tok(tiny_path):
    from pipeline.models import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_path, "fp32"), load_tokenizer(tiny_path)


def by_hand(model, prompt: list[int], response: list[int], t: float) -> float:
    if not response:
        return 0.0
    seq = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=seq).logits[0].float() / t, -1)
    return sum(float(logp[len(prompt) + i - 1, tok]) for i, tok in enumerate(response))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_batched_log_probs_are_the_sums_of_the_response_tokens_log_probs(model_and_tok, temperature):
    from pipeline.generation import response_logprobs

    model, tok = model_and_tok
    want = [by_hand(model, p, r, temperature) for p, r in zip(PROMPTS, RESPONSES)]
    assert all(w < 0 for w, r in zip(want, RESPONSES) if r)
    got = response_logprobs(model, tok, PROMPTS, RESPONSES, temperature, batch_size=4)
    assert got == pytest.approx(want, abs=1e-4)
    assert got[1] == 0.0  # an empty response


def test_only_the_response_positions_are_projected_onto_the_vocabulary(model_and_tok):
    from pipeline.generation import response_logprobs

    model, tok = model_and_tok
    seen = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(out.shape[1]))
    try:
        response_logprobs(model, tok, PROMPTS, RESPONSES, 1.0, batch_size=4)
    finally:
        hook.remove()
    longest = max(map(len, RESPONSES))
    assert seen == [longest + 1] and longest + 1 < 12  # not the padded length of the longest prompt + response
