"""Benchmark (not a test): AI labelling at scale, side by side in one run.

    .venv/bin/python bench/judge_batch.py                                  # tiny 10000 pairs; SmolLM2 128; http 32
    .venv/bin/python bench/judge_batch.py --local tiny:2000 --http none    # a quicker tiny row only

1. The local judge as users get it (`batch_size`, default 16: the two orders of a pair in one forward,
   length-sorted; the prompts tokenized as one list; the prompts' shared prefix, the chat template's system turn
   and the instructions, forwarded once and its keys and values reused by every batch) against the reference: the
   judge one prompt at a time, each prompt tokenized alone and forwarded whole (`batch_size 1`, `prefix_cache`
   off: what the judge did one by one before the prefix cache). The judge at batch_size 1 with the prefix cache on (what
   a config with `batch_size: 1` now gets) is timed too, so the table says how much of the gain is the prefix and
   how much the batching. Same pairs (feedback.synthetic's preference pairs, both orders, position policy
   `average`, tie band 0.05): pairs/s each, the ratio to the reference (the issue's goal: >= 5x), and whether the
   labels are the same (every pair's choice, and the largest difference in averaged P(A)).
2. The http judge against a local `rlhf serve judge` (started here, `--concurrency N`), with 1 request in flight
   and with N: pairs/s, the ratio, the same labels, how the verdicts were read (answer-token logprobs or text) and
   the tokens summed over the run.

Each `--local MODEL:PAIRS` is one side-by-side row; tokenizing the prompts is inside every timing. Appended to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from ppo_vs_trl import PY, ROOT, record  # noqa: E402

sys.path.insert(0, str(ROOT))
POSITION = ("average", "tie", 0.05)


def pairs(n: int):
    from feedback.judges import JudgeItem
    from feedback.synthetic import preference_pairs

    rows = preference_pairs(n)
    return [JudgeItem(r["prompt"], r["chosen"], r["rejected"], id=str(i)) for i, r in enumerate(rows)]


def timed(judge, items):
    from feedback.judges import judge_both_orders

    start = time.perf_counter()
    results = judge_both_orders(judge, items, *POSITION)
    return time.perf_counter() - start, results


def same_labels(a, b) -> tuple[int, float]:
    """(pairs whose choice differs, largest |P(A) difference|)."""
    differ = sum(x.choice != y.choice for x, y in zip(a, b))
    gap = max((abs(x.prob_a - y.prob_a) for x, y in zip(a, b) if x.prob_a is not None and y.prob_a is not None),
              default=0.0)
    return differ, gap


def local_rows(specs: list[str], batch_size: int) -> tuple[list[str], list[str]]:
    from feedback.judges.local import LocalJudge
    from feedback.judges.prompting import load_principles, load_template
    from pipeline.models import load_causal_lm, load_tokenizer, resolve

    judges = ROOT / "configs" / "judges"
    template, principles = load_template(judges / "pairwise.yaml"), load_principles(judges / "constitution.yaml")

    class Reference(LocalJudge):
        """Each prompt tokenized alone (and, built below, forwarded whole, one a forward)."""

        def prompts_ids(self, items):
            return [self.prompt_ids(it) for it in items]

    rows, notes = [], []
    for spec in specs:
        model_ref, _, n = spec.partition(":")
        path = resolve(model_ref)
        model, tok = load_causal_lm(path, "fp32"), load_tokenizer(path)
        items = pairs(int(n or 64))
        make = lambda b: LocalJudge(model, tok, model_ref, template, principles, "all", batch_size=b)  # noqa: E731
        reference = lambda: Reference(model, tok, model_ref, template, principles, "all", batch_size=1,  # noqa: E731
                                      prefix_cache=False)
        for judge in (reference(), make(1), make(batch_size)):  # warm-up
            timed(judge, items[:2])
        t1, one = timed(reference(), items)
        judge = make(1)
        tp, _ = timed(judge, items)
        tb, batched = timed(make(batch_size), items)
        differ, gap = same_labels(one, batched)
        length = sum(map(len, judge.prompts_ids(items[: min(len(items), 256)]))) / min(len(items), 256)
        rows.append(f"| {model_ref} | {len(items)} | {length:.0f} | {judge.prefix_tokens} | {len(items) / t1:.2f} | "
                    f"{len(items) / tp:.2f} ({t1 / tp:.2f}x) | {len(items) / tb:.2f} | **{t1 / tb:.2f}x** | {differ} | "
                    f"{gap:.2e} |")
        notes.append(f"{model_ref}: reference {t1:.1f} s, batch_size 1 with the prefix cache {tp:.1f} s, "
                     f"batched {tb:.1f} s")
        print(rows[-1], flush=True)
    return rows, notes


def serve(model: str, concurrency: int):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([PY, "-m", "pipeline", "serve", "judge", "--model", model, "--port", "0",
                             "--concurrency", str(concurrency)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        m = re.match(r"serving \S+ at http://127\.0\.0\.1:(\d+)/v1", line)
        if m:  # keep reading its log, so that a full pipe never blocks the server
            threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()
            return proc, f"http://127.0.0.1:{m.group(1)}/v1"
    raise SystemExit(f"server exited {proc.wait()} before it was ready:\n{''.join(seen)}")


def http_rows(model: str, n: int, concurrency: int) -> list[str]:
    from feedback.judges import read_counts
    from feedback.judges.http import HTTPJudge
    from feedback.judges.prompting import load_principles, load_template

    judges = ROOT / "configs" / "judges"
    template, principles = load_template(judges / "pairwise.yaml"), load_principles(judges / "constitution.yaml")
    items = pairs(n)
    proc, url = serve(model, concurrency)
    rows, first = [], None
    try:
        make = lambda c: HTTPJudge(url, model, template, principles, "all", concurrency=c, max_tokens=1,  # noqa: E731
                                   timeout=300)
        timed(make(concurrency), items[:2])  # warm-up
        for c in (1, concurrency):
            judge = make(c)
            t, results = timed(judge, items)
            s = judge.stats()
            differ = "" if first is None else f"{same_labels(first[1], results)[0]}"
            rate = len(items) / t
            ratio = "1.00x" if first is None else f"**{rate / first[0]:.2f}x**"
            read = ", ".join(f"{k} {v}" for k, v in sorted(read_counts(results).items()))
            abstained = sum(r.choice == "abstain" for r in results)
            rows.append(f"| {model} | {len(items)} | {c} | {rate:.2f} | {ratio} | {differ or '-'} | {abstained} | "
                        f"{read} | {s['prompt_tokens']} + {s['completion_tokens']} | {s['requests']} |")
            print(rows[-1], flush=True)
            first = first or (rate, results)
    finally:
        proc.terminate()
        proc.wait(30)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--local", action="append", help="MODEL:PAIRS, repeatable (default: tiny:10000 and "
                    "smollm2-135m-instruct:128)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--http", default="smollm2-135m-instruct:32", help="MODEL:PAIRS for the http judge, or none")
    ap.add_argument("--concurrency", type=int, default=2, help="requests in flight (and the server's workers)")
    args = ap.parse_args()
    specs = args.local or ["tiny:10000", "smollm2-135m-instruct:128"]
    cmd = "`.venv/bin/python bench/judge_batch.py " + " ".join(sys.argv[1:]) + "`"
    rows, notes = local_rows(specs, args.batch_size)
    record("Local judge batched vs one by one (bench/judge_batch.py)",
           f"feedback.synthetic preference pairs, both orders, position policy average (tie band 0.05), fp32, "
           f"torch threads {__import__('torch').get_num_threads()}. Reference: one prompt a forward, each tokenized "
           f"alone and forwarded whole (batch_size 1, no prefix cache). Batch 1 + prefix: the judge at batch_size 1 "
           f"(prompts tokenized as one list, the shared prefix forwarded once). Batched: batch_size "
           f"{args.batch_size}, both orders of a pair in one forward, length-sorted, the shared prefix forwarded "
           f"once, last-position logits only. Labels compared between the reference and batched. Tokenizing is "
           f"inside every timing ({'; '.join(notes)}). Command: {cmd}.",
           "| model | pairs | prompt tokens (mean) | shared prefix tokens | reference one by one (pairs/s) | "
           "batch 1 + prefix (pairs/s) | batched (pairs/s) | batched vs reference | labels differing | "
           "max abs P(A) diff |\n|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))
    if args.http != "none":
        model, _, n = args.http.partition(":")
        rows = http_rows(model, int(n or 32), args.concurrency)
        record("HTTP judge, 1 request in flight vs N (bench/judge_batch.py)",
               f"`rlhf serve judge --model {model} --concurrency {args.concurrency}` on this machine, the http judge "
               f"(max_tokens 1, top_logprobs 20, cache off) with concurrency 1 then {args.concurrency}, the same "
               f"pairs in both orders. Command: {cmd}.",
               "| model | pairs | in flight | pairs/s | ratio | labels differing | abstained | read | tokens "
               "(prompt + completion) | requests |\n|---|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
