"""Model FLOPs utilisation (pipeline/mfu.py): 6·N·T for a training forward (forward + backward), 2·N·T for a forward
alone, T the tokens the attention mask keeps (a KV-cache generation step: its new positions); the matmul peak
measured once and read back from the cache."""

from __future__ import annotations

import json

import pytest

from pipeline.mfu import FlopCounter, matmul_peak, model_flops


def test_the_formulas_by_hand():
    # a 124M-parameter model (GPT-2 small) over a 2048-token sequence
    assert model_flops(124_000_000, 2048, training=True) == 1_523_712_000_000  # 6 * 124e6 * 2048
    assert model_flops(124_000_000, 2048, training=False) == 507_904_000_000  # 2 * 124e6 * 2048


def test_counted_forwards_of_the_tiny_model(tiny_path):
    import torch

    from pipeline.models import count_parameters, load_causal_lm

    model = load_causal_lm(tiny_path)
    n = count_parameters(model)[0]
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])  # one pad position: 7 tokens
    with FlopCounter(policy=model, same_again=model, nothing=None) as counter:
        model(input_ids=ids, attention_mask=mask).logits.sum().backward()  # training: 6 * N * 7
        with torch.no_grad():
            out = model(input_ids=ids, attention_mask=mask, use_cache=True)  # a forward alone: 2 * N * 7
            # a generation step: one new position per row, its mask covering the 4 cached ones too: 2 tokens
            model(input_ids=torch.tensor([[13], [14]]), attention_mask=torch.ones(2, 5, dtype=torch.long),
                  past_key_values=out.past_key_values, use_cache=True)
    model(input_ids=ids, attention_mask=mask)  # after the block: not counted
    assert counter.tokens == {"trained": 7, "forward": 9}
    assert counter.flops == 6 * n * 7 + 2 * n * 7 + 2 * n * 2
    metrics = counter.metrics(seconds=2.0)
    assert metrics["perf/model_flops_per_second"] == pytest.approx(counter.flops / 2.0)
    assert metrics["perf/mfu"] == pytest.approx(counter.flops / 2.0 / metrics["perf/peak_flops_per_second"], rel=1e-4)


def test_matmul_peak_is_measured_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_CACHE", str(tmp_path))
    monkeypatch.delenv("RLHF_MATMUL_PEAK", raising=False)
    measured = matmul_peak("cpu", "fp32")
    cache = tmp_path / "matmul_peak.json"
    (key, value), = json.loads(cache.read_text()).items()
    assert value == measured > 0 and key.startswith("cpu:") and "float32" in key
    cache.write_text(json.dumps({key: 123.0}))  # what a later call reads, without measuring again
    assert matmul_peak("cpu", "fp32") == 123.0
    monkeypatch.setenv("RLHF_MATMUL_PEAK", "5e11")
    assert matmul_peak("cpu", "fp32") == 5e11


def test_the_report_shows_a_stages_mfu():
    from pipeline.report.page import mfu

    assert mfu({"perf/mfu": 0.025, "perf/model_flops_per_second": 1e9, "perf/peak_flops_per_second": 4e10}) == \
        "2.50% (1.00 of a measured 40.0 GFLOP/s)"
    assert mfu({"train/loss": 1.0}) == "—"  # a stage from before MFU was measured
