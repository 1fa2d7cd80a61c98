"""`hdpo preflight`: check a node in minutes before a long run.

  (a) resume: a tiny model (random weights, a byte-level tokenizer built here) trains 3 steps in the configured
      dtype on this device; the same run is killed (SIGKILL, in a subprocess) right after its step-2
      checkpoint and resumed; both trajectories must agree (metrics and final weights).
  (b) memory and speed at the configured model's shape (its config.json when reachable, else a built-in copy
      of Qwen2.5-Math-1.5B's), random weights: the peak memory of one update micro-batch at the configured
      token budget (GRPO and distillation parts, then the AdamW step, in steady state), with the generation
      engine's share of the GPU reserved; the transformers backend's generation tokens/s; the time to write a
      checkpoint with the trainer's own check and writer (`hdpo.checkpoint.save_training_state`).
  (c) a verdict (fits or not, the numbers, the estimated hours for the configured steps), printed as a table
      and written as JSON.

Without CUDA (or with --tiny) the same steps run at a tiny shape, so tests and CI exercise the command.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoConfig, AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config)

from hdpo import checkpoint as ckpt
from hdpo.config import Config, from_dict, method_records
from hdpo.data import Problem
from hdpo.generation import Sampling, TransformersGenerator, generation_copy
from hdpo.io import write_jsonl
from hdpo.models import autocast, dynamic_shape_attention, enable_activation_checkpointing, eval_mode
from hdpo.reward import RewardStats
from hdpo.train import Trainer
from hdpo.update import DistillItem, GrpoItem, MicroBatching, Objective, accumulate_gradients

log = logging.getLogger(__name__)
GIB = 2 ** 30

# Qwen/Qwen2.5-Math-1.5B(-Instruct) config.json (the shape only: the weights here are random)
QWEN25_MATH_15B = {
    "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_act": "silu", "hidden_size": 1536,
    "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12, "num_key_value_heads": 2,
    "max_position_embeddings": 4096, "max_window_layers": 21, "rms_norm_eps": 1e-06, "rope_theta": 10000.0,
    "sliding_window": 4096, "use_sliding_window": False, "tie_word_embeddings": True, "vocab_size": 151936,
    "bos_token_id": 151643, "eos_token_id": 151645, "attention_dropout": 0.0, "initializer_range": 0.02,
    "use_cache": True,
}
TINY = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 512}
TINY_TOKEN_BUDGET = 1024


# --- a model shape with random weights ------------------------------------------------------------------

def model_shape(name: str, tiny: bool):
    """The configured model's transformers config (local or cached config.json), else Qwen2.5-Math-1.5B's."""
    source = "built-in Qwen2.5-Math-1.5B"
    try:  # a local folder or the Hub cache first; the Hub itself only when it answers at once
        try:
            cfg = AutoConfig.from_pretrained(name, local_files_only=True)
        except Exception:
            if tiny or not _hub_reachable():
                raise
            cfg = AutoConfig.from_pretrained(name)
        source = f"{name} config.json"
    except Exception as err:  # no Hub, no cache, a GGUF-only model: the paper's shape
        log.info("preflight: no config.json for %s (%s); using the built-in Qwen2.5-Math-1.5B shape",
                 name, type(err).__name__)
        cfg = Qwen2Config(**{k: v for k, v in QWEN25_MATH_15B.items() if k not in ("architectures", "model_type")})
    if tiny:
        for k, v in TINY.items():
            setattr(cfg, k, v)
        source += " (tiny)"
    return cfg, source


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", ""):
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def random_model(shape, device: torch.device, activation_checkpointing: bool):
    torch.manual_seed(0)
    with device:  # initialise in place on the GPU (a 1.5B CPU init takes minutes)
        model = AutoModelForCausalLM.from_config(shape, dtype=torch.float32)
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    return model.train()


class IdTokenizer:
    """What the generator needs of a tokenizer when prompts are token ids (throughput only)."""

    def __init__(self, vocab_size: int):
        self.pad_token_id, self.eos_token_id = 0, vocab_size - 1

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return " ".join(map(str, ids))


# --- (b) memory and speed -------------------------------------------------------------------------------

def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def micro_batch_shape(cfg: Config, budget: Optional[int], tiny: bool) -> tuple[int, int, int]:
    """(sequences, prompt tokens, response tokens) of the largest micro-batch the config allows."""
    length = min(cfg.model.max_total_sequence_length, budget or cfg.model.max_total_sequence_length)
    if tiny:
        length = min(length, 256)
    n = cfg.grpo.micro_batch_size if budget is None else max(1, min(cfg.grpo.micro_batch_size, budget // length))
    prompt = max(1, length // 8)
    return n, prompt, length - prompt


def measure_update(model, cfg: Config, device: torch.device, budget: Optional[int], tiny: bool,
                   update_fn=None) -> dict:
    """Peak memory and time of one update micro-batch (GRPO part, distillation part, AdamW step), measured on
    the second of two such updates so that the AdamW states exist (the steady state of a run)."""
    n, plen, rlen = micro_batch_shape(cfg, budget, tiny)
    V, k = model.config.vocab_size, cfg.hdpo.topk_logits_k
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, V, (plen,), generator=g).tolist() for _ in range(n)]
    responses = [torch.randint(0, V, (rlen,), generator=g).tolist() for _ in range(n)]
    grpo = [GrpoItem(p, r, 1.0 if i % 2 else -1.0) for i, (p, r) in enumerate(zip(prompts, responses))]
    distill = [DistillItem(p, r, torch.randn(rlen, k, generator=g), torch.randint(0, V, (rlen, k), generator=g))
               for p, r in zip(prompts, responses)]
    o = cfg.optimizer
    opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay)
    amp = lambda: autocast(device, cfg.model.dtype)
    micro = MicroBatching(cfg.grpo.micro_batch_size, budget, cfg.grpo.sequence_packing, cfg.grpo.logprob_chunk_size)
    tokens = n * rlen
    result = {"sequences": n, "prompt_tokens": plen, "response_tokens": rlen, "tokens": n * (plen + rlen)}
    try:
        with dynamic_shape_attention():  # as the trainer runs
            for it in range(2):
                opt.zero_grad(set_to_none=False)
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                _sync(device)
                t = time.perf_counter()
                if update_fn is not None:  # e.g. a baseline implementation (scripts/gpu_check.py)
                    update_fn(model, grpo, distill, amp)
                else:
                    accumulate_gradients(model, grpo, [], (tokens, tokens), Objective(0.1), micro, amp)
                    accumulate_gradients(model, [], distill, (tokens, tokens), Objective(0.1), micro, amp)
                opt.step()
                _sync(device)
                result["seconds"] = time.perf_counter() - t
        result["ok"] = True
    except torch.OutOfMemoryError as err:
        result.update(ok=False, error=f"out of memory: {str(err).splitlines()[0]}")
    if device.type == "cuda":
        result["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    result["optimizer"] = opt
    return result


def measure_generation(model, cfg: Config, batch: int, prompt_len: int, new_tokens: int,
                       engine: str = "ours") -> dict:
    """Tokens/s on random prompt ids (no EOS in practice: random weights). `engine`: "ours" (the transformers
    backend: hdpo.decode on the bf16 copy), "hf_generate" (transformers' own `generate` sampling from the same
    bf16 copy: the library's baseline) or "fp32_autocast" (ours on the float32 master under autocast)."""
    V = model.config.vocab_size
    gen = TransformersGenerator(model, IdTokenizer(V), batch, prompt_len + new_tokens)
    gen.model = model if engine == "fp32_autocast" else generation_copy(model, cfg.model.dtype)
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, V - 1, (prompt_len,), generator=g).tolist() for _ in range(batch)]
    s = Sampling(cfg.generation.temperature, cfg.generation.top_p, new_tokens)
    device = next(model.parameters()).device

    def run(prompts: list[list[int]]) -> int:
        if engine != "hf_generate":
            return sum(len(r.response_ids) for r in gen.generate_ids(prompts, s))
        ids = torch.tensor(prompts, device=device)
        with eval_mode(gen.model):  # as ours samples
            out = gen.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True, top_k=0,
                                     top_p=s.top_p, temperature=s.temperature, max_new_tokens=new_tokens,
                                     eos_token_id=V - 1, pad_token_id=0)
        return int((out[:, ids.shape[1]:] != 0).sum())

    with autocast(device, cfg.model.dtype), torch.no_grad(), dynamic_shape_attention():
        # The warm-up pays the process's one-off costs (CUDA context, cuBLAS handles, allocator growth) with
        # prompts one token shorter, so the measured run meets only attention shapes it has not seen, as each
        # step of a training run does: a kernel that caches work per shape shows its real cost here.
        run([p[1:] or p for p in prompts])
        _sync(device)
        t = time.perf_counter()
        tokens = run(prompts)
        _sync(device)
    seconds = time.perf_counter() - t
    copy_dtype = str(next(gen.model.parameters()).dtype).replace("torch.", "")
    del gen
    return {"engine": engine, "batch": batch, "prompt_tokens": prompt_len, "new_tokens": new_tokens,
            "generated": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds, "weights": copy_dtype}


def measure_checkpoint(model, optimizer, work_dir: Path) -> dict:
    """Seconds and size of one resumable checkpoint, checked and written as the trainer does it
    (`hdpo.checkpoint.nonfinite_training_state`, then `save_training_state`)."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    path = work_dir / "checkpoint.pt"
    work_dir.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    ckpt.nonfinite_training_state(model, optimizer)  # the trainer's check before every write
    ckpt.save_training_state(path, 1, {}, model, optimizer, scheduler,
                             {"reward_stats": RewardStats().as_dict(), "wall_s": 0.0})
    seconds = time.perf_counter() - t
    size = path.stat().st_size
    path.unlink()
    return {"seconds": seconds, "gib": size / GIB}


# --- (a) kill and resume a tiny run ---------------------------------------------------------------------

def build_tiny_model(folder: Path) -> Path:
    """A random 2-layer Llama and a byte-level tokenizer with a chat template, saved as a transformers folder."""
    if (folder / "config.json").exists():
        return folder
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    specials = ["<|pad|>", "<|end|>"]
    vocab = {c: i for i, c in enumerate(specials + alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", eos_token="<|end|>")
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = 1
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def tiny_run_config(cfg: Config, model_dir: Path, steps: int) -> Config:
    """The user's dtype, precision and micro-batching on a tiny model, small enough for seconds per step."""
    g = cfg.grpo
    return from_dict({
        "seed": cfg.seed,
        "model": {"name": str(model_dir), "dtype": cfg.model.dtype, "max_total_sequence_length": 768,
                  "activation_checkpointing": cfg.model.activation_checkpointing},
        "grpo": {"num_prompts_per_step": 2, "num_generations_per_prompt": 2, "max_num_steps": steps,
                 "micro_batch_size": g.micro_batch_size, "micro_batch_tokens": g.micro_batch_tokens,
                 "sequence_packing": g.sequence_packing, "logprob_chunk_size": g.logprob_chunk_size},
        "hdpo": {"distill_weight": 0.1, "teacher": "drifting", "privileged_info": "answer",
                 "max_cliff_prompts_per_step": 2, "topk_logits_k": 8, "teacher_min_reward": 0.0},
        "optimizer": {"lr": 1e-3, "warmup_steps": 0},
        "generation": {"backend": "transformers", "max_new_tokens": 8, "batch_size": 8},
        "eval": {"val_period": 1000, "num_samples": 1, "pass_k": [1], "greedy": False, "reward_workers": 0},
        "checkpoint": {"save_period": 1, "keep_best": False},
        "experiment": {"methods": {"preflight": {"label": "preflight", "teacher": "drifting", "distill_weight": 0.1}},
                       "benchmarks": [], "require_gpu": False},
        "benchmarks": {},
    })


def _write_tiny_data(folder: Path) -> Path:
    probs = [Problem(f"pre:{i}", f"What is {i} + {i}?", None, str(2 * i), "preflight") for i in range(6)]
    write_jsonl(folder / "train.jsonl", [p.to_dict() for p in probs])
    write_jsonl(folder / "val.jsonl", [p.to_dict() for p in probs[:2]])
    return folder


def _tiny_trainer(cfg: Config, data: Path, root: Path, name: str):
    return Trainer(cfg, data, root / "runs" / name, root / "work" / name, root / "models")


def check_resume(cfg: Config, root: Path, steps: int = 3, kill_after: int = 2) -> dict:
    """Uninterrupted run vs the same run SIGKILLed after its step-`kill_after` checkpoint and resumed."""
    t = time.perf_counter()
    model_dir = build_tiny_model(root / "tiny_model")
    data = _write_tiny_data(root / "data")
    tcfg = tiny_run_config(cfg, model_dir, steps)
    (root / "tiny.json").write_text(json.dumps(tcfg.to_dict()))
    full = _tiny_trainer(tcfg, data, root, "full")
    full.fit(resume=False)
    # SIGKILLed right after its step-`kill_after` checkpoint, as a preempted job dies (hdpo.faults: no cleanup)
    cmd = [sys.executable, "-m", "hdpo.preflight", "--killed-run", str(root)]
    proc = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "HDPO_FAULT": f"kill@checkpoint:{kill_after}"})
    killed = proc.returncode == -signal.SIGKILL
    resumed = _tiny_trainer(tcfg, data, root, "cut")
    resumed.fit(resume=True)
    strip = lambda tr: [{k: v for k, v in r.items() if not k.startswith("time/")}
                        for r in _rows(tr.metrics_path) if r["kind"] == "train"]
    # CPU runs repeat bit for bit; CUDA kernels with atomics (e.g. the embedding's backward) may differ in the
    # last bits between any two runs, so there the check allows float round-off
    tol = 0.0 if full.device.type == "cpu" else 1e-5
    same_metrics = _same_rows(strip(full), strip(resumed), tol)
    diff = max(float((a.float() - b.float()).abs().max()) for a, b in
               zip(full.policy.state_dict().values(), resumed.policy.state_dict().values()))
    rows = strip(full)
    tokens = {k: sum(r[k] for r in rows) for k in ("tokens/grpo", "tokens/distill")}
    ok = killed and same_metrics and diff <= tol and tokens["tokens/grpo"] > 0
    return {"ok": ok, "killed_by_sigkill": killed, "same_metrics": same_metrics, "max_weight_diff": diff,
            "tokens": tokens,
            "steps": steps, "killed_after_step": kill_after, "device": str(full.device),
            "dtype": tcfg.model.dtype, "seconds": time.perf_counter() - t,
            **({} if killed else {"killed_run_stderr": proc.stderr[-1500:]})}


def _same_rows(a: list[dict], b: list[dict], tol: float) -> bool:
    def same(x, y):
        if isinstance(x, float) and isinstance(y, float):
            return x == y or abs(x - y) <= tol * max(1.0, abs(x))
        return x == y
    return len(a) == len(b) and all(r.keys() == s.keys() and all(same(r[k], s[k]) for k in r) for r, s in zip(a, b))


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# --- (c) the whole check ---------------------------------------------------------------------------------

def preflight(cfg: Config, work_dir: Path, tiny: Optional[bool] = None, resume_check: bool = True,
              checkpoint_check: bool = True, gen_batch: Optional[int] = None, gen_prompt: int = 128,
              gen_new: Optional[int] = None, gen_baseline: bool = False) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = device.type != "cuda" if tiny is None else tiny
    work_dir = Path(work_dir)
    work_dir.mkdir(parents=True, exist_ok=True)
    verdict: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                     "dtype": cfg.model.dtype, "tiny": tiny}
    if resume_check:
        with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
            verdict["resume"] = check_resume(cfg, Path(tmp))

    shape, source = model_shape(cfg.model.name, tiny)
    budget = cfg.grpo.micro_batch_tokens
    if tiny:
        budget = min(budget or TINY_TOKEN_BUDGET, TINY_TOKEN_BUDGET)
    total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    reserve = cfg.generation.gpu_memory_utilization if cfg.generation.backend == "vllm" else 0.0
    if total is not None and reserve > 0:
        torch.cuda.set_per_process_memory_fraction(1.0 - reserve)  # the engine's share is not ours to use
    model = random_model(shape, device, cfg.model.activation_checkpointing)
    params = sum(p.numel() for p in model.parameters())
    verdict["model"] = {"shape": source, "parameters": params, "vocab": shape.vocab_size,
                        "layers": shape.num_hidden_layers, "hidden": shape.hidden_size}
    # what else the trainer holds on the GPU counts too: the transformers backend's bf16 sampling copy, and a
    # frozen teacher (in the config's dtype) when any configured method uses one

    frozen = any(r.teacher == "frozen" and r.distill_weight > 0 for r in method_records(cfg).values())
    keep = [generation_copy(model, cfg.model.dtype) for on in (cfg.generation.backend == "transformers", frozen)
            if on]
    upd = measure_update(model, cfg, device, budget, tiny)
    upd["also_resident"] = {"generation_copy": cfg.generation.backend == "transformers", "frozen_teacher": frozen}
    opt = upd.pop("optimizer")
    limit = total * (1.0 - reserve) if total is not None else None
    upd["limit_gib"] = limit / GIB if limit else None
    upd["engine_share"] = reserve
    upd["fits"] = bool(upd["ok"] and (limit is None or upd.get("peak_gib", 0) * GIB <= limit))
    verdict["update"] = upd
    del keep
    if checkpoint_check and upd["ok"]:
        verdict["checkpoint"] = measure_checkpoint(model, opt, work_dir / "ckpt")
    del opt
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
    gb = gen_batch or (256 if not tiny else 8)
    gn = gen_new or (256 if not tiny else 16)
    gp = gen_prompt if not tiny else 16
    gens = {"bf16_copy": measure_generation(model, cfg, gb, gp, gn)}
    if gen_baseline:
        for engine in ("hf_generate", "fp32_autocast"):
            gens[engine] = measure_generation(model, cfg, gb, gp, gn, engine)
    verdict["generation"] = gens
    verdict["estimate"] = estimate_hours(cfg, upd, gens["bf16_copy"])
    verdict["fits"] = upd["fits"] and verdict.get("resume", {"ok": True})["ok"]
    return verdict


def estimate_hours(cfg: Config, upd: dict, gen: dict) -> dict:
    """Hours for the configured steps, assuming every response runs to max_new_tokens (an upper bound) and the
    update runs at the measured micro-batch's tokens/s. An HDPO method (any in experiment.methods) adds its
    privileged rollouts on top, bounded by every prompt being a cliff (the per-step cap of cliff prompts, M
    rollouts each): sampled like the rollouts, then a teacher forward (a third of a forward and backward)
    and the JSD's forward and backward."""
    world = max(1, cfg.resources["train"].gpu if "train" in cfg.resources else 1)
    B, K = cfg.grpo.num_prompts_per_step, cfg.grpo.num_generations_per_prompt
    seqs = B * K / world
    new = cfg.generation.max_new_tokens or cfg.model.max_total_sequence_length // 2
    gen_tps = gen["tokens_per_s"]
    upd_tps = upd["sequences"] * upd["response_tokens"] / upd["seconds"] if upd.get("ok") else math.nan
    gen_s, upd_s = seqs * new / gen_tps, seqs * new / upd_tps
    step = gen_s + upd_s
    out = {"gpus": world, "seconds_per_step": step, "generation_s": gen_s, "update_s": upd_s,
           "hours": step * cfg.grpo.max_num_steps / 3600, "steps": cfg.grpo.max_num_steps,
           "response_tokens_assumed": new}
    if any(m.distill_weight > 0 for m in cfg.experiment.methods.values()):
        priv = min(cfg.hdpo.max_cliff_prompts_per_step, B) * cfg.privileged_rollouts / world
        extra = priv * new / gen_tps + priv * new / upd_tps * (1 + 1 / 3)
        out.update({"privileged_sequences_max": priv, "hdpo_seconds_per_step_max": step + extra,
                    "hdpo_hours_max": (step + extra) * cfg.grpo.max_num_steps / 3600})
    return out


def table(v: dict) -> str:
    u, e = v["update"], v["estimate"]
    rows = [("device", f"{v['device']} ({v['dtype']}{', tiny shape' if v['tiny'] else ''})"),
            ("model", f"{v['model']['shape']}: {v['model']['parameters'] / 1e6:,.1f}M params, vocab {v['model']['vocab']}")]
    if "resume" in v:
        r = v["resume"]
        rows.append(("kill + resume", f"{'same trajectory' if r['ok'] else 'FAILED'} (SIGKILL after step "
                                      f"{r['killed_after_step']} of {r['steps']}, max weight diff {r['max_weight_diff']:.1e})"))
    mb = f"{u['sequences']} x ({u['prompt_tokens']} + {u['response_tokens']}) tokens"
    if u.get("peak_gib") is not None:
        lim = f" of {u['limit_gib']:.1f} GiB" + (f" (engine share {u['engine_share']:.2f} reserved)"
                                                 if u["engine_share"] else "") if u["limit_gib"] else ""
        rows.append(("update micro-batch peak", f"{u['peak_gib']:.1f} GiB{lim}, {mb}"))
    else:
        rows.append(("update micro-batch", mb))
    rows.append(("update micro-batch time", f"{u['seconds']:.2f} s" if u["ok"] else u.get("error", "failed")))
    if "checkpoint" in v:
        rows.append(("checkpoint write", f"{v['checkpoint']['seconds']:.1f} s for {v['checkpoint']['gib']:.2f} GiB"))
    for name, g in v["generation"].items():
        rows.append((f"generation ({name})", f"{g['tokens_per_s']:,.0f} tokens/s (batch {g['batch']}, "
                                             f"{g['prompt_tokens']}-token prompts, {g['new_tokens']} new)"))
    rows.append(("estimated run", f"{e['hours']:.1f} h for {e['steps']} steps on {e['gpus']} GPU(s) "
                                  f"({e['seconds_per_step']:.1f} s/step, responses of {e['response_tokens_assumed']} tokens)"))
    if "hdpo_hours_max" in e:
        rows.append(("estimated HDPO run", f"up to {e['hdpo_hours_max']:.1f} h ({e['hdpo_seconds_per_step_max']:.1f} "
                                           "s/step if every prompt were a cliff)"))
    rows.append(("verdict", "FITS" if v["fits"] else "DOES NOT FIT"))
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {val}" for k, val in rows)


if __name__ == "__main__":  # the killed half of check_resume
    if len(sys.argv) == 3 and sys.argv[1] == "--killed-run":
        root = Path(sys.argv[2])
        tcfg = from_dict(json.loads((root / "tiny.json").read_text()))
        _tiny_trainer(tcfg, root / "data", root, "cut").fit(resume=False)
        sys.exit(0)  # reached only when the kill did not happen
