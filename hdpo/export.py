"""`hdpo export`: a published policy as a folder that transformers and vLLM load as they are. The trainer keeps
float32 master weights (an update of lr 1e-6 is below bf16's resolution), so its policy folders hold float32;
the export casts them to model.dtype (bf16 in the paper's config: half the size, the dtype the paper trains
and serves in), and writes the model card with the run's validation and, given `hdpo evaluate` results, its
benchmark numbers."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Sequence

import torch

from hdpo.config import Config
from hdpo.io import atomic_dir, read_jsonl
from hdpo.model_card import benchmark_numbers, validation_numbers, write_model_card

log = logging.getLogger(__name__)


def export_policy(cfg: Config, model_dir: str | Path, out: str | Path, results: Sequence[str | Path] = ()) -> Path:
    """`model_dir`: a policy folder of a run (results/runs/<run>/policy_final or policy_best; its run's
    val_problems.jsonl.gz beside it gives the validation numbers). `results`: its `hdpo evaluate` JSONs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out = Path(model_dir), Path(out)
    meta_path = model_dir / "hdpo_meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
    dtype = getattr(torch, cfg.model.dtype)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    tok = AutoTokenizer.from_pretrained(model_dir)
    val_path = model_dir.parent / "val_problems.jsonl.gz"
    records = read_jsonl(val_path) if val_path.exists() else []
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)  # safetensors; config.json records the dtype
        tok.save_pretrained(tmp)
        if meta:
            (tmp / "hdpo_meta.json").write_text(json.dumps(meta, indent=2))
        write_model_card(tmp, cfg, meta, validation_numbers(records, meta.get("model_step", -1), cfg.eval.pass_k),
                         benchmark_numbers([Path(r) for r in results], cfg.eval.pass_k))
    log.info("exported %s -> %s (%s)", model_dir, out, cfg.model.dtype)
    return out
