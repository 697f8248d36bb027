"""The SFT stage on the tiny model through the real CLI: it learns, saves a complete artifact that
reloads, skips when up to date, reruns when changed, and LoRA / freeze update only what they should."""

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from feedback.synthetic import NEGATIVE, POSITIVE
from pipeline import artifacts
from pipeline.cli import main
from pipeline.models import load_causal_lm, load_tokenizer
from tests.conftest import tiny_sft_block, write_yaml


def _run(tmp_path, blocks, *extra) -> tuple[int, Path]:
    cfg = {"run_dir": str(tmp_path / "run"), "seed": 0, "stages": blocks}
    path = write_yaml(tmp_path / "p.yaml", cfg)
    return main(["run", str(path), *extra]), tmp_path / "run"


def _weights(model_dir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(model_dir) / "model.safetensors"))


def test_full_sft_learns_saves_reloads_and_skips(tmp_path, tiny_path, capsys):
    block = tiny_sft_block(optim={"lr": 5e-3, "epochs": 5, "per_device_batch_size": 8})  # as configs/tiny.yaml
    code, run = _run(tmp_path, [block])
    assert code == 0
    art = artifacts.load_artifact(run / "sft", "policy")
    m = art.manifest
    assert m["metrics"]["eval/loss"] < 0.5 * m["metrics"]["eval/loss_initial"], m["metrics"]
    assert m["counts"] == {"rows_read": 600, "accepted": 600, "rejected": 0, "train": 540, "eval": 60}
    assert m["inputs"]["train_data"]["sha256"] and m["inputs"]["model"] == {"ref": "tiny"}
    assert (run / "sft" / "config.yaml").exists() and (run / "sft" / "metrics.jsonl").exists()
    logged = [json.loads(line) for line in (run / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any("train/loss" in row for row in logged) and any("eval/loss" in row for row in logged)
    assert not list(run.glob(".*.partial")), "no partial directories left behind"
    assert list((run / ".cache" / "datasets").iterdir()), "the tokenised rows are cached in the run directory"

    before, after = _weights(tiny_path), _weights(art.output("model"))
    assert all(not torch.equal(before[k], after[k]) for k in before if "layers.3.mlp" in k)

    # the saved model reloads without the trainer and generates
    tok = load_tokenizer(str(art.output("model")))
    model = load_causal_lm(str(art.output("model")))
    ids = tok.apply_chat_template([{"role": "user", "content": "Tell me about the river."}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=16, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert tok.eos_token_id in out.tolist(), "learnt to end its turn"
    words = tok.decode(out, skip_special_tokens=True).lower().replace(",", " ").replace(".", " ").split()
    assert set(words) & set(POSITIVE + NEGATIVE), "learnt the task's format: describes with adjectives"

    out = capsys.readouterr().out
    assert "[sft] step 5/" in out and "{'loss'" not in out, "trainer logs as readable lines, not dicts"
    created = m["created_at"]
    assert _run(tmp_path, [block])[0] == 0
    assert "up to date, skipped" in capsys.readouterr().out
    assert artifacts.read_manifest(run / "sft")["created_at"] == created

    assert _run(tmp_path, [block], "--set", "stages.sft.optim.max_steps=5", "--set", "stages.sft.optim.epochs=null")[0] == 0
    assert "config changed: rerunning" in capsys.readouterr().out
    m2 = artifacts.read_manifest(run / "sft")
    assert m2["config_hash"] != m["config_hash"]


def test_downstream_reruns_and_bad_inputs_are_refused(tmp_path, capsys):
    blocks = [tiny_sft_block(optim={"max_steps": 3}),
              tiny_sft_block(name="sft2", model="stage:sft", optim={"max_steps": 3})]
    # input stage never ran
    code, run = _run(tmp_path, blocks, "--stage", "sft2")
    assert code == 2 and "sft2.model: " in capsys.readouterr().err
    assert _run(tmp_path, blocks)[0] == 0
    first = artifacts.read_manifest(run / "sft2")
    assert first["inputs"]["model"]["manifest_hash"] == artifacts.manifest_hash(run / "sft")
    # forcing the upstream stage makes the downstream one rerun
    capsys.readouterr()
    assert _run(tmp_path, blocks, "--stage", "sft", "--force")[0] == 0
    assert _run(tmp_path, blocks)[0] == 0
    out = capsys.readouterr().out
    assert "[sft] up to date" in out and "[sft2] input 'model' changed: rerunning" in out
    # wrong kind, then incomplete
    manifest = run / "sft" / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "kind": "preferences"}))
    assert _run(tmp_path, blocks, "--stage", "sft2", "--force")[0] == 1
    assert "is a 'preferences' artifact" in capsys.readouterr().err
    manifest.unlink()
    assert _run(tmp_path, blocks, "--stage", "sft2", "--force")[0] == 1
    assert "the artifact is incomplete" in capsys.readouterr().err
    assert artifacts.read_manifest(run / "sft2")["created_at"], "the previous good sft2 is still there"


def test_lora_adapter_trains_only_the_adapter(tmp_path, tiny_path):
    block = tiny_sft_block(tuning="lora", lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
                                                "merge": False}, optim={"lr": 1e-2, "epochs": 1})
    code, run = _run(tmp_path, [block])
    assert code == 0
    art = artifacts.load_artifact(run / "sft", "policy")
    model_dir = art.output("model")
    assert art.manifest["model"]["adapter"] is True
    assert art.manifest["model"]["trainable"] < art.manifest["model"]["parameters"] / 5
    assert not (model_dir / "model.safetensors").exists()
    adapter = load_file(str(model_dir / "adapter_model.safetensors"))
    assert adapter and all("lora_" in k for k in adapter)
    assert all(("q_proj" in k or "v_proj" in k) for k in adapter)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items()), "lora_B starts at zero"
    # the adapter loads on its base; the base weights are untouched
    model = load_causal_lm(str(model_dir), adapter="keep")
    assert hasattr(model, "peft_config")
    base = _weights(tiny_path)
    merged = {k.replace("base_model.model.", "").replace(".base_layer", ""): v
              for k, v in model.merge_and_unload().state_dict().items()}
    for k, v in base.items():
        changed = not torch.equal(v, merged[k])
        assert changed == (("q_proj" in k or "v_proj" in k) and "layers" in k), k


def test_freeze_mode_keeps_lower_layers_and_embeddings(tmp_path, tiny_path):
    block = tiny_sft_block(tuning="freeze", freeze_layers=2, optim={"epochs": 1})
    code, run = _run(tmp_path, [block])
    assert code == 0
    after = _weights(artifacts.load_artifact(run / "sft", "policy").output("model"))
    before = _weights(tiny_path)
    for k in before:
        frozen = "embed_tokens" in k or any(f"layers.{i}." in k for i in (0, 1))
        assert torch.equal(before[k], after[k]) == frozen, k


def test_bad_data_row_stops_before_training(tmp_path, capsys):
    data = tmp_path / "d.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    code, run = _run(tmp_path, [tiny_sft_block(data={"train": str(data)})])
    assert code == 1
    err = capsys.readouterr().err
    assert f"{data}:1: no non-empty assistant message" in err and "1 rows: 0 valid, 1 invalid" in err
    assert not (run / "sft").exists()


def test_rows_trl_drops_are_listed_and_not_counted_as_trained(tmp_path):
    """44 rows, 4 of them with a prompt long enough that truncation to max_length 64 leaves no assistant token: TRL
    drops those silently, so the stage lists them in skipped.jsonl and counts what TRL really uses (issue 20, 3)."""
    rows = [{"prompt": f"Tell me about the river {i}.", "completion": "The river is calm."} for i in range(40)]
    rows += [{"prompt": "Tell me about the river. " * 20 + f"({i})", "completion": "The river is calm."}
             for i in range(4)]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    block = tiny_sft_block(data={"train": str(data), "eval_fraction": 0.1}, max_length=64,
                           optim={"max_steps": 1, "per_device_batch_size": 4})
    code, run = _run(tmp_path, [block])
    assert code == 0
    m = artifacts.load_artifact(run / "sft", "policy").manifest
    skipped = [json.loads(x) for x in (run / "sft" / "skipped.jsonl").read_text().splitlines()]
    assert sorted(s["where"] for s in skipped) == [f"{data}:{i}" for i in (41, 42, 43, 44)]
    assert all("no assistant token within max_length 64" in s["reason"] for s in skipped)
    held = sum(s["split"] == "eval" for s in skipped)
    assert m["counts"]["train"] + m["counts"]["eval"] == 40 and m["counts"]["skipped"] == 4
    assert m["counts"]["eval"] == 4 - held and m["outputs"]["skipped"] == "skipped.jsonl"
    assert not any(k.startswith("dropped_by_trl") for k in m["counts"]), m["counts"]  # our count is TRL's
