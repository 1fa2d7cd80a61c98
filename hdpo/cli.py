"""`hdpo <command>`: one subcommand per Snakemake rule. Each reads the config once and passes it down."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from hdpo.config import Config, ConfigError, load_config, parse_method

log = logging.getLogger("hdpo")

DEMO_HINT = "this is the paper's setup; on a CPU machine (or without the Hugging Face Hub) use config/demo.yaml"


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="YAML config (e.g. config/config.yaml or config/demo.yaml)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help="override config keys, e.g. --set grpo.max_num_steps=10 hdpo.teacher=frozen")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for torch (Snakemake passes the job's threads; avoids oversubscription)")


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="hdpo", description=__doc__)
    ap.add_argument("-v", "--verbose", action="store_true")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare-data", help="load sources, split 95/5, write train/val/benchmark files")
    _common(p)
    p.add_argument("--out", required=True, help="output folder (e.g. results/data)")
    p.add_argument("--data-dir", default=None, help="folder of local mirrors (default: $HDPO_DATA_DIR)")

    p = sub.add_parser("train", help="train one run (GRPO or HDPO)")
    _common(p)
    p.add_argument("--method", default=None, help="grpo | hdpo_<drifting|frozen>_lambda<w> (sets hdpo.*)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--data", required=True, help="folder written by prepare-data")
    p.add_argument("--run-dir", required=True, help="published outputs (metrics, summary, policies)")
    p.add_argument("--work-dir", required=True, help="resumable checkpoints; not a Snakemake output")
    p.add_argument("--model-cache", default=None, help="where converted models go (default: results/models)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in --work-dir if any")

    p = sub.add_parser("evaluate", help="evaluate a saved policy on a benchmark")
    _common(p)
    p.add_argument("--model", default=None, help="a policy folder written by train")
    p.add_argument("--base", action="store_true",
                   help="evaluate the untrained model of the config (model.*) instead of --model")
    p.add_argument("--model-cache", default=None, help="where converted models go (default: results/models)")
    p.add_argument("--benchmark", required=True)
    p.add_argument("--data", required=True, help="folder written by prepare-data")
    p.add_argument("--out", required=True, help="summary JSON path (samples go beside it)")

    p = sub.add_parser("report", help="tables or figures from aggregated results")
    p.add_argument("what", choices=["tables", "figures"])
    _common(p)
    p.add_argument("--results", default="results")
    p.add_argument("--out", required=True)
    return ap


def _config(args) -> Config:
    overrides = list(args.set)
    if getattr(args, "method", None):
        overrides += [f"{k}={v}" for k, v in parse_method(args.method).items()]
    if getattr(args, "seed", None) is not None:
        overrides.append(f"seed={args.seed}")
    return load_config(args.config, overrides)


def _require_gpu(cfg: Config) -> None:
    import torch

    if cfg.experiment.require_gpu and not torch.cuda.is_available():
        raise SystemExit(f"hdpo: no CUDA GPU here: {DEMO_HINT} (or set experiment.require_gpu: false)")


def main(argv: list[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        cfg = _config(args)
    except (ConfigError, ValueError) as err:
        raise SystemExit(f"hdpo: bad config: {err}") from None

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.command == "prepare-data":
        from hdpo.data import prepare_data

        try:
            summary = prepare_data(cfg, args.out, args.data_dir or os.environ.get("HDPO_DATA_DIR"))
        except ConnectionError as err:
            raise SystemExit(f"hdpo: cannot reach the Hugging Face Hub ({err}): {DEMO_HINT}") from None
        log.info("prepared data: %s", summary.get("counts", summary))
    elif args.command == "train":
        from hdpo.train import train

        _require_gpu(cfg)
        cache = args.model_cache or str(Path(args.run_dir).parent.parent / "models")
        train(cfg, args.data, args.run_dir, args.work_dir, cache, resume=args.resume)
    elif args.command == "evaluate":
        from hdpo.evaluate import evaluate_checkpoint

        _require_gpu(cfg)
        if args.base == bool(args.model):
            raise SystemExit("hdpo evaluate: give exactly one of --model DIR and --base")
        meta = None
        if args.base:  # the step-0 model: a row of its own in the benchmark tables
            from hdpo.models import resolve_model

            cache = args.model_cache or str(Path(args.out).resolve().parents[2] / "models")
            args.model = resolve_model(cfg.model, cache)
            meta = {"run": "base", "method": "base", "seed": cfg.seed, "checkpoint": "base", "model_step": 0}
        evaluate_checkpoint(cfg, args.model, args.benchmark, args.data, args.out, meta)
    elif args.command == "report":
        if args.what == "tables":
            from hdpo.report.tables import write_tables as write
        else:
            from hdpo.report.figures import write_figures as write
        for path in write(cfg, Path(args.results), Path(args.out)):
            log.info("wrote %s", path)


if __name__ == "__main__":
    main()
