"""The shipped HH-RLHF sample (feedback/data/hh): its parts share no prompt and no conversation, and re-splitting them by the documented
rule (feedback/hh.py) gives the shipped files back, derived files included; configs reach them as hh:NAME."""

import json

import pytest

from feedback import hh
from feedback.schema import prompt_key
from pipeline.data import read_prompts, resolve_data_path
from rlhf.errors import UsageError


def _lines(name):
    return hh.path(name).read_text(encoding="utf-8").splitlines()


def test_parts_share_no_prompt_and_hold_every_pair():
    pairs = {name: [hh.pair_of(x) for x in _lines(name)] for name in ("train", "eval", "scorer")}
    # two rows of the sample have an empty chosen reply: shipped as they are (the preferences stage rejects them)
    assert {name: sum(p is None for p in ps) for name, ps in pairs.items()} == {"train": 0, "eval": 1, "scorer": 1}
    prompts = {name: {prompt_key(p.prompt) for p in ps if p is not None} for name, ps in pairs.items()}
    assert not prompts["train"] & prompts["eval"] and not prompts["train"] & prompts["scorer"]
    assert not prompts["eval"] & prompts["scorer"]
    # nor a conversation: HH transcripts continue one another, so the parts are split by the opening human turn
    openings = {name: {hh.opening(p.prompt) for p in ps if p is not None} for name, ps in pairs.items()}
    assert not openings["train"] & openings["eval"] and not openings["train"] & openings["scorer"]
    assert not openings["eval"] & openings["scorer"]
    assert sum(len(_lines(n)) for n in ("train", "eval", "scorer")) == 1200
    # the evaluation prompts are the eval part's, none of them a training prompt
    evals = {prompt_key(p) for p in read_prompts(resolve_data_path("hh:prompts-eval"))}
    assert evals == prompts["eval"]


def test_resplitting_the_shipped_parts_gives_them_back():
    union = _lines("train") + _lines("eval") + _lines("scorer")
    parts = hh.split(sorted(union))  # the rule depends on each prompt only, not on the order of the rows
    for name in ("train", "eval", "scorer"):
        assert sorted(parts[name]) == sorted(_lines(name)), name
    parts = hh.split(union)
    for name, rows in hh.derived(parts).items():
        assert [json.loads(x) for x in _lines(name)] == rows, name


def test_bucket_by_hand_and_hh_references():
    # sha256(b"") starts e3b0c44298fc1c14: 0xe3b0c44298fc1c14 / 2**64
    assert hh.bucket("") == pytest.approx(0xE3B0C44298FC1C14 / 2**64)
    # a conversation's opening: the first human turn, case-folded, its words only
    assert hh.opening([{"role": "user", "content": "What's  the BEST way,\nto go?"},
                       {"role": "assistant", "content": "Walk."}, {"role": "user", "content": "And then?"}]) \
        == "what s the best way to go"
    assert resolve_data_path("hh:train") == hh.DATA_DIR / "train.jsonl"
    with pytest.raises(UsageError, match="no shipped HH file 'nope'"):
        resolve_data_path("hh:nope")
