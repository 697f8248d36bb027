"""`rlhf report RUN_DIR`: one self-contained HTML page of a run, checked on the tiny run (configs/tiny.yaml) plus an
evaluate artifact written here in the evaluate stage's format (kind, outputs, metrics, the `evaluate` block and
samples.jsonl rows), since what the report promises is to read that contract.

What is checked: every stage has its section, every <img> is a real PNG, every piece of run text is escaped (a
`<script>` in a prompt stays text), a partial run renders with its stages marked, the page renders in headless
Chromium without console errors (the screenshot is what a user sees; RLHF_UPDATE_SCREENSHOT=1 refreshes
docs/report-screenshot.png), and with `tracking: {wandb: true}` the runner logs one offline wandb run per stage
under the run directory, grouped, with the report's plots.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest

from pipeline.cli import main
from tests.conftest import ROOT, write_yaml

XSS = "<script>alert(1)</script>"
CHROMIUM = Path("/usr/bin/chromium")
POLICIES = ("sft", "ppo", "few_shot")


def _eval_rows(n: int = 6) -> list[dict]:
    rows = []
    for i in range(n):
        prompt = f"Tell me about the river {i}. {XSS}" if i == 0 else (
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Describe the sea."}] if i == 1
            else f"Describe the garden {i}.")
        rows.append({
            "prompt": prompt,
            "responses": {"sft": "The river is dull.", "ppo": f"The river is lovely. <img src=x onerror=alert({i})>",
                          "few_shot": "Rivers & lakes <b>are</b> wet."},
            "scores": {p: {"reward": 0.1 * k - 0.2, "rule": 0.25 * k, "kl": None if p == "sft" else 0.5 * k,
                           "length": 6 + k, "eos": k != 2} for k, p in enumerate(POLICIES)},
            "verdicts": {"ppo": ("win", "tie", "loss")[i % 3], "few_shot": "abstain" if i == 2 else "loss"}})
    return rows


def write_eval_stage(run: Path, name: str = "evaluate") -> Path:
    """An eval artifact as the evaluate stage writes it (replacing one the tiny config may have produced)."""
    d = run / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir()
    metrics = {}
    for k, p in enumerate(POLICIES):
        metrics.update({f"eval/{p}/reward_mean": 0.3 * k - 0.3, f"eval/{p}/rule_reward_mean": 0.3 + 0.2 * k,
                        f"eval/{p}/kl": 0.0 if p == "sft" else 1.5 * k, f"eval/{p}/response_length": 8.0 + k,
                        f"eval/{p}/eos_rate": 1.0 - 0.1 * k, f"eval/{p}/distinct_1": 0.2 + 0.01 * k,
                        f"eval/{p}/distinct_2": 0.4 + 0.01 * k})
    metrics.update({"eval/ppo/win_rate": 0.8625, "eval/ppo/win_rate_low": 0.72, "eval/ppo/win_rate_high": 0.94,
                    "eval/ppo/pairs": 39, "eval/few_shot/win_rate": 0.5375, "eval/few_shot/win_rate_low": 0.39,
                    "eval/few_shot/win_rate_high": 0.68, "eval/few_shot/pairs": 38, "time/seconds": 12.5})
    policies = {"sft": {"ref": "stage:sft", "kind": "artifact", "trainable": 287104, "parameters": 287104,
                        "train_seconds": 5.1, "peak_rss_mib": 610.2, "eval_loss": 1.287, "tuning": "full"},
                "ppo": {"ref": "stage:ppo", "kind": "artifact", "trainable": 287104, "parameters": 287104,
                        "train_seconds": 9.5, "peak_rss_mib": 593.1},
                "few_shot": {"ref": "few-shot base (k=3)", "kind": "few_shot", "trainable": 0}}
    ppo = json.loads((run / "ppo" / "manifest.json").read_text())  # built with the same code, just after PPO
    manifest = {"schema_version": 1, "stage": name, "kind": "eval", "status": "complete",
                "created_at": ppo["created_at"], "config_hash": "0", "inputs": {},
                "outputs": {"samples": "samples.jsonl", "table": "table.csv"}, "metrics": metrics,
                "counts": {"prompts": 39, "policies": 3}, "versions": ppo["versions"], "git_sha": ppo["git_sha"],
                "evaluate": {"policies": policies, "baseline": "sft", "reference": "sft",
                             "judge": {"name": "rule", "type": "rule", "rule": "feedback.synthetic:rule_score"},
                             "prompts": 39, "sampling": {"temperature": 1.0, "top_p": 1.0, "max_new_tokens": 20}}}
    (d / "manifest.json").write_text(json.dumps(manifest))
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _eval_rows()))
    (d / "table.csv").write_text("prompt,policy,response\n")
    write_yaml(d / "config.yaml", {"seed": 0, "tracking": {"wandb": False}, "stage": "evaluate", "name": name,
                                   "policies": {"sft": "stage:sft", "ppo": "stage:ppo"},
                                   "prompts": f"synthetic:prompts {XSS}", "reward_model": "stage:reward"})
    return d


@pytest.fixture(scope="module")
def run(tiny_run, tmp_path_factory) -> Path:
    """A copy of the tiny run (without weights) with an evaluate stage and a rejected row holding markup."""
    run = tmp_path_factory.mktemp("report") / "run"
    skip = shutil.ignore_patterns("model", "*.safetensors", "report.html", "wandb")
    for stage in ("sft", "preferences", "reward", "ppo", "evaluate"):  # configs/tiny.yaml's stages only: other
        shutil.copytree(tiny_run / stage, run / stage, ignore=skip)   # tests add stages to the shared tiny run
    write_eval_stage(run)
    prefs = json.loads((run / "preferences" / "manifest.json").read_text())
    prefs["counts"]["rejected_by_reason"] = {"empty response": 1, "chosen == rejected": 3}
    (run / "preferences" / "manifest.json").write_text(json.dumps(prefs))
    (run / "preferences" / "rejected.jsonl").write_text(json.dumps(
        {"where": "prefs.jsonl:3", "line": 3, "code": "empty", "reason": f"chosen is empty {XSS}",
         "row": {"prompt": XSS}}) + "\n")
    return run


@pytest.fixture(scope="module")
def page(run) -> str:
    assert main(["report", str(run)]) == 0
    return (run / "report.html").read_text(encoding="utf-8")


def _section(page: str, name: str) -> str:
    m = re.search(rf'<section id="stage-{name}" class=stage>(.*?)</section>', page, re.S)
    assert m, f"no section for stage {name}"
    return m.group(1)


def _stage_row(page: str, name: str) -> str:
    m = re.search(rf'<tr><td><a href="#stage-{name}">{name}</a>(.*?)</tr>', page, re.S)
    assert m, f"no row for stage {name} in the stage table"
    return m.group(1)


def test_the_first_screen_answers_whether_alignment_worked(page):
    """The verdict, then the evaluate stage (table, chart, answers), then the stages table and every other stage."""
    order = [page.index(mark) for mark in ("<header>", "<section id=verdict>", '<section id="stage-evaluate"',
                                           "<section id=stages>", '<section id="stage-sft"')]
    assert order == sorted(order), order
    verdict = re.search(r"<section id=verdict>(.*?)</section>", page, re.S).group(1)
    # the run's evaluate manifest (below): ppo's interval is above one half, few_shot's straddles it
    assert ('<span class="verdict win">win</span> ppo is better than sft: win rate 86% over 39 held-out prompts '
            "(95% interval 72%–94%)") in verdict
    assert '<span class="verdict tie">tie</span> few_shot is not distinguishable from sft' in verdict
    assert "KL to sft" in verdict and "rule 0.30 → 0.50" in verdict and "reward -0.30 → 0.00" in verdict


def test_every_stage_has_its_section_in_config_order(page):
    ids = re.findall(r'<section id="stage-([\w-]+)"', page)
    assert ids == ["evaluate", "sft", "preferences", "reward", "ppo"]  # evaluate first, under the verdict
    for name in ids:
        assert "complete" in _stage_row(page, name)
    assert "eval/loss" in _section(page, "sft") and "train/loss" in _section(page, "sft")
    reward = _section(page, "reward")
    assert "normalization" in reward and "calibration" in reward and "eval/accuracy" in reward
    ppo = _section(page, "ppo")
    assert "ppo_state" in ppo and "memory_per_process" in ppo and "Samples" in ppo and "final-eval" in ppo
    prefs = _section(page, "preferences")
    assert "chosen is empty" in prefs  # the rejected row with its reason, and the counts by reason, most first
    assert re.search(r"rejected because.*chosen == rejected</td><td>3</td>.*empty response</td><td>1</td>", prefs)
    assert "rlhf run report" in page
    assert re.search(r"git sha</th><td>[0-9a-f]{7,}", page)


def test_evaluate_section_shows_policies_win_rates_and_samples(page):
    ev = _section(page, "evaluate")
    for label in ("reward", "rule reward", "KL", "length", "EOS rate", "distinct-1", "distinct-2", "win rate",
                  "95% interval", "pairs", "trainable parameters", "training time (s)", "peak memory (MiB)",
                  "eval loss"):
        assert f"<th>{label}</th>" in ev, label
    assert "0.8625" in ev and "[0.72, 0.94]" in ev and "few-shot base (k=3)" in ev
    assert "Win rates against the baseline" in ev and ev.count("<img ") == 1
    assert ev.count("class=sample>") == 5  # the first 5 prompts
    assert ev.count("class=answer>") == 15  # each with every policy's answer
    assert 'class="verdict win"' in ev and 'class="verdict baseline"' in ev and 'class="verdict abstain"' in ev
    assert "system: Be brief.\nuser: Describe the sea." in ev  # a conversational prompt, as its messages


def test_every_image_is_a_real_png(page):
    from PIL import Image

    images = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == page.count("<img ") >= 15
    for b64 in images:
        data = base64.b64decode(b64, validate=True)
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
        with Image.open(io.BytesIO(data)) as im:
            assert im.format == "PNG" and im.size[0] >= 250 and im.size[1] >= 200
    assert _section(page, "ppo").count("<img ") >= 8  # loss, reward, KL, KL coefficient, clip, entropy, length, lr


def test_self_contained_and_every_piece_of_run_text_is_escaped(page):
    assert "<script" not in page.lower() and "http://" not in page and "https://" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 4  # prompt, config, rejected reason and row
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(0)&gt;" in page
    assert "<b>are</b>" not in page and "&lt;b&gt;are&lt;/b&gt;" in page
    assert "Rivers &amp; lakes" in page


def test_a_partial_run_renders_with_its_stages_marked(run, tmp_path):
    part = tmp_path / "partial"
    shutil.copytree(run, part)
    (part / "reward" / "manifest.json").unlink()  # killed before its manifest: incomplete
    shutil.rmtree(part / "ppo")  # PPO still running: only its work directory
    (part / ".ppo.partial").mkdir()
    shutil.copy(run / "ppo" / "config.yaml", part / ".ppo.partial" / "config.yaml")
    rows = (run / "ppo" / "metrics.jsonl").read_text().splitlines()[:5]
    (part / ".ppo.partial" / "metrics.jsonl").write_text("\n".join(rows) + "\n{\"step\": 6, \"ppo/kl\"")  # torn line
    shutil.rmtree(part / "evaluate")
    (part / ".sft.partial").mkdir()  # a rerun of sft killed early, beside the complete artifact
    out = tmp_path / "r.html"
    assert main(["report", str(part), "-o", str(out)]) == 0
    page = out.read_text()
    assert re.findall(r'<section id="stage-([\w-]+)"', page) == ["sft", "preferences", "reward", "ppo"]
    assert "incomplete" in _stage_row(page, "reward") and "in progress or killed" in _stage_row(page, "ppo")
    assert "complete" in _stage_row(page, "sft") and "a rerun is in progress or was killed" in _section(page, "sft")
    assert _section(page, "ppo").count("<img ") >= 5  # the curves so far, read from .ppo.partial
    assert "no manifest.json" in _section(page, "reward")


def test_deepspeed_manifests_render_with_memory_per_process(run, tmp_path):
    """Under DeepSpeed the manifests say how many processes ran, with which ZeRO stage, and each one's peak."""
    ds = tmp_path / "ds"
    shutil.copytree(run, ds)
    for name, extra in (("sft", {}), ("ppo", {"memory_per_process": {"peak_rss_mib": [590.1, 612.4]}})):
        m = json.loads((ds / name / "manifest.json").read_text())
        m["distributed"] = {"world_size": 2, "zero_stage": 3, **extra}
        m["metrics"].pop("memory/peak_rss_mib", None)
        (ds / name / "manifest.json").write_text(json.dumps(m))
    assert main(["report", str(ds)]) == 0
    page = (ds / "report.html").read_text()
    assert "<b>processes</b> 2 (ZeRO-3)" in _section(page, "sft")
    assert "612 MiB (per process: 590, 612)" in _section(page, "ppo") and "612 MiB" in _stage_row(page, "ppo")


def test_ai_labels_judge_agreement_and_a_stage_not_run_yet(tmp_path):
    run = tmp_path / "rlaif"
    d = run / "ai_preferences"
    d.mkdir(parents=True)
    judge = {"name": "rule", "type": "rule", "rule": "feedback.synthetic:rule_score",
             "stats": {"judged_pairs": 40, "judge_calls": 80, "labelled": 36, "tie": 2, "abstain": 2,
                       "position_consistency": 0.95}}
    (d / "manifest.json").write_text(json.dumps({
        "stage": "ai_preferences", "kind": "preferences", "status": "complete", "created_at": "2026-01-01T00:00:00Z",
        "metrics": {"judge/position_consistency": 0.95, "time/seconds": 0.8}, "source": "ai", "judge": judge,
        "counts": {"prompts": 10, "candidates": 40, "pairs": 36, "unlabelled": 2, "ties": 2},
        "outputs": {"train": "preferences.jsonl", "unlabelled": "unlabelled.jsonl"}}))
    rows = [{"prompt": "Describe the sea.", "a": "The sea <i>", "b": "x",
             "reason": f"abstain: both orders disagree {i}"} for i in range(2)]
    (d / "unlabelled.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_yaml(d / "config.yaml", {"stage": "ai_preferences", "policy": "stage:sft", "judge": "rule.yaml"})
    (run / "agreement.json").write_text(json.dumps({
        "pairs": 50, "accuracy": 0.92, "decided": 48, "cohen_kappa": 0.84, "tie_rate": 0.02, "abstain_rate": 0.02,
        "position_consistency": 0.96, "judge": {"name": "rule"}, "rows": []}))
    assert main(["report", str(run)]) == 0
    page = (run / "report.html").read_text()
    assert re.findall(r'<section id="stage-([\w-]+)"', page) == ["sft", "ai_preferences"]  # inputs first
    assert "not run yet" in _stage_row(page, "sft") and "read by ai_preferences" in _section(page, "sft")
    ai = _section(page, "ai_preferences")
    assert "AI labels" in ai and "feedback.synthetic:rule_score" in ai and "abstain: both orders disagree 1" in ai
    assert "<th>abstentions (unlabelled)</th><td>2</td>" in ai and "<th>position consistency</th><td>0.95</td>" in ai
    assert "The sea <i>" not in page and "The sea &lt;i&gt;" in page
    agreement = re.search(r"<section id=agreement>(.*?)</section>", page, re.S).group(1)
    assert "agreement.json" in agreement and "0.92" in agreement and "0.84" in agreement


def test_any_stage_samples_show_the_last_step_each_label_and_every_field(tmp_path):
    """The Samples section reads what a stage logged, not PPO's row shape: a stage (here a GRPO-like one) whose rows
    hold `completion` and `reward`, labelled held-out rows, and rows of earlier steps that are left out."""
    d = tmp_path / "run" / "grpo"
    d.mkdir(parents=True)
    (d / "manifest.json").write_text(json.dumps({"stage": "grpo", "kind": "policy", "status": "complete",
                                                 "created_at": "2026-01-01T00:00:00Z", "metrics": {}}))
    write_yaml(d / "config.yaml", {"stage": "grpo", "name": "grpo"})
    rows = [{"step": s, "prompt": f"prompt {s}.{i}", "completion": f"answer {s}.{i} {XSS}", "reward": 0.25 * i}
            for s in (10, 20) for i in range(7)]
    rows += [{"step": "held-out", "prompt": f"held {i}", "completion": f"kept {i}"} for i in range(7)]
    (d / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["report", str(tmp_path / "run")]) == 0
    section = _section((tmp_path / "run" / "report.html").read_text(), "grpo")
    table = section[section.index("<h3>Samples</h3>"):]
    assert "<th>step</th><th>prompt</th><th>completion</th><th>reward</th>" in table
    assert [f"answer 20.{i}" in table for i in range(7)] == [True] * 5 + [False] * 2  # the last step's first rows
    assert [f"kept {i}" in table for i in range(7)] == [True] * 5 + [False] * 2  # then the first of each label
    assert "answer 10." not in table and "<td>1.5</td>" not in table and "<td>1</td>" in table
    assert XSS not in table and "&lt;script&gt;" in table


def test_not_a_run_directory_is_a_usage_error(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert main(["report", str(tmp_path)]) == 1 and "no stages found" in capsys.readouterr().err


# --------------------------------------------------------------------------- headless Chromium


def _chromium() -> Path:
    """Debian's chromium, installed with apt-get when missing and we are root (as .ci/run does)."""
    if not CHROMIUM.exists() and shutil.which("apt-get") and os.geteuid() == 0:
        try:
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=300)
            subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], capture_output=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired):
            pass
    if not CHROMIUM.exists():
        pytest.skip("/usr/bin/chromium is missing and `apt-get install -y chromium` did not install it "
                    "(.ci/run installs it in CI)")
    return CHROMIUM


def _render(url: str, tmp: Path, shot: Path) -> subprocess.CompletedProcess:
    cmd = [str(_chromium()), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0", f"--screenshot={shot}",
           "--window-size=1280,2400", url]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=180)


def _console_errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "CONSOLE" in line or "Uncaught" in line]


def test_the_page_renders_in_headless_chromium_without_console_errors(run, page, tmp_path):
    from PIL import Image, ImageStat

    # the check can fail: a page whose script throws is caught by the same test
    bad = tmp_path / "bad.html"
    bad.write_text("<html><body><script>undefinedFunction()</script></body></html>")
    assert _console_errors(_render(bad.as_uri(), tmp_path, tmp_path / "bad.png").stderr)

    shot = tmp_path / "report.png"
    res = _render((run / "report.html").as_uri(), tmp_path, shot)
    assert res.returncode == 0, res.stderr[-2000:]
    assert not _console_errors(res.stderr), _console_errors(res.stderr)
    with Image.open(shot) as im:
        assert im.size == (1280, 2400)
        assert ImageStat.Stat(im.convert("L")).stddev[0] > 20  # text, tables and plots, not a blank page
    demo = os.environ.get("RLHF_UPDATE_SCREENSHOT")
    if demo:  # the docs' screenshot is the page a user gets: RLHF_UPDATE_SCREENSHOT=runs/quickstart (after make demo)
        assert main(["report", demo]) == 0
        real = tmp_path / "demo.png"
        res = _render((Path(demo) / "report.html").resolve().as_uri(), tmp_path, real)
        assert res.returncode == 0 and not _console_errors(res.stderr), res.stderr[-2000:]
        docs = ROOT / "docs" / "report-screenshot.png"
        with Image.open(real) as im:
            im.convert("RGB").crop((0, 0, 1280, 1500)).save(docs, optimize=True)
        assert docs.stat().st_size < 400_000


# --------------------------------------------------------------------------- wandb (offline)


def _wandb_records(path: Path):
    """The protobuf records of an offline run file (wandb's leveldb-style log: 7-byte file header, 32 KiB blocks,
    7-byte record headers: checksum, length, type FULL=1 FIRST=2 MIDDLE=3 LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = path.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        buf, pos = buf + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            buf = b""
            yield rec


def _offline_runs(run_dir: Path) -> dict[str, dict]:
    """{stage name: {"group", "id", "images": [media files], "keys": {logged keys}, "dirs": n}} of the offline runs
    under run_dir/wandb."""
    runs: dict[str, dict] = {}
    for d in sorted((run_dir / "wandb").glob("offline-run-*")):
        (f,) = d.glob("run-*.wandb")
        records = list(_wandb_records(f))
        for _ in range(1200):  # wandb-core may still be writing a run finished a moment ago: wait for its exit
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                break
            time.sleep(0.1)
            records = list(_wandb_records(f))
        rec = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        entry = runs.setdefault(rec.display_name, {"group": rec.run_group, "id": rec.run_id, "images": [],
                                                   "keys": set(), "dirs": 0})
        assert entry["id"] == rec.run_id and entry["group"] == rec.run_group
        entry["dirs"] += 1
        entry["keys"] |= {item.key or "/".join(item.nested_key) for r in records
                          if r.WhichOneof("record_type") == "history" for item in r.history.item}
        entry["images"] += [p.relative_to(d / "files").as_posix() for p in (d / "files").rglob("media/**/*.png")]
    return runs


@pytest.mark.slow
def test_wandb_offline_one_run_per_stage_under_the_run_dir_grouped_with_the_plots(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("WANDB_DIR", "WANDB_RUN_GROUP", "WANDB_NAME", "WANDB_RUN_ID"):
        monkeypatch.delenv(key, raising=False)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    run = tmp_path / "tracked"
    sets = ["tracking.wandb=true", "stages.sft.optim.max_steps=6", "stages.sft.optim.epochs=null",
            "stages.sft.optim.logging_steps=2", "stages.reward.optim.max_steps=4", "stages.reward.optim.epochs=null",
            "stages.reward.optim.logging_steps=2", "stages.ppo.steps=3",
            "stages.ppo.rollout.prompts_per_step=8", "stages.ppo.ppo.minibatch_size=8",
            "stages.ppo.ppo.micro_batch_size=8", "stages.ppo.max_eval_prompts=8"]
    args = ["run", str(ROOT / "configs" / "tiny.yaml"), "--run-dir", str(run)]
    for stage in ("sft", "preferences", "reward", "ppo"):
        args += ["--stage", stage]
    assert main([*args, *[a for s in sets for a in ("--set", s)]]) == 0
    assert not (cwd / "wandb").exists() and (run / "wandb").is_dir()
    runs = _offline_runs(run)
    assert set(runs) == {"sft", "preferences", "reward", "ppo"}, runs  # TRL stages, our PPO loop, a data stage
    assert {r["group"] for r in runs.values()} == {str(run)}
    assert len({r["id"] for r in runs.values()}) == 4
    assert {r["dirs"] for r in runs.values()} == {1}  # each stage's metrics and plots in one run, one directory
    for name in ("sft", "reward", "ppo"):
        assert any(img.startswith("media/images/report/") for img in runs[name]["images"]), runs[name]
        logged = {k[:-len("/_type")] for k in runs[name]["keys"] if k.startswith("report/") and k.endswith("/_type")}
        assert ("report/kl" if name == "ppo" else "report/loss") in logged, (name, sorted(logged))
    # each stage's training curves went to its own run (the HF callback would reuse the first stage's run)
    assert "train/loss" in runs["sft"]["keys"] and "train/loss" in runs["reward"]["keys"]
    assert "ppo/kl" in runs["ppo"]["keys"] and not any(k.startswith("ppo/") for k in runs["sft"]["keys"])

    # an evaluate stage's table goes to wandb too (log_to_wandb on the contract-format artifact)
    from pipeline.report import log_to_wandb

    d = write_eval_stage(run)
    (d / "config.yaml").write_text((d / "config.yaml").read_text().replace("wandb: false", "wandb: true"))
    assert log_to_wandb(run, "evaluate")
    ev = _offline_runs(run)["evaluate"]
    assert ev["group"] == str(run) and "media/images/report/win_rate" in " ".join(ev["images"])
    tables = [p for p in (run / "wandb").rglob("*.table.json")]
    assert tables and "win rate" in tables[0].read_text()


def test_numbers_are_written_as_numbers_never_with_an_exponent_from_ten_thousand_on():
    from pipeline.report.page import _fmt

    assert [_fmt(v) for v in (10434.8, 12567.0, 7560.1, 1234.5, 0.30459, 2e-5)] == \
        ["10,435", "12,567", "7560", "1234", "0.3046", "2e-05"]
