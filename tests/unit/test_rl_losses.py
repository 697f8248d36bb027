"""PPO's pure functions against numbers worked by hand (each docstring shows the arithmetic)."""

import math

import pytest
import torch

from pipeline.rl import losses

T = torch.tensor


def test_logprobs_and_entropy():
    """logits [0, ln 3] -> p = [1/4, 3/4]; log p(1) = ln 0.75. Uniform over 4 -> H = ln 4."""
    logits = T([[[0.0, math.log(3)]]])
    assert losses.logprobs_from_logits(logits, T([[1]])).item() == pytest.approx(math.log(0.75))
    assert losses.entropy_from_logits(torch.zeros(1, 1, 4)).item() == pytest.approx(math.log(4))


def test_kl_estimators():
    """logp = ln .5, ref = ln .25: r = ref - logp = -ln 2.
    k1 = ln 2 = 0.6931; k2 = (ln 2)^2 / 2 = 0.2402; k3 = e^-ln2 - 1 + ln 2 = 0.5 - 1 + 0.6931 = 0.1931."""
    logp, ref = T([math.log(0.5)]), T([math.log(0.25)])
    assert losses.kl_estimate(logp, ref, "k1").item() == pytest.approx(0.693147, abs=1e-5)
    assert losses.kl_estimate(logp, ref, "k2").item() == pytest.approx(0.240227, abs=1e-5)
    assert losses.kl_estimate(logp, ref, "k3").item() == pytest.approx(0.193147, abs=1e-5)
    with pytest.raises(ValueError):
        losses.kl_estimate(logp, ref, "k4")


def test_shape_rewards():
    """score 1, kl [.1, .2, pad], coef .5: [-0.05, -0.1 + 1, 0]; clip 0.5 caps the score at 0.5."""
    mask = T([[1.0, 1.0, 0.0]])
    r = losses.shape_rewards(T([1.0]), T([[0.1, 0.2, 0.3]]), mask, kl_coef=0.5)
    assert r.tolist()[0] == pytest.approx([-0.05, 0.9, 0.0])
    r = losses.shape_rewards(T([1.0]), T([[0.1, 0.2, 0.3]]), mask, kl_coef=0.5, clip=0.5)
    assert r.tolist()[0] == pytest.approx([-0.05, 0.4, 0.0])


def test_gae_full_and_padded():
    """Row 1, gamma 1, lam .5, r = [0, 0, 1], V = [.5, .6, .7]:
    d2 = 1 - .7 = .3, A2 = .3; d1 = .7 - .6 = .1, A1 = .1 + .5 * .3 = .25; d0 = .6 - .5 = .1, A0 = .1 + .5 * .25 = .225.
    Row 2, gamma .9, lam 1, r = [0, 2, pad], V = [1, 1, pad]: A1 = 2 - 1 = 1; A0 = .9 * 1 - 1 + .9 * 1 = .8."""
    adv, ret = losses.gae(T([[0.0, 0.0, 1.0]]), T([[0.5, 0.6, 0.7]]), T([[1.0, 1.0, 1.0]]), gamma=1.0, lam=0.5)
    assert adv.tolist()[0] == pytest.approx([0.225, 0.25, 0.3])
    assert ret.tolist()[0] == pytest.approx([0.725, 0.85, 1.0])
    adv, ret = losses.gae(T([[0.0, 2.0, 99.0]]), T([[1.0, 1.0, 99.0]]), T([[1.0, 1.0, 0.0]]), gamma=0.9, lam=1.0)
    assert adv.tolist()[0] == pytest.approx([0.8, 1.0, 0.0])
    assert ret.tolist()[0] == pytest.approx([1.8, 2.0, 0.0])


def test_masked_whiten():
    """[1, 2, 3, pad]: mean 2, unbiased var 1 -> [-1, 0, 1, 0]."""
    out = losses.masked_whiten(T([[1.0, 2.0, 3.0, 100.0]]), T([[1.0, 1.0, 1.0, 0.0]]))
    assert out.tolist()[0] == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-4)


def test_policy_loss_clipping():
    """ratio 1.5, A = 1, eps .2: max(-1.5, -1.2) = -1.2 (clipped).
    ratio 1.5, A = -1: max(1.5, 1.2) = 1.5 (not clipped); dual clip 1.4 caps it at 1.4.
    ratio .5, A = -1: max(.5, .8) = .8 (clipped)."""
    mask = T([[1.0]])
    loss, st = losses.policy_loss(T([[math.log(1.5)]]), T([[0.0]]), T([[1.0]]), mask, clip=0.2)
    assert loss.item() == pytest.approx(-1.2) and st["clipfrac"] == 1.0 and st["ratio_mean"] == pytest.approx(1.5)
    # approx KL (k3 of the ratio): 1.5 - 1 - ln 1.5 = 0.0945
    assert st["approx_kl"] == pytest.approx(0.5 - math.log(1.5), abs=1e-6)
    loss, st = losses.policy_loss(T([[math.log(1.5)]]), T([[0.0]]), T([[-1.0]]), mask, clip=0.2)
    assert loss.item() == pytest.approx(1.5) and st["clipfrac"] == 0.0
    loss, _ = losses.policy_loss(T([[math.log(1.5)]]), T([[0.0]]), T([[-1.0]]), mask, clip=0.2, dual_clip=1.4)
    assert loss.item() == pytest.approx(1.4)
    loss, st = losses.policy_loss(T([[math.log(0.5)]]), T([[0.0]]), T([[-1.0]]), mask, clip=0.2)
    assert loss.item() == pytest.approx(0.8) and st["clipfrac"] == 1.0


def test_value_loss_clipping():
    """V = 2, V_old = 1, R = 3, eps .5: unclipped (2-3)^2 = 1; clipped V = 1.5, (1.5-3)^2 = 2.25; 0.5 * 2.25."""
    loss, st = losses.value_loss(T([[2.0]]), T([[1.0]]), T([[3.0]]), T([[1.0]]), clip=0.5)
    assert loss.item() == pytest.approx(1.125) and st["vf_clipfrac"] == 1.0
    loss, _ = losses.value_loss(T([[2.0]]), T([[1.0]]), T([[3.0]]), T([[1.0]]), clip=None)
    assert loss.item() == pytest.approx(0.5)


def test_explained_variance():
    mask = T([[1.0, 1.0, 1.0]])
    assert losses.explained_variance(T([[1.0, 2.0, 3.0]]), T([[1.0, 2.0, 3.0]]), mask) == pytest.approx(1.0)
    assert losses.explained_variance(T([[2.0, 2.0, 2.0]]), T([[1.0, 2.0, 3.0]]), mask) == pytest.approx(0.0)


def test_kl_controllers():
    """coef .1, target 6, horizon 100, 10 steps: KL 12 -> error clipped to .2 -> x1.02; KL 3 -> -.2 -> x0.98."""
    c = losses.AdaptiveKLController(0.1, target=6, horizon=100)
    c.update(12.0, 10)
    assert c.value == pytest.approx(0.102)
    c = losses.AdaptiveKLController(0.1, target=6, horizon=100)
    c.update(3.0, 10)
    assert c.value == pytest.approx(0.098)
    f = losses.FixedKLController(0.05)
    f.update(100.0, 10)
    assert f.value == 0.05
    c2 = losses.AdaptiveKLController(1.0, 1, 1)
    c2.load_state_dict(c.state_dict())
    assert c2.value == c.value


def test_response_mask_keeps_the_first_eos_and_nothing_after():
    """EOS = 2. [5, 2, 7, 2]: tokens up to and including the first EOS -> [1, 1, 0, 0], ended.
    [5, 6, 7, 8]: no EOS -> all four, not ended. [2, 9, 9, 9]: EOS first -> [1, 0, 0, 0], ended."""
    mask, ended = losses.response_mask(T([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]]), eos_token_id=2)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def test_token_mean_over_the_whole_minibatch():
    """A minibatch of 3 response tokens, x = [1, 2 | 3], cut into micro-batches [[1, 2]] and [[3, pad]]:
    with num_tokens 3 each gives its sum over 3 (3/3 = 1 and 3/3 = 1), adding up to the minibatch's mean 2.
    Each micro-batch's own mean would give 1.5 and 3 (their mean, 2.25, weights the short one's token double)."""
    a = losses.token_mean(T([[1.0, 2.0]]), T([[1.0, 1.0]]), 3)
    b = losses.token_mean(T([[3.0, 99.0]]), T([[1.0, 0.0]]), 3)
    assert (a + b).item() == pytest.approx(2.0)
    assert losses.token_mean(T([[3.0, 99.0]]), T([[1.0, 0.0]])).item() == pytest.approx(3.0)  # no count: the mean


def test_policy_and_value_losses_over_a_token_count():
    """policy: ratio 1 everywhere, A = [1, 3] -> per-token losses [-1, -3]; over num_tokens 4: -4/4 = -1.
    value: V = [0, 0], R = [2, 4], no clipping -> 0.5 * (4 + 16) / 4 = 2.5."""
    mask = T([[1.0, 1.0]])
    loss, _ = losses.policy_loss(T([[0.0, 0.0]]), T([[0.0, 0.0]]), T([[1.0, 3.0]]), mask, num_tokens=4)
    assert loss.item() == pytest.approx(-1.0)
    loss, _ = losses.value_loss(T([[0.0, 0.0]]), T([[0.0, 0.0]]), T([[2.0, 4.0]]), mask, clip=None, num_tokens=4)
    assert loss.item() == pytest.approx(2.5)
