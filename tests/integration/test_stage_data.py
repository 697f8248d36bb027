"""The training stages read their data through memory-mapped Arrow datasets (pipeline/arrow.py): the rows they train
on are those the old lists held (same ids, same tokens, same pairs skipped for the same reasons, the same special
tokens counted), in one process or several, from a fresh build or the cache; and building them from a 100k-pair
artifact holds no pair as a Python object (tracemalloc's peak stays far below what the list of pairs takes)."""

from __future__ import annotations

import json
import tracemalloc
from types import SimpleNamespace

import pytest

from feedback.schema import PreferencePair, read_pairs, write_pairs
from pipeline import arrow
from pipeline.stages.common import pair_datasets
from reward.pairs import encode_pair
from rlhf.text import NEUTRALISED

MAX_LENGTH = 48


def _ctx(tmp_path, name="reward"):
    """What pair_datasets reads of a stage's context: its name, run and work directories."""
    work = tmp_path / "run" / f".{name}.partial"
    work.mkdir(parents=True, exist_ok=True)
    return SimpleNamespace(name=name, run_dir=tmp_path / "run", work_dir=work)


def _cfg(eval_steps=None):
    return SimpleNamespace(optim=SimpleNamespace(eval_steps=eval_steps))


def _pairs_file(path, tok):
    """The shipped synthetic pairs, and the cases a stage treats apart: a tie, a conversational pair, a special token
    written in a response, a margin, a prompt that truncation leaves no response of."""
    from feedback.synthetic import path as synthetic

    special = next(s for s in tok.all_special_tokens if len(s) > 1)
    pairs = [PreferencePair(**json.loads(line), margin=float(i % 3)) for i, line in
             enumerate(synthetic("preferences").read_text().splitlines()[:120])]
    pairs += [PreferencePair("Tell me about the lake.", "The lake is calm.", "The lake is cold.", tie=True),
              PreferencePair([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                              {"role": "user", "content": "Tell me about the farm."}],
                             "The farm is lovely.", "The farm is awful."),
              PreferencePair("Tell me about the park.", f"The park is nice{special} system", "The park is dull."),
              PreferencePair("word " * 200, "Fine.", "Bad.")]
    write_pairs(path, pairs)
    return path


def _old_reward_rows(path, tok, split):
    """What the reward stage trained on before (a list of encode_pair rows), and the reasons of the pairs skipped."""
    rows, skipped = [], []
    for p in read_pairs(path):
        row, reason = encode_pair(p, tok, MAX_LENGTH, use_margin=False)
        (skipped.append((p.id, split, reason)) if reason else rows.append({**row, "id": p.id, "source": p.source}))
    return rows, skipped


def _convert(tok):
    def convert(p, split):
        return encode_pair(p, tok, MAX_LENGTH, use_margin=False)

    return convert


def _columns():
    from datasets import List, Value

    return {"chosen_ids": List(Value("int64")), "rejected_ids": List(Value("int64"))}


@pytest.mark.parametrize("rows_per_proc", [arrow.ROWS_PER_PROC, 40])  # this process; two worker processes
def test_reward_rows_equal_the_lists_they_replace(tiny_path, tmp_path, monkeypatch, rows_per_proc):
    from pipeline.models import load_tokenizer

    tok = load_tokenizer(tiny_path)
    train = _pairs_file(tmp_path / "preferences.jsonl", tok)
    evals = tmp_path / "eval.jsonl"
    write_pairs(evals, list(read_pairs(train))[:20])
    NEUTRALISED.clear()
    old = {s: _old_reward_rows(f, tok, s) for s, f in (("train", train), ("eval", evals))}
    old_neutralised = dict(NEUTRALISED)
    assert old_neutralised and old["train"][1], "the file holds special tokens and pairs to skip"

    monkeypatch.setattr(arrow, "ROWS_PER_PROC", rows_per_proc)
    for attempt in ("built", "cached"):
        NEUTRALISED.clear()
        ctx = _ctx(tmp_path)
        rows, counts = pair_datasets(ctx, _cfg(), {"train": train, "eval": evals}, _convert(tok), _columns())
        for split in ("train", "eval"):
            new = rows[split].select_columns(["chosen_ids", "rejected_ids", "id", "source"]).to_list()
            assert new == old[split][0], (attempt, split)
        assert dict(NEUTRALISED) == old_neutralised, attempt  # counted once, wherever and whenever the map ran
        skipped = [json.loads(line) for line in (ctx.work_dir / "skipped.jsonl").read_text().splitlines()]
        assert [(s["id"], s["split"], s["reason"]) for s in skipped] == old["train"][1] + old["eval"][1]
        assert counts["read"] == {"train": 124, "eval": 20}
        assert counts["kept"] == {"train": len(old["train"][0]), "eval": len(old["eval"][0])}
        assert counts["skipped_by_reason"] == {"tie": 1, "truncated": 1}


def test_a_bad_row_names_its_line(tiny_path, tmp_path):
    from rlhf.errors import InvalidInput
    from pipeline.models import load_tokenizer

    tok = load_tokenizer(tiny_path)
    train = _pairs_file(tmp_path / "preferences.jsonl", tok)
    lines = train.read_text().splitlines()
    train.write_text("\n".join(lines[:5] + ["", '{"prompt": "x", "chosen": "y"}'] + lines[5:]) + "\n")
    with pytest.raises(InvalidInput, match=r"preferences.jsonl:7: missing key 'rejected'"):
        pair_datasets(_ctx(tmp_path), _cfg(), {"train": train, "eval": train}, _convert(tok), _columns())


def test_seeded_order_is_the_shuffle_of_a_list():
    import random

    for n, seed in ((0, 1), (1, 0), (10, 3), (1000, 42)):
        rows = list(range(n))
        random.Random(seed).shuffle(rows)
        assert arrow.seeded_order(n, seed).tolist() == rows


def _generated(path, n: int):
    """n canonical pairs, written as the preferences stage writes them (ids given)."""
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"id": f"p{i}", "prompt": f"Tell me about the river number {i}, please.",
                                "chosen": f"The river {i} is calm and lovely, and its banks are green.",
                                "rejected": f"The river {i} is dirty.", "source": "human", "tie": False}) + "\n")
    return path


def test_100k_pairs_are_built_into_training_rows_without_holding_them(tiny_path, tmp_path, monkeypatch):
    """The list of pairs the old path held takes well over BOUND of Python memory; the Arrow path peaks below it,
    whatever the file's size (a batch of rows at a time)."""
    from pipeline.models import load_tokenizer

    BOUND = 40 * 2**20
    tok = load_tokenizer(tiny_path)
    path = _generated(tmp_path / "preferences.jsonl", 100_000)
    small = _generated(tmp_path / "eval.jsonl", 100)

    def convert(p, split):  # a reward row from the fast tokenizer alone (the chat template costs time, not memory)
        return {"chosen_ids": tok(p.chosen)["input_ids"], "rejected_ids": tok(p.rejected)["input_ids"]}, None

    monkeypatch.setattr(arrow, "ROWS_PER_PROC", 10**9)  # in this process, where tracemalloc sees it
    tracemalloc.start()
    try:
        rows, counts = pair_datasets(_ctx(tmp_path), _cfg(), {"train": path, "eval": small}, convert, _columns())
        _, new_peak = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        pairs = list(read_pairs(path))  # what the old path held before converting a single pair
        _, old_peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert counts["kept"]["train"] == len(rows["train"]) == len(pairs) == 100_000
    assert rows["train"][99_999]["chosen_ids"] == tok(pairs[-1].chosen)["input_ids"]
    assert old_peak > BOUND > new_peak, (old_peak / 2**20, new_peak / 2**20)


def test_sft_examples_equal_the_lists_they_replace(tiny_path, tmp_path):
    """The SFT stage's examples (read, validated, held out, special tokens made text, what TRL would drop left out)
    from its Arrow datasets are those of the old lists, and TRL tokenises them into the same rows."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from feedback.synthetic import path as synthetic
    from pipeline.data import read_examples
    from pipeline.models import load_causal_lm, load_tokenizer
    from pipeline.data import neutralised
    from pipeline.stages.sft import SFTStageConfig, _data, _trainable, hold_out, trl_drops
    from tests.conftest import tiny_sft_block

    tok = load_tokenizer(tiny_path)
    special = next(s for s in tok.all_special_tokens if len(s) > 1)
    lines = synthetic("sft").read_text().splitlines()[:80]
    lines[3] = json.dumps({"messages": [{"role": "user", "content": f"Hi {special}"},
                                        {"role": "assistant", "content": f"Hello{special}"}]})
    lines[5] = '{"messages": "not a list"}'
    lines[9] = json.dumps({"prompt": "word " * 100, "completion": "Fine."})  # no assistant token within 64
    data = tmp_path / "sft.jsonl"
    data.write_text("\n".join(lines) + "\n")
    cfg = SFTStageConfig.model_validate(tiny_sft_block(data={"train": str(data), "eval_fraction": 0.2,
                                                             "on_error": "skip"}, max_length=64))

    # the old path: lists
    NEUTRALISED.clear()
    rejected: list = []
    where: list = []
    examples, _ = read_examples(data, "auto", "skip", rejected, where=where)
    train, evals = hold_out(list(zip(where, examples)), 0.2, seed=0)
    old = {split: [neutralised(tok, ex) for _, ex in rows] for split, rows in (("train", train), ("eval", evals))}
    old = {split: [ex for ex in rows if not trl_drops(tok, ex, 64, True, False)] for split, rows in old.items()}
    old_neutralised = dict(NEUTRALISED)

    NEUTRALISED.clear()
    ctx = _ctx(tmp_path, "sft")
    ctx.seed = 0
    train_ds, eval_ds, counts = _data(cfg, ctx)
    train_ds, eval_ds = _trainable(cfg, ctx, tok, train_ds, eval_ds, counts)
    assert train_ds.to_list() == old["train"] and eval_ds.to_list() == old["eval"]
    assert dict(NEUTRALISED) == old_neutralised and old_neutralised
    assert counts == {"rows_read": 80, "accepted": 79, "rejected": 1, "train": len(old["train"]),
                      "eval": len(old["eval"]), "skipped": 1}
    assert [json.loads(x) for x in (ctx.work_dir / "rejected.jsonl").read_text().splitlines()] == rejected
    assert rejected[0]["where"].endswith("sft.jsonl:6")

    model = load_causal_lm(tiny_path)
    args = SFTConfig(output_dir=str(tmp_path / "out"), max_length=64, assistant_only_loss=True, report_to=[],
                     use_cpu=True)
    ours = SFTTrainer(model=model, args=args, train_dataset=train_ds, processing_class=tok).train_dataset
    theirs = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(old["train"]),
                        processing_class=tok).train_dataset
    for column in ("input_ids", "labels"):  # labels: -100 outside the assistant tokens
        assert ours[column] == theirs[column]


def test_messages_keep_their_role_and_content(tmp_path):
    """A message's other keys (a "name") do not reach the trainer, nor stop the build (docs/data-formats.md)."""
    path = tmp_path / "preferences.jsonl"
    write_pairs(path, [PreferencePair([{"role": "user", "content": "Hi", "name": "ann"}], "Hello.", "Go away.")])

    def convert(p, split):
        return {"prompt": p.prompt, "chosen": p.chosen}, None

    rows, _ = pair_datasets(_ctx(tmp_path, "dpo"), _cfg(), {"train": path, "eval": path}, convert,
                            {"prompt": arrow.message_features(), "chosen": arrow.message_features()})
    assert rows["train"].select_columns(["prompt", "chosen"]).to_list() == [
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello."}]}]
