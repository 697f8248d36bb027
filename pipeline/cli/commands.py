"""What each `rlhf` command does once its arguments are parsed (pipeline/cli/parser.py wires them): one
`cmd_*` function per command, thin: read the arguments, call the module that does the work, print the result,
return the exit code (0 success, 1 the input was read but is invalid; errors raise RLHFError, which
pipeline.cli.main turns into exit 1 or 2).
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

from feedback.agree import agreement
from feedback.export import describe, write_export
from feedback.files import iter_records
from feedback.label import check_consistency
from pipeline.judging import build_judge
from feedback.schema import write_pairs
from feedback.parquet_out import ParquetRows
from feedback.stats import PairStats
from feedback.validate import RunPart, rejected_records, row_problems, scan_file, validate_file
from feedback.readers import ALIASES
from pipeline import distributed
from pipeline import plan as planner
from pipeline.artifacts import MANIFEST, load_artifact, write_json, write_jsonl
from rlhf.io import json_line, open_atomic
from pipeline.blocks import optim_changes, validate
from pipeline.config import ModelSpec, load_pipeline
from pipeline.data import read_prompts, resolve_data_path
from rlhf.errors import InvalidInput, UsageError
from pipeline.export import export_policy
from pipeline.models import BUILTIN, cache_dir, load_tokenizer, resolve
from pipeline.monitor.run import monitor
from pipeline.report import write_report
from pipeline.runner import preflight, run_pipeline, selected_stages
from pipeline.serve.options import ServeOptions
from pipeline.stages.ai_preferences import CandidatesConfig, label_with_policy
from pipeline.stages.evaluate import EvaluateStageConfig, compare
from reward.scoring import RewardScorer


def cmd_run(args) -> int:
    if args.processes is not None and (not args.check or args.processes < 1):
        raise UsageError("--processes N (N >= 1) goes with --check: a launched run takes its number of processes "
                         "from the launcher")
    # --deepspeed goes to every selected training stage (data stages have no `deepspeed` key) before the checks
    cfg = load_pipeline(args.config, args.set, deepspeed=args.deepspeed, only=args.stage)
    if args.run_dir:
        cfg.run_dir = args.run_dir
    if args.check:
        world = args.processes or distributed.world_size()
        preflight(selected_stages(cfg, args.stage), world)
        print(f"{args.config}: valid ({len(cfg.stages)} stages: {', '.join(s.name for s in cfg.stages)}; checked for "
              f"{world} process{'es' if world > 1 else ''})")
        for st in cfg.stages:  # each method's own defaults, and the user's settings, as they resolved
            changes = optim_changes(st.optim) if hasattr(st, "optim") else {}
            if changes:
                print(f"  stages.{st.name}.optim: " + ", ".join(f"{k} {v} (shared default {d})"
                                                               for k, (v, d) in changes.items()))
        return 0
    if args.plan_check:
        for line in planner.check(cfg, args.stage):
            print(line, file=sys.stderr)
    run_pipeline(cfg, only=args.stage, force=args.force, resume=args.resume)
    distributed.shutdown()  # every process leaves the process group together
    return 0


def cmd_plan(args) -> int:
    cfg = load_pipeline(args.config, args.set)
    if args.gpus < 1 or args.nodes < 1 or args.prompt_tokens < 1:
        raise UsageError("--gpus, --nodes and --prompt-tokens must be at least 1")
    memory = planner.parse_memory_arg(args.gpu_memory)
    rows = planner.plan(cfg, args.gpus, args.nodes, memory, args.cpu, args.stage, args.prompt_tokens)
    if not rows:
        raise UsageError(f"{args.config}: no training stage to plan"
                         + (f" among --stage {', '.join(args.stage)}" if args.stage else ""))
    if args.json:
        print(json.dumps([{**r, "options": [{k: v for k, v in o.items() if k != "cost"} for o in r["options"]],
                           "best": r["best"] and {k: v for k, v in r["best"].items() if k != "cost"}}
                          for r in rows], indent=2))
    else:
        print(planner.render(rows, memory, args.gpus * args.nodes))
    unfit = [r["stage"] for r in rows if r["best"] is None]
    if unfit:
        print(f"does not fit in {memory / planner.GIB:.1f} GiB per device: {', '.join(unfit)}", file=sys.stderr)
    return 1 if unfit else 0


KEY_ROLES = tuple(ALIASES)  # prompt, chosen, rejected; completion, label (unpaired rows)


def _keys(spec: str | None) -> dict[str, str] | None:
    if not spec:
        return None
    out = {}
    for item in spec.split(","):
        role, _, name = item.partition("=")
        if role not in KEY_ROLES or not name:
            raise UsageError(f"--keys {spec}: expected ROLE=NAME[,ROLE=NAME] with ROLE one of {', '.join(KEY_ROLES)}")
        out[role] = name
    return out


def _data_report(args, scan: bool = False):
    """validate_file's Report of args.file, or (scan) a streamed validate.Scan of it (bounded memory: the commands
    that go through the rows once, in order)."""
    tokenizer = None
    if getattr(args, "tokenizer", None):
        tokenizer = load_tokenizer(resolve(args.tokenizer), args.trust_remote_code)
    max_length = getattr(args, "max_length", None)
    if max_length and tokenizer is None:
        raise UsageError("--max-length needs --tokenizer (the model whose tokenizer truncates)")
    check = scan_file if scan else validate_file
    report = check(args.file, args.format, _keys(args.keys), args.source, args.ranked, tokenizer, max_length,
                   split=args.split, duplicates=args.duplicates)
    return report, tokenizer


def _print_notes(report) -> None:
    """How the file was read (splits, ignored columns, a --keys hint), on stderr after the rows' problems; stdout is
    flushed first so that a note never lands in the middle of a line when both streams go to one terminal or pipe."""
    sys.stdout.flush()
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr, flush=True)


def cmd_data_validate(args) -> int:
    scan, _ = _data_report(args, scan=True)
    with scan:
        for row in scan.problem_rows():  # each problem printed as its row comes, in file order
            for line in row_problems(row):
                print(line)
    _print_notes(scan)
    a = scan.agreement
    if a.get("pairs_labelled_more_than_once"):
        print(f"repeated {'rows' if scan.unpaired else 'pairs'}: {a['pairs_labelled_more_than_once']} labelled "
              f"more than once; agreement "
              f"{a['agreement']} over {a['label_pairs']} label pairs (--duplicates {args.duplicates})", file=sys.stderr,
              flush=True)
    print(f"format: {scan.format}", file=sys.stderr, flush=True)
    print(scan.summary())
    return 0 if scan.ok else 1


class _Invalid(Exception):
    """--on-error fail found a problem: the files being written are discarded."""


def _write_run(f, scan, part: RunPart, parquet: bool) -> int:
    """The pairs of a RunPart, as Parquet rows or as canonical JSON lines built whole (runs.canonical_text: what
    json_line writes for each); how many."""
    if not parquet:
        n, text = scan.text_of(part)
        f.write(text)
        return n
    n = 0
    for row in scan.rows_of(part):
        f.add(row.pairs[0].to_dict())
        n += 1
    return n


def cmd_data_import(args) -> int:
    """Rows are checked and written as they are read (a streamed scan): the output (JSONL, or Parquet when OUT ends
    in .parquet) and OUT.rejected.jsonl are temporary files until the end, put in place only when the run succeeds
    (--on-error fail: when no row was rejected)."""
    out = Path(args.output)
    parquet = out.suffix.lower() in (".parquet", ".pq")
    stem = out.name[: -len(out.suffix)] if parquet else out.name.removesuffix(".jsonl")
    rejected_path = out.with_name(stem + ".rejected.jsonl")
    scan, _ = _data_report(args, scan=True)
    problems: list[str] = []  # the first 21 (20 printed, and whether there are more)
    n = n_problems = n_rejected = 0
    try:
        with scan, contextlib.ExitStack() as files:
            f, rf = files.enter_context(open_atomic(out, "wb" if parquet else "w")), None  # rejected: when one is
            if parquet:
                f = ParquetRows(f, out, scan.unpaired)
                files.callback(f.close)  # before its file closes, whatever happens (a no-op once closed)
            for row in scan.parts():
                if isinstance(row, RunPart):  # valid pairs of a fastpath run, read again from the file
                    n += _write_run(f, scan, row, parquet)
                    continue
                lines = row_problems(row)
                n_problems += len(lines)
                problems += lines[: 21 - len(problems)]
                if lines and args.on_error == "fail":
                    continue  # nothing will be written: only the count goes on
                for p in row.pairs if row.error is None else ():
                    n += 1
                    if parquet:
                        f.add(p.to_dict())
                    else:
                        f.write(json_line(out, n, p.to_dict()))
                for rec in rejected_records(row):
                    rf = rf or files.enter_context(open_atomic(rejected_path))
                    n_rejected += 1
                    rf.write(json_line(rejected_path, n_rejected, rec))
            if not scan.ok and args.on_error == "fail":
                raise _Invalid  # the temporary files are removed
            if parquet:
                f.close()  # the last row group and the footer, inside the temporary file
    except _Invalid:
        for line in problems[:20]:
            print(line)
        if n_problems > 20:
            print(f"... and {n_problems - 20} more")
        _print_notes(scan)
        print(f"{scan.summary()}; nothing written (--on-error skip writes the valid rows)")
        return 1
    _print_notes(scan)
    print(f"format: {scan.format}; {scan.summary()}")
    print(f"wrote {n} {'unpaired rows' if scan.unpaired else 'pairs'} to {out}"
          + (f"; {n_rejected} rejected rows and pairs with reasons to {rejected_path}" if n_rejected else ""))
    return 0


def cmd_data_stats(args) -> int:
    report, tokenizer = _data_report(args, scan=True)
    with report:  # streamed: the pairs are counted as they come, never held
        acc = PairStats(report.unpaired, tokenizer)
        for row in report.parts():  # (with a tokenizer, every part is a Row)
            if isinstance(row, RunPart):
                acc.add_columns(*report.columns_of(row), report.source)
                continue
            for p in row.pairs if row.error is None else ():
                acc.add(p)
        stats = acc.result(report)
    _print_notes(report)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"{stats['file']}  format: {stats['format']}")
    yielded = (f"desirable: {stats['desirable']}; undesirable: {stats['undesirable']}" if report.unpaired
               else f"pairs: {stats['pairs']}")
    print(f"rows: {stats['rows_read']} ({stats['accepted']} valid, {stats['rejected']} invalid"
          + (f": {stats['rejected_by_reason']}" if stats["rejected"] else "") + f"); {yielded}")
    if report.unpaired:
        print(f"distinct prompts: {stats['distinct_prompts']}; desirable share: {stats['desirable_share']}")
    else:
        print(f"distinct prompts: {stats['distinct_prompts']}; ties: {stats['ties']}; with margin: "
              f"{stats['with_margin']}")
    print(f"sources: {stats['sources']}; annotators: {stats['annotators']}")
    print(f"lengths ({stats['length_unit']}):")
    for k, d in stats["lengths"].items():
        print(f"  {k:{max(9, len(k))}s} " + "  ".join(f"{n} {v}" for n, v in d.items()))
    print("  prompt turns  " + "  ".join(f"{n} {v}" for n, v in stats["prompt_turns"].items()))
    a = stats["agreement"]
    print(f"annotator agreement: {a['agreement'] if a['agreement'] is not None else 'n/a'} over "
          f"{a['pairs_labelled_more_than_once']} {'rows' if report.unpaired else 'pairs'} labelled more than once")
    return 0


def cmd_reward_score(args) -> int:
    items, problems = [], []  # (where, prompt, [(field, response)])
    for rec in iter_records(args.input):
        row = rec.value
        if rec.error or not isinstance(row, dict) or "prompt" not in row:
            problems.append(f"{rec.where}: {rec.error or 'expected an object with prompt and response (or chosen/rejected)'}")
            continue
        fields = [k for k in ("response", "chosen", "rejected", "completion") if isinstance(row.get(k), (str, list))]
        if not fields:
            problems.append(f"{rec.where}: no 'response' (or 'chosen'/'rejected') to score; found keys {sorted(row)}")
            continue
        items.append((rec.where, row, fields))
    if problems:
        print("\n".join(problems), file=sys.stderr)
        raise InvalidInput(f"{args.input}: {len(problems)} rows cannot be scored")
    scorer = RewardScorer.from_artifact(args.model, batch_size=args.batch_size,
                                        trust_remote_code=args.trust_remote_code)
    prompts = [row["prompt"] for _, row, fields in items for _ in fields]
    responses = [row[f] for _, row, fields in items for f in fields]
    raw, norm = scorer.score(prompts, responses)
    out, k = [], 0
    for where, row, fields in items:
        rec = {"where": where, **({"id": row["id"]} if "id" in row else {})}
        for f in fields:
            rec[f"{f}_score"] = round(raw[k], 6)
            rec[f"{f}_score_normalized"] = round(norm[k], 6)
            k += 1
        out.append(rec)
    if args.output:
        write_jsonl(args.output, out)
        print(f"scored {len(responses)} responses in {len(out)} rows -> {args.output}")
    else:
        for rec in out:
            print(json.dumps(rec))
    return 0


def _policy_path(ref: str) -> str:
    """A policy artifact directory (RUN_DIR/sft), its model/ directory, or a model reference."""
    if (Path(ref) / MANIFEST).exists():
        return str(load_artifact(ref, "policy", role="--policy").output("model"))
    return resolve(ref)


def cmd_feedback_label(args) -> int:
    prompts = read_prompts(resolve_data_path(args.prompts), args.max_prompts, split=args.prompts_split,
                           split_key="--prompts-split")
    cand = validate(CandidatesConfig, {name: getattr(args, name) for name in CandidatesConfig.model_fields},
                    "feedback label")
    pairs, unlabelled, stats, judge_id = label_with_policy(_policy_path(args.policy), prompts, args.judge, cand,
                                                           args.pairing, args.seed, args.trust_remote_code)
    warning = check_consistency(stats, args.min_position_consistency, args.allow_inconsistent, "feedback label")
    if warning:
        print(warning, file=sys.stderr)
    out = args.output
    n = write_pairs(out, pairs)
    base = out.removesuffix(".jsonl")
    write_jsonl(base + ".unlabelled.jsonl", unlabelled)
    write_json(base + ".judge.json", {"judge": judge_id, "stats": stats})
    print(f"wrote {n} AI-labelled pairs to {out}; {len(unlabelled)} abstentions to {base}.unlabelled.jsonl; "
          f"judge stats in {base}.judge.json")
    return 0


def cmd_feedback_agree(args) -> int:
    judge, jcfg, _ = build_judge(args.judge)
    report = validate_file(resolve_data_path(args.human), args.format, _keys(args.keys))
    if report.unpaired:
        raise UsageError(f"{args.human}: unpaired rows (one answer, labelled): a judge's agreement is measured on "
                         "pairs (chosen over rejected)")
    if report.invalid:
        print(f"{report.summary()}: judging the {len(report.valid)} valid rows "
              f"(rlhf data validate {args.human} lists the problems)", file=sys.stderr)
    pairs = report.pairs[: args.limit] if args.limit else report.pairs
    if not pairs:
        raise InvalidInput(f"{args.human}: no valid human pairs to compare with")
    result, rows = agreement(pairs, judge, jcfg.position, seed=args.seed)
    result["human_file"] = str(args.human)
    print(f"{'pairs':22s} {result['pairs']}")
    for key in ("accuracy", "cohen_kappa", "tie_rate", "abstain_rate", "position_consistency"):
        v = result[key]
        print(f"{key:22s} {'n/a' if v is None else f'{v:.4f}'}")
    if "read" in result:  # a model judge: pairs read from token probabilities, from parsed text, or mixed
        print(f"{'read':22s} {', '.join(f'{k} {v}' for k, v in sorted(result['read'].items()))}")
    for key, v in result["judge"].items():
        if key not in ("name", "identity"):
            print(f"judge.{key:16s} {v}")
    out = args.output or "agreement.json"
    write_json(out, {**result, "rows": rows})
    print(f"wrote {out}")
    return 0


def cmd_feedback_export(args) -> int:
    counts = write_export(args.db, args.output, args.kind, args.annotator)
    print(describe(counts))
    print(f"wrote {counts['exported']} rows to {args.output}")
    return 0


def cmd_eval(args) -> int:
    """`rlhf eval`: the evaluate stage outside a run, on artifact directories, model directories or references."""
    policies = {}
    for spec in args.policies:
        name, sep, ref = spec.partition("=")
        if not sep or not ref:
            raise UsageError(f"{spec}: expected NAME=REF (e.g. sft=runs/tiny/sft)")
        policies[name] = ref
    block = {"stage": "evaluate", "policies": policies, "prompts": args.prompts, "eval_fraction": args.eval_fraction,
             "max_prompts": args.max_prompts, "rule": args.rule, "reference": args.reference, "judge": args.judge,
             "baseline": args.baseline, "reward_model": args.reward_model, "prompts_split": args.prompts_split,
             "sampling": {"temperature": args.temperature, "top_p": args.top_p, "max_new_tokens": args.max_new_tokens}}
    if args.few_shot:
        block["few_shot"] = {"model": args.few_shot, "k": args.shots, "data": args.shot_data, "split": args.shot_split}
    cfg = validate(EvaluateStageConfig, block, "rlhf eval")
    refs = {**policies, **({cfg.few_shot.name: cfg.few_shot.model} if cfg.few_shot else {})}
    revisions = dict(_name_value(spec, "--revision", refs) for spec in args.revision)
    specs = {name: validate(ModelSpec, {"ref": ref, "trust_remote_code": args.trust_remote_code,
                                        "revision": revisions.get(name)}, f"rlhf eval {name}")
             for name, ref in refs.items()}
    trust = {"trust_remote_code": args.trust_remote_code}  # the flag decides, never an artifact's manifest

    def resolve_policy(ref: str, role: str):
        # role: "policies.NAME" or "few_shot.model"; the reference's own model spec (trust, revision) goes with it
        spec = specs[role.split(".", 1)[1] if role.startswith("policies.") else cfg.few_shot.name]
        if (Path(ref) / MANIFEST).exists():
            if spec.revision:
                raise UsageError(f"{ref}: a policy artifact records its own base revision; --revision is for model "
                                 "references")
            art = load_artifact(ref, "policy", role=role)
            return str(art.output("model")), {"ref": ref, **trust}, art.manifest
        return resolve(ref), {"ref": ref, **trust, "revision": spec.revision}, None

    reward = str(load_artifact(args.reward_model, "reward_model", role="--reward-model").path) if args.reward_model \
        else None
    out_dir = Path(args.output)
    result = compare(cfg, resolve_policy, reward, out_dir, args.seed, args.trust_remote_code)
    write_json(out_dir / "eval.json", {"metrics": result["metrics"], **result["extra"], "counts": result["counts"]})
    print(f"wrote {out_dir / 'samples.jsonl'}, {out_dir / 'table.csv'} and {out_dir / 'eval.json'}")
    return 0


def _name_value(spec: str, option: str, names) -> tuple[str, str]:
    """NAME=VALUE of an option that names one of `names`."""
    name, sep, value = spec.partition("=")
    if not sep or not value or name not in names:
        raise UsageError(f"{option} {spec}: expected NAME=VALUE with NAME one of {', '.join(names)}")
    return name, value


def cmd_export(args) -> int:
    out = export_policy(args.policy, args.output, adapter=args.adapter, trust_remote_code=args.trust_remote_code)
    print(f"exported {'the adapter of ' if args.adapter else ''}{args.policy} to {out}")
    return 0


# pipeline.serve.launch is imported by the serve commands alone: it loads FastAPI, uvicorn and torch, which no
# other command needs and `rlhf --help` should not wait for.
def cmd_serve_judge(args) -> int:
    from pipeline.serve.launch import serve_judge  # deferred: it imports torch

    return serve_judge(args.model, ServeOptions.from_args(args))


def cmd_serve_policy(args) -> int:
    from pipeline.serve.launch import serve_policy  # deferred: it imports torch

    return serve_policy(args.policy, ServeOptions.from_args(args))


def cmd_models_prepare(args) -> int:
    for ref in args.refs:
        print(f"{ref}: {resolve(ref)}")
    return 0


def cmd_models_list(args) -> int:
    print("built-in references (built or converted into the cache on first use):")
    for ref in BUILTIN:
        print(f"  {ref}")
    models = cache_dir() / "models"
    print(f"cache: {models}")
    if models.is_dir():
        for p in sorted(models.iterdir()):
            if not p.name.startswith("."):
                print(f"  {p.name}")
    return 0


def cmd_report(args) -> int:
    print(f"wrote {write_report(args.run_dir, args.output)}")
    return 0


def cmd_monitor(args) -> int:
    r = monitor(args.db, args.output, args.reward_model, args.rule, args.judge, args.baseline, args.baseline_policy,
                args.window, args.alpha, args.min_rows, args.trust_remote_code, args.batch_size)
    scored = "; ".join(f"{n}: {s['scored']} scored, {s['cached']} from earlier runs" for n, s in r["scorers"].items())
    print(f"{r['counts']['completions']} completions in {len(r['windows'])} windows ({scored})")
    for a in r["alerts"]:
        print(f"ALERT {a['kind']}: {a['message']}")
    if not r["alerts"]:
        print("no alerts")
    print(f"wrote {Path(args.output) / 'monitor.json'} and {Path(args.output) / 'monitor.html'}")
    return 0
