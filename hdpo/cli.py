"""`hdpo <command>`: one subcommand per Snakemake rule. Each reads the config once and passes it down."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, NamedTuple

from hdpo.config import Config, ConfigError, explain, json_schema, load_config, run_config
from hdpo.data import DataError, prepare_data
from hdpo.io import atomic_write_text

# hdpo.checkpoint, .models, .train, .evaluate, .preflight and .report load torch, transformers or matplotlib
# (seconds): each is imported where a command needs it, so `hdpo --help` and `hdpo config` answer at once.

log = logging.getLogger("hdpo")

DEMO_HINT = "this is the paper's setup; on a CPU machine (or without the Hugging Face Hub) use config/demo.yaml"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (e.g. config/config.yaml or config/demo.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set grpo.max_num_steps=10 hdpo.teacher=frozen")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (Snakemake passes the job's threads; avoids oversubscription)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 1")
    return value


def _prepare_data_options(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--out", required=True, help="output folder (e.g. results/data)")
    p.add_argument("--data-dir", default=None, help="folder of local mirrors (default: $HDPO_DATA_DIR)")
    p.add_argument("--splits", action="store_true", help="write the train/validation split (and summary.json); "
                                                          "with --benchmark, only what is named")
    p.add_argument("--benchmark", action="append", default=None, metavar="NAME",
                   help="write this benchmark's file (repeatable); neither option: the split and every benchmark")


def _train_options(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--method", default=None, help="a name under experiment.methods (its record sets hdpo.* and "
                                                  "its other settings)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--data", required=True, help="folder written by prepare-data")
    p.add_argument("--run-dir", required=True, help="published outputs (metrics, summary, policies)")
    p.add_argument("--work-dir", required=True, help="resumable checkpoints; not a Snakemake output")
    p.add_argument("--model-cache", default=None, help="where converted models go (default: results/models)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work-dir if any")
    _stop_with(p)


def _stop_with(p: argparse.ArgumentParser) -> None:
    p.add_argument("--stop-with", type=int, default=None, metavar="PID",
                   help="stop (as on Ctrl-C) once this process is gone; the workflow passes its Snakemake's pid")


def _evaluate_options(p: argparse.ArgumentParser) -> None:
    _common(p)
    _stop_with(p)
    p.add_argument("--model", default=None, help="a policy folder written by train")
    p.add_argument("--base", action="store_true",
                   help="evaluate the untrained model of the config (model.*) instead of --model")
    p.add_argument("--model-cache", default=None, help="where converted models go (default: results/models)")
    p.add_argument("--benchmark", required=True)
    p.add_argument("--data", required=True, help="folder written by prepare-data")
    p.add_argument("--out", required=True, help="summary JSON path (samples go beside it)")
    p.add_argument("--method", default=None, help="the run's method (its record's settings apply)")
    p.add_argument("--reuse", nargs="*", default=[], metavar="RESULT",
                   help="results of other checkpoints to copy when they come from the same model files, "
                        "settings and code (the workflow passes a run's final result to its best checkpoint)")


def _preflight_options(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--out", default="results/preflight/verdict.json", help="the verdict as JSON")
    p.add_argument("--work-dir", default=None, help="scratch space, also for the timed checkpoint "
                                                    "(default: beside --out)")
    p.add_argument("--tiny", action="store_true", help="tiny shape also on a GPU (automatic without CUDA)")
    p.add_argument("--skip-resume", action="store_true", help="leave out the kill/resume run")
    p.add_argument("--skip-checkpoint", action="store_true", help="leave out the timed checkpoint write")
    p.add_argument("--gen-baseline", action="store_true",
                   help="also measure transformers' own generate on the same bf16 copy, and ours from the "
                        "float32 master under autocast (baselines in the same run)")
    p.add_argument("--gen-batch", type=_positive_int, default=None, help="generation batch (default 256; tiny 8)")
    p.add_argument("--gen-new", type=_positive_int, default=None, help="new tokens per sequence (default 256; tiny 16)")


def _report_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("what", choices=["tables", "figures"])
    _common(p)
    p.add_argument("--results", default="results")
    p.add_argument("--out", required=True)


def _clean_options(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--results", default="results", help="the results folder (its runs/ hold the published runs)")
    p.add_argument("--apply", action="store_true", help="free what the policy lets go (default: only show it)")


def _export_options(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("--model", required=True, help="a policy folder written by train (results/runs/<run>/policy_best)")
    p.add_argument("--out", required=True, help="the folder to write (transformers / vLLM load it as is)")
    p.add_argument("--results", nargs="*", default=[], metavar="RESULT",
                   help="its `hdpo evaluate` results (results/eval/<run>/best/*.json) for the model card")


def _config_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="YAML config to explain (default: the built-in defaults)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="override config keys")
    p.add_argument("--explain", action="store_true", help="list every key: value, type, doc, paper's value (default)")
    p.add_argument("--schema", action="store_true", help="print the JSON schema generated from the typed config")
    p.add_argument("--method", default=None, help="explain one method's run config")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hdpo", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        command.add_options(sub.add_parser(name, help=command.help))
    return ap


def _config(args) -> Config:
    method = getattr(args, "method", None)
    # a job checks the merged config and its own run config, once each (the workflow checked every method's)
    cfg = load_config(args.config, list(args.set), check_runs=not method)
    if method:
        return run_config(cfg, method, getattr(args, "seed", None))
    if getattr(args, "seed", None) is not None:
        cfg.seed = args.seed
    return cfg


# A missing or unwritable path, a full disk or quota: one line. Other OSErrors (too many open files, a broken
# pipe to a worker) may be bugs and keep their traceback.
_PATH_ERRNOS = {errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EEXIST, errno.EACCES, errno.EPERM, errno.EROFS,
                errno.ENOSPC, errno.EDQUOT, errno.ENAMETOOLONG}


def _user_error(err: BaseException) -> str:
    """One line for a mistake in the user's input (a path, a file's content, the network), else ''."""
    from hdpo.checkpoint import RunError
    from hdpo.models import ModelSourceError

    if isinstance(err, (DataError, ModelSourceError, RunError)):
        return str(err)
    if isinstance(err, OSError) and err.errno in _PATH_ERRNOS:  # the machine's state, not a bug
        return f"{err.filename}: {err.strerror}" if err.filename else (err.strerror or str(err))
    return ""


def _require_gpu(cfg: Config) -> None:
    import torch

    if cfg.experiment.require_gpu and not torch.cuda.is_available():
        raise SystemExit(f"hdpo: no CUDA GPU here: {DEMO_HINT} (or set experiment.require_gpu: false)")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if not sys.stderr.isatty():  # in a job's log a library's progress bar is noise; our log lines say it
        for var in ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS"):  # transformers', the
            os.environ.setdefault(var, "1")  # Hub's and datasets' bars (read when each library is imported)
    try:
        cfg = _config(args)
    except (ConfigError, ValueError) as err:
        raise SystemExit(f"hdpo: bad config: {err}") from None
    watch = None
    if getattr(args, "stop_with", None):
        from hdpo.watchdog import stop_with

        watch = stop_with(args.stop_with, what=f"hdpo {args.command}")
    try:
        _run(args, cfg)
    except KeyboardInterrupt:  # Ctrl-C, or the watched Snakemake gone (train says where it stopped itself)
        raise SystemExit(f"hdpo {args.command}: interrupted: rerun the same command") from None
    except Exception as err:  # a user's mistake gets one line; a bug keeps its traceback
        line = _user_error(err)
        if not line or args.verbose:
            raise
        raise SystemExit(f"hdpo {args.command}: {line}") from None
    finally:
        if watch is not None:
            watch.set()


def _run(args, cfg: Config) -> None:
    if getattr(args, "threads", None):  # `config` has no --threads
        import torch

        torch.set_num_threads(args.threads)
    COMMANDS[args.command].run(args, cfg)


def _run_prepare_data(args, cfg: Config) -> None:
    from hdpo.checkpoint import check_writable

    check_writable(args.out, "prepared data")
    try:
        only = args.splits or args.benchmark  # the workflow's jobs each ask for one part
        summary = prepare_data(cfg, args.out, args.data_dir,  # None: $HDPO_DATA_DIR
                               splits=args.splits or not only, benchmarks=args.benchmark or ([] if only else None))
    except ConnectionError as err:
        raise SystemExit(f"hdpo: cannot reach the Hugging Face Hub ({err}): {DEMO_HINT}") from None
    log.info("prepared data: %s", summary.get("counts", summary))


def _run_train(args, cfg: Config) -> None:
    from hdpo.checkpoint import RunError
    from hdpo.train import train

    _require_gpu(cfg)
    for name in ("train.jsonl", "val.jsonl"):
        if not (Path(args.data) / name).is_file():
            raise FileNotFoundError(2, "no such file (give --data the folder written by prepare-data)",
                                    str(Path(args.data) / name))
    cache = args.model_cache or str(Path(args.run_dir).parent.parent / "models")
    try:
        train(cfg, args.data, args.run_dir, args.work_dir, cache, resume=args.resume)
    except RunError as err:  # non-finite step, full disk, busy or unwritable folder: one line, no traceback
        raise SystemExit(f"hdpo: {err}") from None


def _run_evaluate(args, cfg: Config) -> None:
    from hdpo.checkpoint import check_writable
    from hdpo.evaluate import evaluate_checkpoint
    from hdpo.models import resolve_model

    _require_gpu(cfg)
    if args.base == bool(args.model):
        raise SystemExit("hdpo evaluate: give exactly one of --model DIR and --base")
    model, meta = args.model, None
    if args.base:  # the step-0 model: a row of its own in the benchmark tables
        model = resolve_model(cfg.model, args.model_cache or str(Path(args.out).resolve().parents[2] / "models"))
        meta = {"run": "base", "method": "base", "seed": cfg.seed, "checkpoint": "base", "model_step": 0}
    elif not Path(model).is_dir():
        raise FileNotFoundError(2, "no such policy folder (written by train)", model)
    check_writable(Path(args.out).parent, "evaluation output")  # before the evaluation, not after it
    evaluate_checkpoint(cfg, model, args.benchmark, args.data, args.out, meta, reuse=args.reuse)


def _run_preflight(args, cfg: Config) -> None:
    from hdpo.checkpoint import check_writable
    from hdpo.preflight import preflight, table

    out = Path(args.out)
    check_writable(out.parent, "preflight verdict")
    verdict = preflight(cfg, Path(args.work_dir) if args.work_dir else out.parent / "work",
                        tiny=True if args.tiny else None, resume_check=not args.skip_resume,
                        checkpoint_check=not args.skip_checkpoint, gen_batch=args.gen_batch,
                        gen_new=args.gen_new, gen_baseline=args.gen_baseline)
    print(table(verdict))  # first: a verdict that cannot be written is still seen
    atomic_write_text(out, json.dumps(verdict, indent=2, default=str))
    log.info("wrote %s", out)
    if not verdict["fits"]:
        raise SystemExit(1)


def _run_clean(args, cfg: Config) -> None:
    from hdpo import retention
    from hdpo.layout import CHECKPOINTS_DIR

    checkpoints = Path(cfg.checkpoint.dir or CHECKPOINTS_DIR)
    folders = retention.survey(checkpoints, Path(args.results) / "runs", cfg.checkpoint.keep_finished_state,
                               cfg.checkpoint.keep_superseded)
    print(f"work folders under {checkpoints} (checkpoint.keep_finished_state: "
          f"{str(cfg.checkpoint.keep_finished_state).lower()}, checkpoint.keep_superseded: "
          f"{str(cfg.checkpoint.keep_superseded).lower()})\n")
    print(retention.table(folders))
    if args.apply:
        print(f"freed {retention.human(retention.apply(folders))}")
    elif any(f.free for f in folders):
        print("(nothing deleted: add --apply)")


def _run_report(args, cfg: Config) -> None:
    from hdpo.checkpoint import check_writable

    if not Path(args.results).is_dir():  # else every table would be written full of dashes
        raise FileNotFoundError(2, "no such results folder", args.results)
    check_writable(args.out, "report output")
    if args.what == "tables":
        from hdpo.report.tables import write_tables as write
    else:
        from hdpo.report.figures import write_figures as write
    for path in write(cfg, Path(args.results), Path(args.out)):
        log.info("wrote %s", path)


def _run_export(args, cfg: Config) -> None:
    from hdpo.checkpoint import check_writable
    from hdpo.export import export_policy

    if not Path(args.model).is_dir():
        raise FileNotFoundError(2, "no such policy folder (written by train)", args.model)
    check_writable(Path(args.out).resolve().parent, "export output")
    export_policy(cfg, args.model, args.out, args.results)


def _mechanism_options(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.add_argument("what", choices=["reference", "measure", "report"],
                   help="reference: draw the fixed privileged responses from the untrained model; measure: one "
                        "policy (--model, or --base) on every training problem; report: the outcomes table and "
                        "figure")
    p.add_argument("--data", required=True, help="folder written by prepare-data (its train.jsonl is the pool)")
    p.add_argument("--reference", default=None, help="the reference file (measure)")
    p.add_argument("--model", default=None, help="a policy folder written by train (measure)")
    p.add_argument("--base", action="store_true", help="measure the untrained model of the config")
    p.add_argument("--model-cache", default=None, help="where converted models go (default: results/models)")
    p.add_argument("--results", default="results/mechanism", help="runs/ and measure/ of the experiment (report)")
    p.add_argument("--figures", default="figures", help="where mechanism.png/pdf go (report)")
    p.add_argument("--out", default=None, help="the JSONL to write (reference, measure)")


def _run_mechanism(args, cfg: Config) -> None:
    from hdpo import mechanism
    from hdpo.checkpoint import check_writable
    from hdpo.data import read_problems
    from hdpo.io import read_jsonl, write_jsonl
    from hdpo.models import resolve_model

    if args.what == "report":
        from hdpo.report.mechanism import write

        check_writable(args.results, "mechanism report")
        for path in write(cfg, args.results, args.figures):
            log.info("wrote %s", path)
        return
    if not args.out:
        raise SystemExit(f"hdpo mechanism {args.what}: give --out FILE")
    problems = read_problems(Path(args.data) / "train.jsonl")
    cache = args.model_cache or "results/models"
    check_writable(Path(args.out).resolve().parent, "mechanism output")
    if args.what == "reference":
        rows = mechanism.draw_references(cfg, problems, resolve_model(cfg.model, cache))
    else:
        if args.base == bool(args.model) or not args.reference:
            raise SystemExit("hdpo mechanism measure: give --reference FILE and exactly one of --model DIR, --base")
        if args.model and not Path(args.model).is_dir():
            raise FileNotFoundError(2, "no such policy folder (written by train)", args.model)
        model = resolve_model(cfg.model, cache) if args.base else args.model
        rows = mechanism.measure_policy(cfg, problems, read_jsonl(args.reference), model)
    write_jsonl(args.out, rows)
    log.info("wrote %s", args.out)


def _run_config(args, cfg: Config) -> None:
    print(json.dumps(json_schema(), indent=1, ensure_ascii=False) if args.schema else explain(cfg))


class Command(NamedTuple):
    help: str
    add_options: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace, Config], None]


COMMANDS = {  # in the order `hdpo --help` lists them
    "prepare-data": Command("load sources, split 95/5, write train/val/benchmark files",
                            _prepare_data_options, _run_prepare_data),
    "train": Command("train one run (GRPO or HDPO)", _train_options, _run_train),
    "evaluate": Command("evaluate a saved policy on a benchmark", _evaluate_options, _run_evaluate),
    "preflight": Command("check this node before a long run: kill/resume, memory, speed, verdict",
                         _preflight_options, _run_preflight),
    "report": Command("tables or figures from aggregated results", _report_options, _run_report),
    "clean": Command("show (and with --apply free) superseded work folders and finished runs' resumable state",
                     _clean_options, _run_clean),
    "export": Command("a policy as a bf16 (model.dtype) transformers folder with its model card",
                      _export_options, _run_export),
    "mechanism": Command("the mechanism experiment: reference responses, one policy's measurements, the report",
                         _mechanism_options, _run_mechanism),
    "config": Command("list every config key (doc, value, paper's value) or print the schema",
                      _config_options, _run_config),
}


if __name__ == "__main__":
    main()
