"""`rlhf monitor DB`: the tiny run's policies answer held-out prompts, the answers go into a real traffic log
(feedback/traffic.py, as the server writes it), and the monitor scores them with the tiny run's reward model, the
synthetic task's rule and the rule judge, against the tiny run's evaluate stage.

What is checked: a policy swapped for a worse one halfway (PPO, then SFT, served under the same name) fires the drift
alerts in the windows after the swap only, and PPO all along fires none; answers the reward model prefers but the rule
scores lower fire the hacking alert, honest answers do not; a second run scores only the new rows (the rule counts its
calls); the page renders in headless Chromium without console errors and `rlhf report` shows the alerts; bad input
is a clear usage error (exit 2).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
from pathlib import Path

import pytest

from feedback import synthetic
from feedback.traffic import Completion, TrafficLog
from pipeline.cli import main
from tests import helpers
from tests.conftest import ROOT
from tests.integration.test_report import _console_errors, _render

WINDOW = 39  # the tiny run's evaluate stage holds 39 held-out prompts: one round of them a window


@pytest.fixture(scope="module")
def answers(tiny_run) -> dict:
    """{(policy, seed): {"texts", "ids", "eos"}}: the tiny run's PPO and SFT policies answer the evaluate stage's
    held-out prompts with seeds other than its own (the same distribution as its PPO answers, for PPO)."""
    from pipeline.stages.evaluate import Policy, SamplingConfig, sample_policies

    prompts = [json.loads(line)["prompt"] for line in (tiny_run / "evaluate" / "samples.jsonl").open()]
    policies = [Policy(n, str(tiny_run / n / "model"), {}) for n in ("ppo", "sft")]
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=20)  # the evaluate stage's settings (configs/tiny.yaml)
    out = {"prompts": prompts}
    for seed in (1, 2, 3, 4):
        for name, s in sample_policies(policies, prompts, sampling, seed).items():
            out[name, seed] = s
    return out


def _log(path: Path, run: Path, blocks, prompts, t0: float = 1.7e9) -> TrafficLog:
    """A traffic log of `blocks` [(answers, tag)]: each answers every prompt, recorded as the server records, one
    second apart, all served as the tiny run's ppo stage."""
    log = TrafficLog(path)
    k = sum(1 for _ in log.completions())
    for s, tag in blocks:
        for i, prompt in enumerate(prompts):
            log.record(Completion(id=f"chatcmpl-{tag}-{i}", model="ppo", stage=str(run / "ppo"),
                                  messages=[{"role": "user", "content": prompt}], response=s["texts"][i],
                                  finish_reason="stop" if s["eos"][i] else "length", prompt_tokens=12,
                                  completion_tokens=len(s["ids"][i]), latency_ms=20.0 + i % 7,
                                  sampling={"temperature": 1.0}, created=t0 + k))
            k += 1
    return log


def _monitor(db, out, *extra) -> dict:
    assert main(["monitor", str(db), "-o", str(out), *extra]) == 0
    return json.loads((out / "monitor.json").read_text())


def test_a_policy_swapped_for_a_worse_one_fires_drift_and_unchanged_traffic_does_not(tiny_run, answers, tmp_path):
    prompts = answers["prompts"]
    scorers = ["--reward-model", str(tiny_run / "reward"), "--rule", "feedback.synthetic:rule_score", "--judge",
               str(ROOT / "configs" / "judges" / "rule.yaml"), "--baseline", str(tiny_run / "evaluate"),
               "--window", str(WINDOW)]
    swapped = [(answers["ppo", 1], "a"), (answers["ppo", 2], "b"), (answers["sft", 3], "c"), (answers["sft", 4], "d")]
    _log(tmp_path / "swapped.db", tiny_run, swapped, prompts).close()
    r = _monitor(tmp_path / "swapped.db", tmp_path / "swapped", *scorers)
    assert r["baseline"]["policy"] == "ppo" and r["baseline"]["reference"] == "sft"  # found by the served stage name
    assert [w["volume"] for w in r["windows"]] == [WINDOW] * 4
    drift = {(a["window"], a["metric"]) for a in r["alerts"] if a["kind"] == "drift"}
    assert {(2, "reward"), (3, "reward")} <= drift and all(w >= 2 for w, _ in drift), r["alerts"]
    for a in r["alerts"]:
        assert a["p_value"] < a["threshold"] == 0.01 / r["drift"]["tests"] and a["ks"] > 0.3
    after = r["windows"][3]
    assert after["below_baseline_p10"]["reward"] > r["windows"][0]["below_baseline_p10"]["reward"] + 0.2
    assert after["reward"]["mean"] < r["windows"][0]["reward"]["mean"] and after["judge"]["mean"] < 0.7
    assert not any(a["kind"] == "hacking" for a in r["alerts"])  # the reward fell with the rule: no hacking
    assert r["hacking"]["reward"]["z"] < 0

    same = [(answers["ppo", s], f"s{s}") for s in (1, 2, 3, 4)]
    _log(tmp_path / "same.db", tiny_run, same, prompts).close()
    r = _monitor(tmp_path / "same.db", tmp_path / "same", *scorers)
    assert r["alerts"] == [] and r["drift"]["tests"] == 12  # 4 windows x reward, rule, length
    assert min(t["p_value"] for w in r["windows"] for t in w["drift"].values()) > r["drift"]["threshold"]
    page = (tmp_path / "same" / "monitor.html").read_text()
    assert "no alert" in page and "<script" not in page


def _gaming_answers(tiny_run) -> tuple[list, list]:
    """(honest, gaming) (prompt, response) pairs, 60 each: honest answers name the topic with two positive
    adjectives (rule 1.0); gaming ones leave the topic out ("I find it calm and lovely.", rule 0.8), which the tiny
    reward model does not mind. Measured, not assumed: the honest answers are those it scores below the gaming
    answers' median, the gaming ones those at or above it."""
    from reward.scoring import RewardScorer

    rng = random.Random(7)
    prompts = synthetic.prompts()
    honest = [(p, synthetic._describe(rng, synthetic.topic_of(p), "positive")) for p in prompts * 2]
    gaming = [(p, rng.choice(["I find it {} and {}.", "It feels {}, even {}."]).format(*rng.sample(
        synthetic.POSITIVE, 2))) for p in prompts * 2]
    scorer = RewardScorer.from_artifact(tiny_run / "reward")
    h = scorer.score(*zip(*honest))[1]
    g = scorer.score(*zip(*gaming))[1]
    tau = sorted(g)[len(g) // 2]
    low = [a for a, s in zip(honest, h) if s < tau]
    high = [a for a, s in zip(gaming, g) if s >= tau]
    assert len(low) >= 60 and len(high) >= 60, (f"the tiny reward model no longer scores {len(low)} honest answers "
                                                f"below the median of the topic-less ones ({tau:.3f})")
    return low[:60], high[:60]


def _pairs_log(path: Path, blocks: list[list[tuple]], t0: float = 1.7e9) -> None:
    log = TrafficLog(path)
    k = 0
    for block in blocks:
        for prompt, response in block:
            log.record(Completion(id=f"chatcmpl-{k}", model="ppo", stage="runs/x/ppo",
                                  messages=[{"role": "user", "content": prompt}], response=response,
                                  finish_reason="stop", prompt_tokens=12, completion_tokens=len(response.split()),
                                  latency_ms=15.0, created=t0 + k))
            # simulated users: thumbs up for what the rule rates fully pleasant and on topic
            log.add_feedback(f"chatcmpl-{k}", rating="up" if synthetic.rule_score(prompt, response) >= 0.9 else "down")
            k += 1
    log.close()


def test_reward_rising_while_the_rule_falls_fires_hacking_and_honest_traffic_does_not(tiny_run, tmp_path):
    honest, gaming = _gaming_answers(tiny_run)
    scorers = ["--reward-model", str(tiny_run / "reward"), "--rule", "feedback.synthetic:rule_score",
               "--window", "30"]
    _pairs_log(tmp_path / "gamed.db", [honest, gaming])
    r = _monitor(tmp_path / "gamed.db", tmp_path / "gamed", *scorers)
    hack = [a for a in r["alerts"] if a["kind"] == "hacking"]
    assert len(hack) == 1 and (hack[0]["first_window"], hack[0]["last_window"]) == (0, 3)
    assert hack[0]["reward"]["to"] > hack[0]["reward"]["from"] and hack[0]["reward"]["p_up"] < 0.01
    assert hack[0]["falling"]["rule"]["from"] == 1.0 and hack[0]["falling"]["rule"]["to"] == pytest.approx(0.8)
    assert hack[0]["falling"]["thumbs_up_rate"]["to"] == 0.0
    assert r["windows"][0]["thumbs"]["up_rate"] == 1.0 and r["windows"][3]["thumbs"]["up_rate"] == 0.0

    rng = random.Random(3)
    mixed = [(p, synthetic._describe(rng, synthetic.topic_of(p), rng.choice(["positive", "negative", "mixed"])))
             for p in synthetic.prompts()[:120]]
    _pairs_log(tmp_path / "honest.db", [mixed[:60], mixed[60:]])
    r = _monitor(tmp_path / "honest.db", tmp_path / "honest", *scorers)
    assert r["alerts"] == [] and r["hacking"]["alert"] is False and set(r["hacking"]["signals"]) == {
        "rule", "thumbs_up_rate"}


def test_a_second_run_scores_only_the_new_rows(tiny_run, answers, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_TRUSTED_MODULES", "tests.helpers")
    prompts, db, out = answers["prompts"], tmp_path / "t.db", tmp_path / "mon"
    args = ["--rule", "tests.helpers:counted_rule", "--reward-model", str(tiny_run / "reward"), "--window", "20"]
    _log(db, tiny_run, [(answers["ppo", 1], "a")], prompts).close()
    helpers.RULE_CALLS["n"] = 0
    r = _monitor(db, out, *args)
    assert helpers.RULE_CALLS["n"] == WINDOW and r["scorers"]["rule"]["scored"] == WINDOW
    assert r["scorers"]["reward"]["scored"] == WINDOW and r["scorers"]["reward"]["cached"] == 0
    first = {w["index"]: w["rule"]["mean"] for w in r["windows"]}

    _log(db, tiny_run, [(answers["ppo", 2], "b")], prompts[:10]).close()  # 10 more rows
    helpers.RULE_CALLS["n"] = 0
    r = _monitor(db, out, *args)
    assert helpers.RULE_CALLS["n"] == 10
    for k in ("rule", "reward"):
        assert (r["scorers"][k]["scored"], r["scorers"][k]["cached"]) == (10, WINDOW)
    assert r["counts"]["completions"] == WINDOW + 10 and r["windows"][0]["rule"]["mean"] == first[0]
    helpers.RULE_CALLS["n"] = 0
    assert _monitor(db, out, *args)["scorers"]["rule"]["scored"] == 0 and helpers.RULE_CALLS["n"] == 0
    # another rule is another scorer identity: every row is scored again, none of the old scores kept
    r = _monitor(db, out, "--rule", "feedback.synthetic:rule_score", "--window", "20")
    assert (r["scorers"]["rule"]["scored"], r["scorers"]["rule"]["identity_changed"]) == (WINDOW + 10, True)


def test_the_page_renders_in_chromium_and_rlhf_report_shows_the_alerts(tiny_run, answers, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "evaluate", run / "evaluate")  # a run directory: the report needs a stage
    blocks = [(answers["ppo", 1], "a"), (answers["ppo", 2], "b"), (answers["sft", 3], "c"), (answers["sft", 4], "d")]
    log = _log(tmp_path / "t.db", tiny_run, blocks, answers["prompts"])
    xss = "<script>alert(1)</script>"
    log.record(Completion(id=f"chatcmpl-{xss}", model=xss, stage=str(tiny_run / "ppo"),
                          messages=[{"role": "user", "content": xss}], response=xss, finish_reason="length",
                          completion_tokens=20, latency_ms=90.0, created=1.7e9 + 200))
    for i in range(0, 60, 3):
        log.add_feedback(f"chatcmpl-{'a' if i < WINDOW else 'c'}-{i % WINDOW}", rating="up" if i < 40 else "down")
    log.close()
    r = _monitor(tmp_path / "t.db", run / "monitor", "--reward-model", str(tiny_run / "reward"), "--rule",
                 "feedback.synthetic:rule_score", "--baseline", str(tiny_run / "evaluate"), "--baseline-policy", "ppo",
                 "--window", str(WINDOW))
    assert r["alerts"] and r["windows"][-1]["partial"] and r["windows"][-1]["truncation_rate"] == 1.0
    page = (run / "monitor" / "monitor.html").read_text()
    assert "<script" not in page  # the traffic's text (here a served model named like a script) is never markup
    assert "Content-Security-Policy" in page and page.count("<img") >= 6

    shot = tmp_path / "monitor.png"
    res = _render((run / "monitor" / "monitor.html").as_uri(), tmp_path, shot)
    assert res.returncode == 0 and not _console_errors(res.stderr), res.stderr[-2000:]
    from PIL import Image, ImageStat

    with Image.open(shot) as im:
        assert ImageStat.Stat(im.convert("L")).stddev[0] > 20  # text, tables and plots, not a blank page
        if os.environ.get("RLHF_UPDATE_MONITOR_SCREENSHOT"):
            im.convert("RGB").crop((0, 0, 1280, 1500)).save(ROOT / "docs" / "monitor-screenshot.png", optimize=True)

    assert main(["report", str(run)]) == 0
    report = (run / "report.html").read_text()
    section = report[report.index("<section id=monitor>"):]
    section = section[: section.index("</section>")]
    assert "alert</span> <b>drift</b>" in section and 'href="monitor/monitor.html"' in section
    assert section.count("<img") == 3 and "<script" not in report


def test_bad_input_is_a_clear_usage_error(tiny_run, tmp_path, capsys):
    log = TrafficLog(tmp_path / "t.db")
    log.record(Completion(id="chatcmpl-1", model="ppo", stage="runs/x/ppo", messages=[{"role": "user", "content":
                          "Tell me about the river."}], response="The river is calm.", finish_reason="stop"))
    log.close()
    (tmp_path / "notes.txt").write_text("not a database\n" * 50)
    sqlite3.connect(tmp_path / "other.db").execute("CREATE TABLE x (a)")
    (tmp_path / "empty").mkdir()
    rule = ["--rule", "feedback.synthetic:rule_score"]
    cases = [
        ([str(tmp_path / "missing.db"), *rule], "missing.db: no traffic log"),
        ([str(tmp_path / "notes.txt"), *rule], "notes.txt: not a traffic log"),
        ([str(tmp_path / "other.db"), *rule], "other.db: not a traffic log"),
        ([str(tmp_path / "t.db"), *rule, "--baseline", str(tiny_run / "reward")],
         "is a 'reward_model' artifact (stage 'reward'), but this needs 'eval'"),
        ([str(tmp_path / "t.db"), *rule, "--baseline", str(tmp_path / "empty")], "has no manifest.json"),
        ([str(tmp_path / "t.db"), *rule, "--baseline", str(tiny_run / "evaluate"), "--baseline-policy", "dpo"],
         "--baseline-policy dpo: "),
        ([str(tmp_path / "t.db"), "--judge", str(ROOT / "configs" / "judges" / "rule.yaml")], "give --baseline"),
        ([str(tmp_path / "t.db")], "nothing to score"),
        ([str(tmp_path / "t.db"), *rule, "--window", "soon"], "--window soon"),
        ([str(tmp_path / "t.db"), "--reward-model", str(tmp_path / "nope")], "--reward-model"),
    ]
    for args, message in cases:
        capsys.readouterr()
        assert main(["monitor", *args, "-o", str(tmp_path / "out")]) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
