"""`rlhf plan` and `rlhf run --plan-check`: the memory estimate's parts by hand, its refusals, and its estimate
against the peak memory measured on this project's CPU runs (the tiny model and SmolLM2 on one process; ZeRO-2
and ZeRO-3 on two processes are checked in tests/distributed/test_zero.py), within 25%."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, write_yaml

GIB = 1024**3


def test_parameter_counts_of_known_shapes_match_the_published_models():
    from pipeline.plan import KNOWN, Shape

    counts = {name: Shape(**shape).params for name, shape in KNOWN.items()}
    assert counts == {"meta-llama/Llama-2-7b-hf": 6_738_415_616, "meta-llama/Llama-2-13b-hf": 13_015_864_320,
                      "meta-llama/Llama-2-70b-hf": 68_976_648_192}
    # LoRA r=16 on q/k/v/o of Llama-2-7B: 32 layers x 4 projections x 16 x (4096 + 4096)
    assert Shape(**KNOWN["meta-llama/Llama-2-7b-hf"]).lora_params(16, ["q_proj", "k_proj", "v_proj", "o_proj"]) \
        == 32 * 4 * 16 * 8192


def test_zero_stages_divide_the_model_states_as_by_hand():
    """Full fine-tuning in bf16 of 7B on 8 processes: 2 bytes of weights, 4 of fp32 master weights, 2 of
    gradients, 8 of Adam moments per parameter; ZeRO-1 shards master weights and moments, ZeRO-2 also the
    gradients, ZeRO-3 also the weights; offload moves the moments (and ZeRO-3's weights) off the GPU."""
    from pipeline.plan import KNOWN, Shape, Work, estimate

    s = Shape(**KNOWN["meta-llama/Llama-2-7b-hf"])
    P, w = s.params, Work(s, "sft", s.params)
    want = {0: (2 * P, 4 * P, 2 * P, 8 * P), 1: (2 * P, 4 * P / 8, 2 * P, 8 * P / 8),
            2: (2 * P, 4 * P / 8, 2 * P / 8, 8 * P / 8), 3: (2 * P / 8, 4 * P / 8, 2 * P / 8, 8 * P / 8)}
    for zero, (weights, master, grads, adam) in want.items():
        parts = estimate(w, zero, False, 8, "bf16", on_cpu=False)
        got = (parts["weights"], parts["master weights"], parts["gradients"], parts["optimizer states"])
        assert got == pytest.approx((weights, master, grads, adam)), zero
        assert parts["runtime"] == 1.0 * GIB
    off = estimate(w, 3, True, 8, "bf16", on_cpu=False)
    assert off["optimizer states"] == 0 and off["weights"] == pytest.approx(P / s.layers * 2)


def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=ROOT, capture_output=True, text=True,
                          check=False, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, timeout=900)


def test_plan_command_says_what_fits_on_8_gpus_and_what_does_not():
    res = _cli("plan", "configs/examples/llama-13b-gpus.yaml", "--gpus", "8", "--gpu-memory", "80GB")
    assert res.returncode == 0, res.stderr
    out = res.stdout
    assert "per device: 80.0 GiB, 8 process(es)" in out
    for stage in ("sft (sft, bf16)", "reward (reward, bf16)", "ppo (ppo, bf16)"):
        assert stage in out
    assert "<- fastest that fits" in out and "too big" in out
    as_json = json.loads(_cli("plan", "configs/examples/llama-13b-gpus.yaml", "--gpus", "8", "--json").stdout)
    sft = next(r for r in as_json if r["stage"] == "sft")
    zero0 = next(o for o in sft["options"] if o["zero"] == 0 and not o["offload"])
    assert zero0["bytes"] > 80 * GIB  # 13B full fine-tuning: 16 bytes a parameter do not fit on one GPU unsharded
    assert sft["best"]["bytes"] <= 80 * GIB
    # one 24 GB GPU: 13B full fine-tuning fits nowhere; exit 1 naming the stages
    res = _cli("plan", "configs/examples/llama-13b-gpus.yaml", "--gpus", "1", "--gpu-memory", "24GB")
    assert res.returncode == 1 and "does not fit in 24.0 GiB per device: sft" in res.stderr
    assert "nothing fits" in res.stdout
    bad = _cli("plan", "configs/examples/llama-13b-gpus.yaml", "--gpu-memory", "lots")
    assert bad.returncode == 2 and "--gpu-memory lots: expected a size such as 80GB" in bad.stderr


def test_plan_check_refuses_a_stage_that_cannot_fit_before_loading_anything(tmp_path):
    """70B with LoRA in fp32 on this CPU machine: about 260 GiB of weights per process; refused up front."""
    res = _cli("run", "configs/examples/llama-70b-nodes.yaml", "--run-dir", str(tmp_path / "run"), "--plan-check")
    assert res.returncode == 2, res.stdout + res.stderr
    assert "plan-check: not launched, a stage would not fit in memory" in res.stderr
    assert "sft: about" in res.stderr and "under ZeRO-0" in res.stderr
    assert not (tmp_path / "run").exists()


def _peak(run, stage) -> float:
    return json.loads((run / stage / "manifest.json").read_text())["metrics"]["memory/peak_rss_mib"] * 2**20


def _estimate(cfg_path, stage, prompt_tokens=64, procs=1, zero=0) -> float:
    from pipeline.config import load_pipeline
    from pipeline.plan import plan

    row = plan(load_pipeline(cfg_path), procs, 1, 1e15, on_cpu=True, only=[stage], prompt_tokens=prompt_tokens)[0]
    return next(o["bytes"] for o in row["options"] if o["zero"] == zero and not o["offload"])


def _prompt_tokens(model: str) -> int:
    from pipeline.data import read_prompts, resolve_data_path
    from pipeline.generation import chat_ids
    from pipeline.models import load_tokenizer, resolve

    tok = load_tokenizer(resolve(model))
    return max(len(chat_ids(tok, p)) for p in read_prompts(resolve_data_path("synthetic:prompts")))


# Each stage in its own process (as `rlhf run --stage` runs it), so that its peak is its own. Lengths are capped
# below the data's so every sequence reaches max_length, the length the estimate plans for.
TINY = [
    {"stage": "sft", "model": "tiny", "data": {"train": "synthetic:sft", "eval_fraction": 0}, "max_length": 32,
     "precision": "fp32", "optim": {"lr": 1e-3, "max_steps": 3, "batch_size": 16}},
    {"stage": "preferences", "data": {"path": "synthetic:preferences"}},
    {"stage": "reward", "model": "stage:sft", "preferences": "stage:preferences", "max_length": 32,
     "precision": "fp32", "optim": {"lr": 1e-3, "max_steps": 3, "batch_size": 16}},
    {"stage": "dpo", "policy": "stage:sft", "preferences": "stage:preferences", "max_length": 32,
     "precision": "fp32", "optim": {"lr": 1e-4, "max_steps": 3, "batch_size": 16}},
    {"stage": "ppo", "policy": "stage:sft", "reward": {"model": "stage:reward"}, "prompts": "synthetic:prompts",
     "eval_fraction": 0, "steps": 2, "value_model": "critic", "precision": "fp32",
     "rollout": {"prompts_per_step": 16, "max_new_tokens": 16}, "ppo": {"minibatch_size": 8, "micro_batch_size": 8}},
]
SMOL = [
    {"stage": "sft", "name": "smol_sft", "model": "smollm2-135m-instruct", "data": {"train": "synthetic:sft",
     "eval_fraction": 0}, "max_length": 32, "precision": "fp32", "optim": {"lr": 1e-5, "max_steps": 2, "batch_size": 8}},
    {"stage": "ppo", "name": "smol_ppo", "policy": "smollm2-135m-instruct", "reward": {"rule": "feedback.synthetic:rule_score"},
     "prompts": "synthetic:prompts", "eval_fraction": 0, "steps": 1, "tuning": "lora", "precision": "fp32",
     "rollout": {"prompts_per_step": 8, "max_new_tokens": 16}, "ppo": {"minibatch_size": 8, "micro_batch_size": 8}},
]


@pytest.mark.parametrize("model,stages", [("tiny", TINY), ("smollm2-135m-instruct", SMOL)], ids=["tiny", "smollm2"])
def test_estimate_within_a_quarter_of_the_measured_peak_on_one_process(tmp_path, model, stages):
    run = tmp_path / "run"
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(run), "seed": 0, "stages": stages})
    prompt_tokens = _prompt_tokens(model)
    report = {}
    for st in stages:
        name = st.get("name", st["stage"])
        res = _cli("run", str(cfg), "--stage", name, "--plan-check", env={"WANDB_MODE": "disabled"})
        assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
        if st["stage"] == "preferences":
            continue
        assert f"plan-check: {name}: about" in res.stderr
        measured, estimated = _peak(run, name), _estimate(cfg, name, prompt_tokens)
        report[name] = (round(measured / 2**20), round(estimated / 2**20))
    print(report)
    for name, (measured, estimated) in report.items():
        assert abs(estimated - measured) <= 0.25 * measured, (name, "measured MiB, estimated MiB", report)


def test_plan_check_takes_the_zero_setting_the_stage_will_run_with():
    from types import SimpleNamespace

    from pipeline.plan import chosen

    ds = lambda name: SimpleNamespace(deepspeed=str(ROOT / "configs" / "deepspeed" / name))
    assert chosen(SimpleNamespace(deepspeed=None)) == (0, False)
    assert [chosen(ds(n)) for n in ("zero1.json", "zero2.json", "zero2-offload.json", "zero3.json",
                                    "zero3-offload.json")] == [(1, False), (2, False), (2, True), (3, False), (3, True)]


def test_a_model_whose_shape_the_plan_cannot_read_is_a_clear_error(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 8}}))
    cfg = write_yaml(tmp_path / "p.yaml", {"run_dir": str(tmp_path / "run"), "stages": [
        {"stage": "sft", "model": str(model), "data": {"train": "synthetic:sft"}}]})
    res = _cli("plan", str(cfg))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert f"{model / 'config.json'}: no 'hidden_size'" in res.stderr
