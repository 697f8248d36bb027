"""The `rlhf` command line: one argparse parser per command, each wired to its function in
pipeline/cli/commands.py (`set_defaults(func=...)`).

An option several commands take is declared once (`_config_options`, `_rows_options`, `_prompts_options`,
`_trust_option`), and where a typed config or ServeOptions already holds an option's default (the AI-labelling
candidates, the evaluate stage's sampling and few-shot settings, the server's limits), the option takes it from
there, so the command line and the config cannot disagree.
"""

from __future__ import annotations

import argparse
import typing

from feedback.export import KINDS as EXPORT_KINDS
from feedback.label import MIN_POSITION_CONSISTENCY
from feedback.readers import FORMATS, RANKED_MODES
from feedback.schema import SOURCES
from feedback.validate import DUPLICATES
from pipeline import __version__
from pipeline.cli import commands
from pipeline.serve.options import MIB, ServeOptions
from pipeline.stages.ai_preferences import AIPreferencesStageConfig, CandidatesConfig
from pipeline.stages.evaluate import FewShotConfig, SamplingConfig

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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"rlhf {__version__}")
    # Launchers (deepspeed, torch.distributed.launch) append --local_rank=N; accepted and ignored here,
    # the rank is read from the environment.
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (_add_run, _add_plan, _add_data, _add_reward, _add_feedback, _add_eval, _add_export, _add_serve,
                _add_models, _add_report, _add_monitor):
        add(sub)
    return p


# --------------------------------------------------------------------------- shared pieces


def _command(sub, name: str, func, help: str, description: str | None = None) -> argparse.ArgumentParser:
    """A command's parser, run by `func` (pipeline/cli/commands.py)."""
    q = sub.add_parser(name, help=help, description=description)
    q.set_defaults(func=func)
    return q


def _group(sub, name: str, metavar: str, help: str, description: str):
    """A command of commands (`rlhf data validate`, ...): the subparsers its actions are added to."""
    return sub.add_parser(name, help=help, description=description).add_subparsers(dest=f"{name}_command",
                                                                                   metavar=metavar)


def _trust_option(q) -> None:
    """--trust-remote-code: the only way a command lets a model it loads run the Python code the model ships."""
    q.add_argument("--trust-remote-code", action="store_true",
                   help="let the models this command loads run the Python code they ship (auto_map); off by default, "
                   "and never turned on by a file inside an artifact: use it only for code you have read")


def _config_options(q, verb: str) -> None:
    """A pipeline config, the stages to `verb`, and overrides of its keys (rlhf run, rlhf plan)."""
    q.add_argument("config", help="pipeline YAML (see configs/)")
    q.add_argument("--stage", action="append", metavar="NAME", help=f"{verb} only this stage (repeatable)")
    q.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config key, e.g. stages.sft.optim.lr=1e-4 (list items by index or stage name)")


def _rows_options(q) -> None:
    """How the rows of a preference file are read (their choices come from feedback/)."""
    q.add_argument("--format", default="auto", choices=FORMATS, help="row format (default: detected; a file holds "
                   "the format of its first row, and a row of another is rejected)")
    q.add_argument("--keys", metavar="ROLE=NAME,...", help="key names, e.g. prompt=q,chosen=good,rejected=bad "
                   "(unpaired rows: completion=answer,label=thumbs_up)")


def _data_options(q, tokenizer: bool = True) -> None:
    """The options every `rlhf data` command takes."""
    q.add_argument("file", help="the preference file or dataset directory")
    _rows_options(q)
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


def _prompts_options(q) -> None:
    """The prompts a command samples answers to (rlhf feedback label, rlhf eval)."""
    q.add_argument("--prompts", required=True, help="file of {'prompt': ...} rows (or synthetic:prompts)")
    q.add_argument("--prompts-split", metavar="NAME", help="--prompts is a DatasetDict directory: the split to read "
                   "(default: train)")


def _field_options(q, model, block: str, names: typing.Iterable[str] | None = None) -> None:
    """One --option per field of a typed config block (all of them, or `names`), with the field's default."""
    for name in names or model.model_fields:
        field = model.model_fields[name]
        q.add_argument(f"--{name.replace('_', '-')}", type=type(field.default), default=field.default,
                       help=field.description or f"{block}.{name} (default {field.default})")


# --------------------------------------------------------------------------- the commands


def _add_run(sub) -> None:
    r = _command(sub, "run", commands.cmd_run, "run the stages of a pipeline config in order",
                 "Run the stages of a pipeline config in order. A stage whose complete manifest matches the current "
                 "config and inputs is skipped; a changed one reruns with everything downstream.")
    _config_options(r, "run")
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


def _add_plan(sub) -> None:
    pl = _command(sub, "plan", commands.cmd_plan, "estimate each training stage's peak memory per device before launch",
                  "Estimate each training stage's peak memory per device under ZeRO-0/1/2/3 with and without offload "
                  "(weights, gradients, optimizer states, activations, KV cache, PPO's models), say which fit and "
                  "which of those is fastest. Exit 1 if a stage fits in none.")
    _config_options(pl, "plan")
    pl.add_argument("--gpus", type=int, default=1, help="devices (processes) per node (default 1)")
    pl.add_argument("--nodes", type=int, default=1, help="nodes (default 1)")
    pl.add_argument("--gpu-memory", default="80GB", metavar="SIZE", help="memory per device, e.g. 80GB (default)")
    pl.add_argument("--cpu", action="store_true", help="plan a CPU run: fp32, host memory, the libraries' footprint")
    pl.add_argument("--prompt-tokens", type=int, default=256, metavar="N",
                    help="the longest prompt of online stages (PPO, GRPO, RLOO), which have no such setting (256)")
    pl.add_argument("--json", action="store_true", help="machine-readable output, bytes per part")


def _add_data(sub) -> None:
    dsub = _group(sub, "data", "ACTION", "validate, import and describe preference files",
                  "Preference files: JSONL, JSON arrays, CSV, TSV (each also .gz), Parquet or a local dataset "
                  "directory, in the formats pairs, messages, hh (Anthropic HH-RLHF transcripts), ranked or unpaired "
                  "(prompt, completion, label: binary feedback).")
    dv = _command(dsub, "validate", commands.cmd_data_validate,
                  "check every row; print FILE:LINE: reason and a summary line",
                  "Check every row of a preference file. Prints each problem as FILE:LINE: reason and ends with "
                  "'N rows: V valid, I invalid'. Exit 1 if any row is invalid.")
    _data_options(dv)
    di = _command(dsub, "import", commands.cmd_data_import, "write the canonical schema (JSONL or Parquet)",
                  "Convert a preference file to canonical JSONL (or Parquet: -o OUT.parquet), written as it is read. "
                  "With --on-error skip, rejected rows go to OUT.rejected.jsonl with their reasons.")
    _data_options(di)
    di.add_argument("-o", "--output", required=True, metavar="OUT.jsonl",
                    help="the canonical file: JSONL, or Parquet when it ends in .parquet")
    di.add_argument("--on-error", default="fail", choices=["fail", "skip"])
    ds = _command(dsub, "stats", commands.cmd_data_stats,
                  "rows, formats, lengths, ties, sources, annotators and their agreement")
    _data_options(ds)
    ds.add_argument("--json", action="store_true", help="print JSON")


def _add_reward(sub) -> None:
    rsub = _group(sub, "reward", "ACTION", "use a trained reward model", "Reward models trained by the reward stage.")
    rs = _command(rsub, "score", commands.cmd_reward_score, "score each row's response(s): raw and normalised",
                  "Score rows with a reward-model artifact. Rows hold 'prompt' and 'response', or 'chosen'/'rejected' "
                  "(both are scored). Text is tokenised with the reward model's own tokenizer; normalised = "
                  "(raw - mean) / std from the artifact's manifest.")
    rs.add_argument("--model", required=True, metavar="RUN_DIR/reward", help="reward-model artifact (or its model/)")
    rs.add_argument("--input", required=True, metavar="FILE", help="JSONL/JSON/CSV/Parquet rows to score")
    rs.add_argument("--output", "-o", metavar="OUT.jsonl", help="write here instead of printing")
    rs.add_argument("--batch-size", type=int, default=32)
    _trust_option(rs)


def _add_feedback(sub) -> None:
    fsub = _group(sub, "feedback", "ACTION", "AI-judge labels (RLAIF), agreement with human labels, export of users' "
                  "feedback", "Label policy samples with an AI judge, measure a judge against humans, or export the "
                  "feedback users gave a served policy.")
    fl = _command(fsub, "label", commands.cmd_feedback_label,
                  "sample k responses per prompt from a policy and let a judge pick",
                  "Sample k responses per prompt from a policy, judge pairs of them in both orders, and write "
                  "canonical preference pairs with source 'ai' (plus OUT.unlabelled.jsonl and OUT.judge.json with "
                  "calls, retries, tokens, cost and position consistency).")
    fl.add_argument("--policy", required=True, help="policy artifact (RUN_DIR/sft), its model/ dir, or a model ref")
    _prompts_options(fl)
    fl.add_argument("--judge", required=True, help="judge config, e.g. configs/judges/rule.yaml")
    fl.add_argument("-o", "--output", required=True, metavar="OUT.jsonl")
    # the same candidates, with the same defaults, as the ai_preferences stage's `candidates:` block
    _field_options(fl, CandidatesConfig, "candidates")
    pairing = AIPreferencesStageConfig.model_fields["pairing"]
    fl.add_argument("--pairing", default=pairing.default, choices=typing.get_args(pairing.annotation))
    fl.add_argument("--max-prompts", type=int)
    fl.add_argument("--seed", type=int, default=0)
    fl.add_argument("--min-position-consistency", type=float, default=MIN_POSITION_CONSISTENCY, metavar="SHARE",
                    help="refuse the labels of a judge whose verdicts agree in both orders on fewer pairs than this "
                         "(default %(default)s)")
    fl.add_argument("--allow-inconsistent", action="store_true",
                    help="write such labels anyway, with a warning")
    _trust_option(fl)
    fa = _command(fsub, "agree", commands.cmd_feedback_agree,
                  "a judge's accuracy, Cohen's kappa, tie/abstain rates against human labels",
                  "Judge human-labelled pairs (both orders) and report accuracy against the humans, Cohen's kappa, "
                  "tie and abstain rates and position consistency, as a table and in a JSON file.")
    fa.add_argument("--human", required=True, help="human preference file (any format rlhf data reads)")
    fa.add_argument("--judge", required=True, help="judge config")
    _rows_options(fa)
    fa.add_argument("--limit", type=int, help="judge only the first N pairs")
    fa.add_argument("--seed", type=int, default=0, help="which side the human-preferred response is shown on")
    fa.add_argument("-o", "--output", metavar="REPORT.json", help="default: agreement.json")
    fx = _command(fsub, "export", commands.cmd_feedback_export,
                  "users' feedback in a traffic log as preference pairs or unpaired rows",
                  "Turn the feedback recorded by `rlhf serve policy --monitor DB` into training data: --kind pairs "
                  "(default) writes each 'preferred_over' as a canonical preference pair, --kind unpaired each "
                  "thumbs up/down as {prompt, completion, label}. The latest feedback on an answer (or a pair of "
                  "answers) wins; every feedback row not exported is counted with its reason. The file passes "
                  "`rlhf data validate`.")
    fx.add_argument("db", metavar="DB", help="the traffic log (SQLite) written by serve --monitor")
    fx.add_argument("-o", "--output", required=True, metavar="OUT.jsonl")
    fx.add_argument("--kind", default="pairs", choices=EXPORT_KINDS, help="pairs (default) or unpaired")
    fx.add_argument("--annotator", metavar="NAME", help="recorded as every row's annotator (e.g. 'simulated' when a "
                    "rule gave the feedback)")


def _add_eval(sub) -> None:
    e = _command(sub, "eval", commands.cmd_eval,
                 "compare policies on held-out prompts: reward, rule, KL, length, win rates",
                 "The evaluate stage outside a run: every policy answers the same held-out prompts with the same "
                 "sampling settings and seed; per policy the reward-model score, rule reward, KL to a reference, "
                 "length, EOS rate and distinct-1/2; win rates against a baseline by a judge (both orders, ties "
                 "half, 95% Wilson interval). Writes samples.jsonl, table.csv, eval.json.")
    e.add_argument("policies", nargs="+", metavar="NAME=REF",
                   help="a policy artifact (RUN_DIR/sft), a model directory, or a model reference")
    _prompts_options(e)
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
    _field_options(e, SamplingConfig, "sampling", ("temperature", "top_p", "max_new_tokens"))
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("-o", "--output", required=True, metavar="OUT_DIR")
    _trust_option(e)


def _add_export(sub) -> None:
    x = _command(sub, "export", commands.cmd_export, "a policy artifact as a plain Hugging Face model directory",
                 "Write a policy artifact as a plain Hugging Face model directory (a LoRA adapter merged in, "
                 "safetensors, the tokenizer with its chat template, the generation config) that transformers, vLLM "
                 "and TGI load as is; with --adapter, the peft adapter alone.")
    x.add_argument("policy", metavar="RUN_DIR/STAGE", help="a policy artifact directory (or its model/)")
    x.add_argument("-o", "--output", required=True, metavar="DIR", help="a new (or empty) directory")
    x.add_argument("--adapter", action="store_true", help="write the peft adapter alone (lora.merge: false policies)")
    _trust_option(x)


def _serve_options(q) -> None:
    """One option per ServeOptions field, its default taken from there."""
    d = ServeOptions()
    q.add_argument("--host", default=d.host, help="address to bind (default %(default)s); any other needs --api-key-env")
    q.add_argument("--port", type=int, default=d.port, help="default %(default)s; 0 picks a free port (printed)")
    q.add_argument("--api-key-env", metavar="NAME", default=d.api_key_env,
                   help="environment variable holding the bearer token clients must send")
    q.add_argument("--max-body-bytes", type=int, default=d.max_body_bytes,
                   help=f"largest request body (default {d.max_body_bytes / MIB:g} MiB)")
    q.add_argument("--max-prompt-tokens", type=int, default=d.max_prompt_tokens,
                   help="longest prompt (default: the model's context - 1)")
    q.add_argument("--max-tokens", type=int, default=d.max_tokens,
                   help="cap on a request's max_tokens, and its default (%(default)s)")
    q.add_argument("--concurrency", type=int, default=d.concurrency,
                   help="requests generating at once (default %(default)s)")
    q.add_argument("--queue", type=int, default=d.queue,
                   help="requests waiting for a generation slot; beyond that 503 (%(default)s)")
    q.add_argument("--timeout", type=float, default=d.timeout,
                   help="seconds a client has to send its request headers and body (default %(default)g)")
    q.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help="seconds a connection may go without a complete request head, idle or sending slowly, "
                   "before it is closed (default %(default)g)")
    q.add_argument("--max-connections", type=int, default=d.max_connections,
                   help="open connections in all; at the cap the longest-idle one is closed for a new one "
                   "(%(default)s)")
    q.add_argument("--max-connections-per-client", type=int, default=d.max_connections_per_client,
                   help="open connections per client address, the same way (default %(default)s)")
    q.add_argument("--served-model-name", metavar="NAME", default=d.served_model_name,
                   help="the model name shown in /v1/models")
    _trust_option(q)


def _add_serve(sub) -> None:
    ssub = _group(sub, "serve", "WHAT", "serve a judge or a policy as an OpenAI-compatible endpoint",
                  "One OpenAI-compatible server (POST /v1/chat/completions, GET /v1/models, GET /health) for a judge "
                  "model or a trained policy. Prints 'serving NAME at http://HOST:PORT/v1 ...' when ready.")
    sj = _command(ssub, "judge", commands.cmd_serve_judge, "serve a model (e.g. a judge) by reference",
                  "Serve a model reference (tiny, smollm2-135m-instruct, a saved model directory, a hub id) for "
                  "`type: http` judge configs and any OpenAI client.")
    sj.add_argument("--model", required=True, help="model reference (tiny, smollm2-135m-instruct, a path)")
    _serve_options(sj)
    sj.set_defaults(monitor=None, monitor_max_rows=None)  # the traffic log is a policy's (below)
    sp = _command(ssub, "policy", commands.cmd_serve_policy, "serve a trained policy artifact",
                  "Serve a policy artifact (RUN_DIR/STAGE, e.g. runs/tiny/ppo) or its model/ directory; an adapter "
                  "is merged into its base.")
    sp.add_argument("policy", metavar="RUN_DIR/STAGE", help="policy artifact directory (or its model/)")
    _serve_options(sp)
    sp.add_argument("--monitor", metavar="DB", default=ServeOptions.monitor,
                    help="record every answered completion in this SQLite traffic log (created if missing) and take "
                    "user feedback on them at POST /v1/feedback; `rlhf monitor DB` reads it")
    sp.add_argument("--monitor-max-rows", type=int, metavar="N", default=ServeOptions.monitor_max_rows,
                    help="keep at most N completions in the traffic log, deleting the oldest with their feedback")


def _add_models(sub) -> None:
    msub = _group(sub, "models", "ACTION", "list or prepare model references",
                  "Model references: tiny, smollm2-135m-instruct, a local directory, or a hub id.")
    _command(msub, "list", commands.cmd_models_list, "list built-in references and what is cached")
    mp = _command(msub, "prepare", commands.cmd_models_prepare,
                  "build or convert references into the cache ahead of time")
    mp.add_argument("refs", nargs="+", metavar="REF")


def _add_report(sub) -> None:
    rp = _command(sub, "report", commands.cmd_report, "write a self-contained HTML report of a run directory",
                  "Write one self-contained HTML page (plots embedded, no JavaScript, no external URL) for a run "
                  "directory: the stages and their status, training curves, final metrics, time, memory, counts, data "
                  "left out, AI labels, evaluate results and the resolved configs. Works on partial runs.")
    rp.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (run_dir of a pipeline config)")
    rp.add_argument("-o", "--output", metavar="FILE", help="default: RUN_DIR/report.html")


def _add_monitor(sub) -> None:
    mo = _command(sub, "monitor", commands.cmd_monitor, "score and summarise a served policy's traffic log: drift, "
                  "reward hacking, a page",
                  "Score the answers a served policy recorded (rlhf serve policy --monitor DB) with a reward model, "
                  "a rule and/or a judge (only rows not scored by an earlier run into the same OUT_DIR), summarise "
                  "them per window (volume, latency, length, EOS, scores, thumbs-up rate), test each window for drift "
                  "against the evaluate stage's answers (two-sample KS), look for reward hacking (the reward rising "
                  "while the rule, judge or thumbs-up rate falls), and write OUT_DIR/monitor.json and monitor.html. "
                  "Write it to RUN_DIR/monitor and `rlhf report RUN_DIR` shows it. See docs/monitor.md.")
    mo.add_argument("db", metavar="DB", help="the traffic log (SQLite) the server wrote")
    mo.add_argument("--reward-model", metavar="RUN_DIR/reward", help="a reward-model artifact: normalised scores")
    mo.add_argument("--rule", metavar="MODULE:FUNCTION", help="a rule, e.g. feedback.synthetic:rule_score (registered "
                    "rules or trusted modules, as the evaluate stage's rule)")
    mo.add_argument("--judge", metavar="CONFIG", help="a judge config: each answer against the evaluate stage's "
                    "baseline answer to the same prompt (needs --baseline)")
    mo.add_argument("--baseline", metavar="RUN_DIR/evaluate", help="an evaluate artifact: the served policy's "
                    "answers there are the reference distribution")
    mo.add_argument("--baseline-policy", metavar="NAME", help="the evaluated policy the traffic comes from (default: "
                    "the one named like the served stage or model)")
    mo.add_argument("--window", default="100", metavar="N|DURATION", help="N completions a window (default "
                    "%(default)s), or a duration: 30m, 1h, 1d")
    mo.add_argument("--alpha", type=float, default=0.01, help="false-alarm level of the drift and hacking tests "
                    "(default %(default)s)")
    mo.add_argument("--min-rows", type=int, default=20, help="windows with fewer answers are not tested (default "
                    "%(default)s)")
    mo.add_argument("--batch-size", type=int, default=32, help="answers the reward model scores at once")
    mo.add_argument("-o", "--output", required=True, metavar="OUT_DIR", help="where monitor.json, monitor.html and "
                    "the scores of earlier runs (scores.sqlite) are; RUN_DIR/monitor for `rlhf report RUN_DIR`")
    _trust_option(mo)
