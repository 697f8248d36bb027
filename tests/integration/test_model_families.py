"""PPO on model families that post-process their logits or draw random numbers in training mode: Gemma 2
(final_logit_softcapping), Granite (logits_scaling), Cohere (logit_scale), OPT (layerdrop; and OPT-350m's narrower LM
head input, which the value head reads too) and Mixtral (router jitter). Tiny random models built offline from their
configs, with the tiny model's tokenizer. The log-probs PPO trains on (old, new, reference) are the sampler's
own, and two training-mode forwards agree (before: 2.5-2.8 nats apart on these models; OPT skipped layers)."""

import pytest
import torch

from pipeline.rl import losses
from pipeline.rl.models import PPOModels
from pipeline.rl.ppo import ppo_step
from pipeline.rl.rollout import RewardFunction, generate, score_rollout
from tests.conftest import ppo_hyper, prepared

PROMPTS = ["Tell me about the river.", "Describe the sea and the sky.", "What is the forest like?",
           "Talk about the old stone bridge."]


def _config(family: str, tok):
    from transformers import CohereConfig, Gemma2Config, GraniteConfig, MixtralConfig, OPTConfig

    ids = dict(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
               bos_token_id=tok.bos_token_id, max_position_embeddings=256)
    llama_like = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, initializer_range=0.2, **ids)
    # post-processing strong enough to matter at this size: a soft cap of 3, logits divided by 4, scaled by 1/4
    return {"gemma2": lambda: Gemma2Config(head_dim=16, final_logit_softcapping=3.0, **llama_like),
            "granite": lambda: GraniteConfig(logits_scaling=4.0, **llama_like),
            "cohere": lambda: CohereConfig(logit_scale=0.25, **llama_like),
            "opt": lambda: OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                     word_embed_proj_dim=32, layerdrop=0.5, init_std=0.2, **ids),
            # OPT-350m's shape: the LM head reads a 16-wide projection of the 32-wide hidden state (the value head too)
            "opt_projected": lambda: OPTConfig(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=2,
                                               word_embed_proj_dim=16, init_std=0.2, **ids),
            # a mixture of experts whose router adds noise in training mode
            "mixtral": lambda: MixtralConfig(num_local_experts=2, num_experts_per_tok=1, router_jitter_noise=0.1,
                                             **llama_like)}[family]()


def _model(family: str, tiny_path):
    from transformers import AutoModelForCausalLM

    from pipeline.models import load_tokenizer

    tok = load_tokenizer(tiny_path)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(_config(family, tok), attn_implementation="eager"), tok


@pytest.mark.parametrize("family", ["gemma2", "granite", "cohere", "opt", "opt_projected", "mixtral"])
def test_log_probs_are_the_models_own_on_every_family(tiny_path, family):
    policy, tok = _model(family, tiny_path)
    models = PPOModels(policy, tok, "head", temperature=0.7)
    models.check_deterministic()  # raises when two training-mode forwards differ (OPT's layerdrop, left on)
    ro = generate(models, PROMPTS, 12, keep_scores=True, seeds=[1, 2, 3, 4])
    assert ro.mask.sum() > 20
    models.train(True)  # as PPO's update runs them
    with torch.no_grad():
        logp, _, _ = models.forward(ro)
        ref, _, _ = models.forward(ro, reference=True)
    models.train(False)
    assert (logp * ro.mask - ro.sampler_logp).abs().max().item() < 1e-5
    assert (ref * ro.mask - ro.sampler_logp).abs().max().item() < 1e-5


@pytest.mark.parametrize("family", ["gemma2", "opt"])
def test_first_update_sees_ratio_one_on_every_family(tiny_path, family):
    """At lr 0 every minibatch's importance ratio is exactly 1 and the approximate KL 0 (OPT with layerdrop 0.5 had
    a max |log ratio| of 0.33; Gemma 2's soft cap put 74% of tokens outside the clip range)."""
    policy, tok = _model(family, tiny_path)
    models = PPOModels(policy, tok, "head")
    ro = generate(models, PROMPTS * 2, 12, keep_scores=True, seeds=list(range(8)))
    score_rollout(models, ro, RewardFunction(rule="feedback.synthetic:rule_score"), None, 1)
    opt = prepared(models, lambda p: torch.optim.SGD(p, lr=0.0), 1.0)
    out = ppo_step(models, opt, ro, ppo_hyper(),
                   losses.FixedKLController(0.05), 1)
    assert out["ppo/ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert out["ppo/approx_kl"] == pytest.approx(0.0, abs=1e-7)
    assert out["ppo/clipfrac"] == 0.0
    assert out["ppo/kl"] == pytest.approx(0.0, abs=1e-5)


def test_a_random_layer_the_checks_do_not_know_is_refused(tiny_path):
    """A stochastic layer under a name disable_dropout does not know: PPO refuses to start, saying why."""
    from rlhf.errors import InvalidInput
    from pipeline.models import load_causal_lm, load_tokenizer

    policy = load_causal_lm(tiny_path)

    class Noise(torch.nn.Module):
        def forward(self, x):
            return x + torch.randn_like(x) * 1e-3 if self.training else x

    layer = policy.model.layers[0]
    mlp = layer.mlp
    layer.mlp = torch.nn.Sequential(mlp, Noise())
    models = PPOModels(policy, load_tokenizer(tiny_path), "head")
    with pytest.raises(InvalidInput, match="not deterministic in training mode"):
        models.check_deterministic()
