"""The `rlhf` command (same as `python -m pipeline`). Thin: parse, call, print.

Exit codes: 0 success; 1 the input was read but is invalid; 2 usage error or unreadable input.
"""

from __future__ import annotations

import argparse
import sys

from pipeline import __version__
from pipeline.errors import RLHFError

DESCRIPTION = """\
rlhf: a staged alignment pipeline. SFT -> preference data -> reward model -> policy optimisation.
Each stage is a block of a YAML pipeline config and writes an artifact the next stage reads.

examples:
  rlhf run configs/tiny.yaml                     run every stage (skips those up to date)
  rlhf run configs/tiny.yaml --stage sft --force rerun one stage
  rlhf run configs/quickstart.yaml --set stages.sft.optim.epochs=0.5
  rlhf models prepare smollm2-135m-instruct      convert the embedded SmolLM2 once
  rlhf plan configs/quickstart.yaml --gpus 8 --gpu-memory 80GB   memory per GPU before launch
"""


def _cmd_run(args) -> int:
    from pipeline.config import load_pipeline

    if args.processes is not None and (not args.check or args.processes < 1):
        from pipeline.errors import UsageError

        raise UsageError("--processes N (N >= 1) goes with --check: a launched run takes its number of processes "
                         "from the launcher")
    # --deepspeed goes to every selected training stage (data stages have no `deepspeed` key) before the checks
    cfg = load_pipeline(args.config, args.set, deepspeed=args.deepspeed, only=args.stage)
    if args.run_dir:
        cfg.run_dir = args.run_dir
    if args.check:
        from pipeline import distributed
        from pipeline.blocks import optim_changes
        from pipeline.runner import preflight, selected_stages

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
        from pipeline.plan import check

        for line in check(cfg, args.stage):
            print(line, file=sys.stderr)
    from pipeline import distributed
    from pipeline.runner import run_pipeline

    run_pipeline(cfg, only=args.stage, force=args.force, resume=args.resume)
    distributed.shutdown()  # every process leaves the process group together
    return 0


def _keys(spec: str | None) -> dict[str, str] | None:
    from pipeline.errors import UsageError

    if not spec:
        return None
    out = {}
    for item in spec.split(","):
        role, _, name = item.partition("=")
        if role not in ("prompt", "chosen", "rejected") or not name:
            raise UsageError(f"--keys {spec}: expected ROLE=NAME[,ROLE=NAME] with ROLE prompt, chosen or rejected")
        out[role] = name
    return out


def _data_report(args):
    from feedback.validate import validate_file

    tokenizer = None
    if getattr(args, "tokenizer", None):
        from pipeline.models import load_tokenizer, resolve

        tokenizer = load_tokenizer(resolve(args.tokenizer), args.trust_remote_code)
    max_length = getattr(args, "max_length", None)
    if max_length and tokenizer is None:
        from pipeline.errors import UsageError

        raise UsageError("--max-length needs --tokenizer (the model whose tokenizer truncates)")
    report = validate_file(args.file, args.format, _keys(args.keys), args.source, args.ranked, tokenizer, max_length,
                           split=args.split, duplicates=args.duplicates)
    for note in report.notes:
        print(f"note: {note}", file=sys.stderr)
    return report, tokenizer


def _print_problems(report, limit: int | None = None) -> None:
    problems = report.problems()
    for line in problems[:limit]:
        print(line)
    if limit is not None and len(problems) > limit:
        print(f"... and {len(problems) - limit} more")


def _cmd_data_validate(args) -> int:
    report, _ = _data_report(args)
    _print_problems(report)
    print(f"format: {report.format}", file=sys.stderr)
    a = report.agreement
    if a.get("pairs_labelled_more_than_once"):
        print(f"repeated pairs: {a['pairs_labelled_more_than_once']} labelled more than once; agreement "
              f"{a['agreement']} over {a['label_pairs']} label pairs (--duplicates {args.duplicates})", file=sys.stderr)
    print(report.summary())
    return 0 if report.ok else 1


def _cmd_data_import(args) -> int:
    from pathlib import Path

    from feedback.schema import write_pairs
    from pipeline.artifacts import write_jsonl

    report, _ = _data_report(args)
    out = Path(args.output)
    rejected_path = out.with_name(out.name.removesuffix(".jsonl") + ".rejected.jsonl")
    if not report.ok and args.on_error == "fail":
        _print_problems(report, 20)
        print(f"{report.summary()}; nothing written (--on-error skip writes the valid rows)")
        return 1
    n = write_pairs(out, report.pairs)
    rejected = report.rejected_rows()
    if rejected:
        write_jsonl(rejected_path, rejected)
    print(f"format: {report.format}; {report.summary()}")
    print(f"wrote {n} pairs to {out}" + (f"; {len(rejected)} rejected rows and pairs with reasons to {rejected_path}"
                                          if rejected else ""))
    return 0


def _cmd_data_stats(args) -> int:
    import json

    from feedback.stats import file_stats

    report, tokenizer = _data_report(args)
    stats = file_stats(report, tokenizer)
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    print(f"{stats['file']}  format: {stats['format']}")
    print(f"rows: {stats['rows_read']} ({stats['accepted']} valid, {stats['rejected']} invalid"
          + (f": {stats['rejected_by_reason']}" if stats["rejected"] else "") + f"); pairs: {stats['pairs']}")
    print(f"distinct prompts: {stats['distinct_prompts']}; ties: {stats['ties']}; with margin: {stats['with_margin']}")
    print(f"sources: {stats['sources']}; annotators: {stats['annotators']}")
    print(f"lengths ({stats['length_unit']}):")
    for k, d in stats["lengths"].items():
        print(f"  {k:9s} " + "  ".join(f"{n} {v}" for n, v in d.items()))
    print("  prompt turns  " + "  ".join(f"{n} {v}" for n, v in stats["prompt_turns"].items()))
    a = stats["agreement"]
    print(f"annotator agreement: {a['agreement'] if a['agreement'] is not None else 'n/a'} over "
          f"{a['pairs_labelled_more_than_once']} pairs labelled more than once")
    return 0


def _cmd_reward_score(args) -> int:
    import json

    from feedback.files import iter_records
    from pipeline.artifacts import write_jsonl
    from pipeline.errors import InvalidInput
    from reward.scoring import RewardScorer

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
    from pathlib import Path

    from pipeline.artifacts import load_artifact
    from pipeline.models import resolve

    if (Path(ref) / "manifest.json").exists():
        return str(load_artifact(ref, "policy", role="--policy").output("model"))
    return resolve(ref)


def _cmd_feedback_label(args) -> int:
    from feedback.schema import write_pairs
    from pipeline.artifacts import write_json, write_jsonl
    from pipeline.data import read_prompts, resolve_data_path
    from pipeline.stages.ai_preferences import CandidatesConfig, label_with_policy

    prompts = read_prompts(resolve_data_path(args.prompts), args.max_prompts, split=args.prompts_split,
                           split_key="--prompts-split")
    from pipeline.blocks import validate

    cand = validate(CandidatesConfig, {name: getattr(args, name) for name in CandidatesConfig.model_fields},
                    "feedback label")
    pairs, unlabelled, stats, judge_id = label_with_policy(_policy_path(args.policy), prompts, args.judge, cand,
                                                           args.pairing, args.seed, args.trust_remote_code)
    out = args.output
    n = write_pairs(out, pairs)
    base = out.removesuffix(".jsonl")
    write_jsonl(base + ".unlabelled.jsonl", unlabelled)
    write_json(base + ".judge.json", {"judge": judge_id, "stats": stats})
    print(f"wrote {n} AI-labelled pairs to {out}; {len(unlabelled)} abstentions to {base}.unlabelled.jsonl; "
          f"judge stats in {base}.judge.json")
    return 0


def _cmd_feedback_agree(args) -> int:

    from feedback.agree import agreement
    from feedback.judges.config import build_judge
    from feedback.validate import validate_file
    from pipeline.artifacts import write_json
    from pipeline.data import resolve_data_path

    judge, jcfg, _ = build_judge(args.judge)
    report = validate_file(resolve_data_path(args.human), args.format, _keys(args.keys))
    if report.invalid:
        print(f"{report.summary()}: judging the {len(report.valid)} valid rows "
              f"(rlhf data validate {args.human} lists the problems)", file=sys.stderr)
    pairs = report.pairs[: args.limit] if args.limit else report.pairs
    if not pairs:
        from pipeline.errors import InvalidInput

        raise InvalidInput(f"{args.human}: no valid human pairs to compare with")
    result, rows = agreement(pairs, judge, jcfg.position, seed=args.seed)
    result["human_file"] = str(args.human)
    print(f"{'pairs':22s} {result['pairs']}")
    for key in ("accuracy", "cohen_kappa", "tie_rate", "abstain_rate", "position_consistency"):
        v = result[key]
        print(f"{key:22s} {'n/a' if v is None else f'{v:.4f}'}")
    for key, v in result["judge"].items():
        if key not in ("name", "identity"):
            print(f"judge.{key:16s} {v}")
    out = args.output or "agreement.json"
    write_json(out, {**result, "rows": rows})
    print(f"wrote {out}")
    return 0


def _cmd_eval(args) -> int:
    """`rlhf eval`: the evaluate stage outside a run, on artifact directories, model directories or references."""
    from pathlib import Path

    from pipeline.artifacts import load_artifact, write_json
    from pipeline.blocks import validate
    from pipeline.errors import UsageError
    from pipeline.models import resolve as resolve_model
    from pipeline.stages.evaluate import EvaluateStageConfig, compare

    from pipeline.config import ModelSpec

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

    def resolve(ref: str, role: str):
        # role: "policies.NAME" or "few_shot.model"; the reference's own model spec (trust, revision) goes with it
        spec = specs[role.split(".", 1)[1] if role.startswith("policies.") else cfg.few_shot.name]
        if (Path(ref) / "manifest.json").exists():
            if spec.revision:
                raise UsageError(f"{ref}: a policy artifact records its own base revision; --revision is for model "
                                 "references")
            art = load_artifact(ref, "policy", role=role)
            return str(art.output("model")), {"ref": ref, **trust}, art.manifest
        return resolve_model(ref), {"ref": ref, **trust, "revision": spec.revision}, None

    reward = str(load_artifact(args.reward_model, "reward_model", role="--reward-model").path) if args.reward_model \
        else None
    out_dir = Path(args.output)
    result = compare(cfg, resolve, reward, out_dir, args.seed, args.trust_remote_code)
    write_json(out_dir / "eval.json", {"metrics": result["metrics"], **result["extra"], "counts": result["counts"]})
    print(f"wrote {out_dir / 'samples.jsonl'}, {out_dir / 'table.csv'} and {out_dir / 'eval.json'}")
    return 0


def _name_value(spec: str, option: str, names) -> tuple[str, str]:
    """NAME=VALUE of an option that names one of `names`."""
    from pipeline.errors import UsageError

    name, sep, value = spec.partition("=")
    if not sep or not value or name not in names:
        raise UsageError(f"{option} {spec}: expected NAME=VALUE with NAME one of {', '.join(names)}")
    return name, value


def _cmd_export(args) -> int:
    from pipeline.export import export_policy

    out = export_policy(args.policy, args.output, adapter=args.adapter, trust_remote_code=args.trust_remote_code)
    print(f"exported {'the adapter of ' if args.adapter else ''}{args.policy} to {out}")
    return 0


def _cmd_serve_judge(args) -> int:
    from pipeline.serve.launch import serve_judge
    from pipeline.serve.options import ServeOptions

    return serve_judge(args.model, ServeOptions.from_args(args))


def _cmd_serve_policy(args) -> int:
    from pipeline.serve.launch import serve_policy
    from pipeline.serve.options import ServeOptions

    return serve_policy(args.policy, ServeOptions.from_args(args))


def _cmd_models_prepare(args) -> int:
    from pipeline.models import resolve

    for ref in args.refs:
        print(f"{ref}: {resolve(ref)}")
    return 0


def _cmd_models_list(args) -> int:
    from pipeline.models import BUILTIN, cache_dir

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


def _cmd_report(args) -> int:
    from pipeline.report import write_report

    print(f"wrote {write_report(args.run_dir, args.output)}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"rlhf {__version__}")
    # Launchers (deepspeed, torch.distributed.launch) append --local_rank=N; accepted and ignored here,
    # the rank is read from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_run, _add_plan, _add_data, _add_reward, _add_feedback, _add_eval, _add_export, _add_serve,
                _add_models, _add_report):
        add(sub)
    return p


def _add_run(sub) -> None:
    r = sub.add_parser("run", help="run the stages of a pipeline config in order",
                       description="Run the stages of a pipeline config in order. A stage whose complete manifest "
                       "matches the current config and inputs is skipped; a changed one reruns with everything "
                       "downstream.")
    r.add_argument("config", help="pipeline YAML (see configs/)")
    r.add_argument("--stage", action="append", metavar="NAME", help="run only this stage (repeatable)")
    r.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config key, e.g. stages.sft.optim.lr=1e-4 (list items by index or stage name)")
    r.add_argument("--force", action="store_true", help="rerun the selected stages even if up to date")
    r.add_argument("--resume", action="store_true",
                   help="continue the first stage to run from its newest complete checkpoint (an error if none)")
    r.add_argument("--run-dir", help="override run_dir")
    r.add_argument("--deepspeed", metavar="ZERO.json",
                   help="run the selected training stages under this ZeRO config (configs/deepspeed/*.json)")
    r.add_argument("--check", action="store_true", help="validate the config and the checks every stage runs before "
                   "the first one starts (for --processes processes), print the resolved optimiser settings that "
                   "differ from the shared defaults, and exit")
    r.add_argument("--processes", type=int, metavar="N", help="with --check: the number of processes the run will be "
                   "launched on (default: this launch's, 1 without a launcher)")
    r.add_argument("--plan-check", action="store_true", help="estimate each selected training stage's peak memory "
                   "on this machine's devices (rlhf plan) and refuse to launch one that would not fit")
    r.set_defaults(func=_cmd_run)


def _cmd_plan(args) -> int:
    import json

    from pipeline.config import load_pipeline
    from pipeline.errors import UsageError
    from pipeline.plan import GIB, parse_memory_arg, plan, render

    cfg = load_pipeline(args.config, args.set)
    if args.gpus < 1 or args.nodes < 1 or args.prompt_tokens < 1:
        raise UsageError("--gpus, --nodes and --prompt-tokens must be at least 1")
    memory = parse_memory_arg(args.gpu_memory)
    rows = plan(cfg, args.gpus, args.nodes, memory, args.cpu, args.stage, args.prompt_tokens)
    if not rows:
        raise UsageError(f"{args.config}: no training stage to plan"
                         + (f" among --stage {', '.join(args.stage)}" if args.stage else ""))
    if args.json:
        print(json.dumps([{**r, "options": [{k: v for k, v in o.items() if k != "cost"} for o in r["options"]],
                           "best": r["best"] and {k: v for k, v in r["best"].items() if k != "cost"}}
                          for r in rows], indent=2))
    else:
        print(render(rows, memory, args.gpus * args.nodes))
    unfit = [r["stage"] for r in rows if r["best"] is None]
    if unfit:
        print(f"does not fit in {memory / GIB:.1f} GiB per device: {', '.join(unfit)}", file=sys.stderr)
    return 1 if unfit else 0


def _add_plan(sub) -> None:
    pl = sub.add_parser("plan", help="estimate each training stage's peak memory per device before launch",
                        description="Estimate each training stage's peak memory per device under ZeRO-0/1/2/3 with "
                        "and without offload (weights, gradients, optimizer states, activations, KV cache, PPO's "
                        "models), say which fit and which of those is fastest. Exit 1 if a stage fits in none.")
    pl.add_argument("config", help="pipeline YAML (see configs/)")
    pl.add_argument("--gpus", type=int, default=1, help="devices (processes) per node (default 1)")
    pl.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    pl.add_argument("--gpu-memory", default="80GB", metavar="SIZE", help="memory per device, e.g. 80GB (default)")
    pl.add_argument("--cpu", action="store_true", help="plan a CPU run: fp32, host memory, the libraries' footprint")
    pl.add_argument("--prompt-tokens", type=int, default=256, metavar="N",
                    help="the longest prompt of online stages (PPO, GRPO, RLOO), which have no such setting (256)")
    pl.add_argument("--stage", action="append", metavar="NAME", help="plan only this stage (repeatable)")
    pl.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override a config key")
    pl.add_argument("--json", action="store_true", help="machine-readable output, bytes per part")
    pl.set_defaults(func=_cmd_plan)


def _data_options(q, tokenizer: bool = True) -> None:
    """The options every command reading a preference file takes (their choices come from feedback/)."""
    from feedback.readers import FORMATS, RANKED_MODES
    from feedback.schema import SOURCES
    from feedback.validate import DUPLICATES

    q.add_argument("file", help="the preference file or dataset directory")
    q.add_argument("--format", default="auto", choices=FORMATS, help="row format (default: detected; a file holds "
                   "the format of its first row, and a row of another is rejected)")
    q.add_argument("--keys", metavar="ROLE=NAME,...", help="key names, e.g. prompt=q,chosen=good,rejected=bad")
    q.add_argument("--ranked", default=RANKED_MODES[0], choices=RANKED_MODES, help="how ranked rows expand into pairs")
    q.add_argument("--source", default=SOURCES[0], choices=SOURCES, help="source recorded on each pair")
    q.add_argument("--split", metavar="NAME",
                   help="dataset directories: read only this split (default: every split, each one named)")
    q.add_argument("--duplicates", default=DUPLICATES[0], choices=DUPLICATES,
                   help="pairs labelled more than once (same prompt and responses, normalised): fail (default) "
                   "rejects later copies, and every copy when labels differ; first keeps the first copy; "
                   "majority keeps the label most copies give, the others outvoted (a tie of votes: all rejected)")
    if tokenizer:
        q.add_argument("--tokenizer", metavar="MODEL", help="model whose tokenizer checks truncation")
        q.add_argument("--max-length", type=int, help="flag pairs that become empty or identical when truncated")
        _trust_option(q)


def _trust_option(q) -> None:
    """--trust-remote-code: the only way a command lets a model it loads run the Python code the model ships."""
    q.add_argument("--trust-remote-code", action="store_true",
                   help="let the models this command loads run the Python code they ship (auto_map); off by default, "
                   "and never turned on by a file inside an artifact: use it only for code you have read")


def _add_data(sub) -> None:
    d = sub.add_parser("data", help="validate, import and describe preference files",
                       description="Preference files: JSONL, JSON arrays, CSV, TSV (each also .gz), Parquet or a local "
                       "dataset directory, in the formats pairs, messages, hh (Anthropic HH-RLHF transcripts) or ranked.")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    dv = dsub.add_parser("validate", help="check every row; print FILE:LINE: reason and a summary line",
                         description="Check every row of a preference file. Prints each problem as FILE:LINE: reason "
                         "and ends with 'N rows: V valid, I invalid'. Exit 1 if any row is invalid.")
    _data_options(dv)
    dv.set_defaults(func=_cmd_data_validate)
    di = dsub.add_parser("import", help="write the canonical schema (JSONL)",
                         description="Convert a preference file to canonical JSONL. With --on-error skip, rejected "
                         "rows go to OUT.rejected.jsonl with their reasons.")
    _data_options(di)
    di.add_argument("-o", "--output", required=True, metavar="OUT.jsonl")
    di.add_argument("--on-error", default="fail", choices=["fail", "skip"])
    di.set_defaults(func=_cmd_data_import)
    ds = dsub.add_parser("stats", help="rows, formats, lengths, ties, sources, annotators and their agreement")
    _data_options(ds)
    ds.add_argument("--json", action="store_true", help="print JSON")
    ds.set_defaults(func=_cmd_data_stats)


def _add_reward(sub) -> None:
    rw = sub.add_parser("reward", help="use a trained reward model",
                        description="Reward models trained by the reward stage.")
    rsub = rw.add_subparsers(dest="reward_command", metavar="ACTION")
    rs = rsub.add_parser("score", help="score each row's response(s): raw and normalised",
                         description="Score rows with a reward-model artifact. Rows hold 'prompt' and 'response', or "
                         "'chosen'/'rejected' (both are scored). Text is tokenised with the reward model's own "
                         "tokenizer; normalised = (raw - mean) / std from the artifact's manifest.")
    rs.add_argument("--model", required=True, metavar="RUN_DIR/reward", help="reward-model artifact (or its model/)")
    rs.add_argument("--input", required=True, metavar="FILE", help="JSONL/JSON/CSV/Parquet rows to score")
    rs.add_argument("--output", "-o", metavar="OUT.jsonl", help="write here instead of printing")
    rs.add_argument("--batch-size", type=int, default=32)
    _trust_option(rs)
    rs.set_defaults(func=_cmd_reward_score)


def _add_feedback(sub) -> None:
    import typing

    from feedback.readers import FORMATS
    from pipeline.stages.ai_preferences import AIPreferencesStageConfig, CandidatesConfig

    fb = sub.add_parser("feedback", help="AI-judge labels (RLAIF) and agreement with human labels",
                        description="Label policy samples with an AI judge, or measure a judge against humans.")
    fsub = fb.add_subparsers(dest="feedback_command", metavar="ACTION")
    fl = fsub.add_parser("label", help="sample k responses per prompt from a policy and let a judge pick",
                         description="Sample k responses per prompt from a policy, judge pairs of them in both "
                         "orders, and write canonical preference pairs with source 'ai' (plus OUT.unlabelled.jsonl "
                         "and OUT.judge.json with calls, retries, tokens, cost and position consistency).")
    fl.add_argument("--policy", required=True, help="policy artifact (RUN_DIR/sft), its model/ dir, or a model ref")
    fl.add_argument("--prompts", required=True, help="file of {'prompt': ...} rows (or synthetic:prompts)")
    fl.add_argument("--prompts-split", metavar="NAME", help="--prompts is a DatasetDict directory: the split to read "
                    "(default: train)")
    fl.add_argument("--judge", required=True, help="judge config, e.g. configs/judges/rule.yaml")
    fl.add_argument("-o", "--output", required=True, metavar="OUT.jsonl")
    # the same candidates, with the same defaults, as the ai_preferences stage's `candidates:` block
    for name, field in CandidatesConfig.model_fields.items():
        fl.add_argument(f"--{name.replace('_', '-')}", type=type(field.default), default=field.default,
                        help=field.description or f"candidates.{name} (default {field.default})")
    pairing = AIPreferencesStageConfig.model_fields["pairing"]
    fl.add_argument("--pairing", default=pairing.default, choices=typing.get_args(pairing.annotation))
    fl.add_argument("--max-prompts", type=int)
    fl.add_argument("--seed", type=int, default=0)
    _trust_option(fl)
    fl.set_defaults(func=_cmd_feedback_label)
    fa = fsub.add_parser("agree", help="a judge's accuracy, Cohen's kappa, tie/abstain rates against human labels",
                         description="Judge human-labelled pairs (both orders) and report accuracy against the "
                         "humans, Cohen's kappa, tie and abstain rates and position consistency, as a table and "
                         "in a JSON file.")
    fa.add_argument("--human", required=True, help="human preference file (any format rlhf data reads)")
    fa.add_argument("--judge", required=True, help="judge config")
    fa.add_argument("--format", default="auto", choices=FORMATS)
    fa.add_argument("--keys", metavar="ROLE=NAME,...")
    fa.add_argument("--limit", type=int, help="judge only the first N pairs")
    fa.add_argument("--seed", type=int, default=0, help="which side the human-preferred response is shown on")
    fa.add_argument("-o", "--output", metavar="REPORT.json", help="default: agreement.json")
    fa.set_defaults(func=_cmd_feedback_agree)


def _add_eval(sub) -> None:
    from pipeline.stages.evaluate import FewShotConfig, SamplingConfig

    e = sub.add_parser("eval", help="compare policies on held-out prompts: reward, rule, KL, length, win rates",
                       description="The evaluate stage outside a run: every policy answers the same held-out prompts "
                       "with the same sampling settings and seed; per policy the reward-model score, rule reward, KL "
                       "to a reference, length, EOS rate and distinct-1/2; win rates against a baseline by a judge "
                       "(both orders, ties half, 95%% Wilson interval). Writes samples.jsonl, table.csv, eval.json.")
    e.add_argument("policies", nargs="+", metavar="NAME=REF",
                   help="a policy artifact (RUN_DIR/sft), a model directory, or a model reference")
    e.add_argument("--prompts", required=True, help="file of {'prompt': ...} rows (or synthetic:prompts)")
    e.add_argument("--prompts-split", metavar="NAME", help="--prompts is a DatasetDict directory: the split to read "
                   "(default: train)")
    e.add_argument("--eval-fraction", type=float, default=0.0,
                   help="evaluate only this held-out share of the prompts, the split PPO and GRPO hold out with the "
                   "same seed (default 0: every prompt of the file)")
    e.add_argument("--max-prompts", type=int, default=64)
    e.add_argument("--reward-model", metavar="RUN_DIR/reward", help="a reward-model artifact: mean normalised score")
    e.add_argument("--rule", metavar="MODULE:FUNCTION", help="a rule reward, e.g. feedback.synthetic:rule_score")
    e.add_argument("--reference", metavar="NAME", help="KL of every policy to this one")
    e.add_argument("--judge", metavar="CONFIG", help="a judge config: win rates against --baseline")
    e.add_argument("--baseline", metavar="NAME", help="the policy the others are judged against (default: the first)")
    e.add_argument("--few-shot", metavar="MODEL", help="also the base MODEL prompted with --shots SFT examples")
    e.add_argument("--shots", type=int, default=FewShotConfig.model_fields["k"].default)
    e.add_argument("--shot-data", default=FewShotConfig.model_fields["data"].default)
    e.add_argument("--shot-split", metavar="NAME", help="--shot-data is a DatasetDict directory: the split to read "
                   "(default: train)")
    e.add_argument("--revision", action="append", default=[], metavar="NAME=REV",
                   help="load the hub id of policy NAME (or of the few-shot model, named few_shot) at this branch, "
                   "tag or commit (repeatable)")
    for name in ("temperature", "top_p", "max_new_tokens"):
        field = SamplingConfig.model_fields[name]
        e.add_argument(f"--{name.replace('_', '-')}", type=type(field.default), default=field.default)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    _trust_option(e)
    e.set_defaults(func=_cmd_eval)


def _add_export(sub) -> None:
    x = sub.add_parser("export", help="a policy artifact as a plain Hugging Face model directory",
                       description="Write a policy artifact as a plain Hugging Face model directory (a LoRA adapter "
                       "merged in, safetensors, the tokenizer with its chat template, the generation config) that "
                       "transformers, vLLM and TGI load as is; with --adapter, the peft adapter alone.")
    x.add_argument("policy", metavar="RUN_DIR/STAGE", help="a policy artifact directory (or its model/)")
    x.add_argument("-o", "--output", required=True, metavar="DIR", help="a new (or empty) directory")
    x.add_argument("--adapter", action="store_true", help="write the peft adapter alone (lora.merge: false policies)")
    _trust_option(x)
    x.set_defaults(func=_cmd_export)


def _serve_options(q) -> None:
    q.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1); any other needs --api-key-env")
    q.add_argument("--port", type=int, default=8000, help="default 8000; 0 picks a free port (printed)")
    q.add_argument("--api-key-env", metavar="NAME", help="environment variable holding the bearer token clients must send")
    q.add_argument("--max-body-bytes", type=int, default=1024 * 1024, help="largest request body (default 1 MiB)")
    q.add_argument("--max-prompt-tokens", type=int, help="longest prompt (default: the model's context - 1)")
    q.add_argument("--max-tokens", type=int, default=512, help="cap on a request's max_tokens, and its default (512)")
    q.add_argument("--concurrency", type=int, default=2, help="requests generating at once (default 2)")
    q.add_argument("--queue", type=int, default=8, help="requests waiting for a generation slot; beyond that 503 (8)")
    q.add_argument("--timeout", type=float, default=30.0,
                   help="seconds a client has to send its request headers and body (default 30)")
    q.add_argument("--header-timeout", type=float, default=5.0,
                   help="seconds a connection may go without a complete request head, idle or sending slowly, "
                   "before it is closed (default 5)")
    q.add_argument("--max-connections", type=int, default=256,
                   help="open connections in all; at the cap the longest-idle one is closed for a new one (256)")
    q.add_argument("--max-connections-per-client", type=int, default=64,
                   help="open connections per client address, the same way (default 64)")
    q.add_argument("--served-model-name", metavar="NAME", help="the model name shown in /v1/models")
    _trust_option(q)


def _add_serve(sub) -> None:
    sv = sub.add_parser("serve", help="serve a judge or a policy as an OpenAI-compatible endpoint",
                        description="One OpenAI-compatible server (POST /v1/chat/completions, GET /v1/models, "
                        "GET /health) for a judge model or a trained policy. Prints 'serving NAME at "
                        "http://HOST:PORT/v1 ...' when ready.")
    ssub = sv.add_subparsers(dest="serve_command", metavar="WHAT")
    sj = ssub.add_parser("judge", help="serve a model (e.g. a judge) by reference",
                         description="Serve a model reference (tiny, smollm2-135m-instruct, a saved model "
                         "directory, a hub id) for `type: http` judge configs and any OpenAI client.")
    sj.add_argument("--model", required=True, help="model reference (tiny, smollm2-135m-instruct, a path)")
    _serve_options(sj)
    sj.set_defaults(func=_cmd_serve_judge)
    sp = ssub.add_parser("policy", help="serve a trained policy artifact",
                         description="Serve a policy artifact (RUN_DIR/STAGE, e.g. runs/tiny/ppo) or its model/ "
                         "directory; an adapter is merged into its base.")
    sp.add_argument("policy", metavar="RUN_DIR/STAGE", help="policy artifact directory (or its model/)")
    _serve_options(sp)
    sp.set_defaults(func=_cmd_serve_policy)


def _add_models(sub) -> None:
    m = sub.add_parser("models", help="list or prepare model references",
                       description="Model references: tiny, smollm2-135m-instruct, a local directory, or a hub id.")
    msub = m.add_subparsers(dest="models_command", metavar="ACTION")
    ml = msub.add_parser("list", help="list built-in references and what is cached")
    ml.set_defaults(func=_cmd_models_list)
    mp = msub.add_parser("prepare", help="build or convert references into the cache ahead of time")
    mp.add_argument("refs", nargs="+", metavar="REF")
    mp.set_defaults(func=_cmd_models_prepare)


def _add_report(sub) -> None:
    rp = sub.add_parser("report", help="write a self-contained HTML report of a run directory",
                        description="Write one self-contained HTML page (plots embedded, no JavaScript, no external "
                        "URL) for a run directory: the stages and their status, training curves, final metrics, time, "
                        "memory, counts, data left out, AI labels, evaluate results and the resolved configs. Works "
                        "on partial runs.")
    rp.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (run_dir of a pipeline config)")
    rp.add_argument("-o", "--output", metavar="FILE", help="default: RUN_DIR/report.html")
    rp.set_defaults(func=_cmd_report)


def main(argv: list[str] | None = None) -> int:
    from pipeline.tracking import quiet_libraries

    quiet_libraries()
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except RLHFError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
