"""Timing and memory ratios, printed (never asserted in tests).

  python scripts/benchmark.py                       # top-k JSD vs full-vocabulary JSD on random logits
  python scripts/benchmark.py --memory              # peak memory of the log-prob + JSD path and of one update
                                                    # micro-batch at vocab 151936: chunked vs today's (baseline)
  python scripts/benchmark.py --runs results/runs   # HDPO vs GRPO seconds per step, per phase, from metrics.jsonl
  python scripts/benchmark.py --attention           # ms per decoding step on new shapes: cuDNN attention off
                                                    # (hdpo.decode) vs PyTorch's default backends (GPU)
  python scripts/benchmark.py --checkpoint          # extra peak memory of writing a checkpoint (weights + AdamW
                                                    # states, 1 GiB): streamed vs a copied state (baseline)
  python scripts/benchmark.py --backends            # generated tokens/s of the vLLM backend vs the transformers
                                                    # backend (baseline) on the demo model and the demo's shapes:
                                                    # a training step's rollouts and a validation pass

Memory: each case runs once in a fresh subprocess (CPU: growth of the peak RSS; CUDA: peak allocated), the
baseline being a copy of the full-logits code this package used before the chunked path (kept below), so the
ratios compare the two in the same run on the same machine.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from hdpo.losses import grpo_token_loss_sum, token_logprobs, topk_jsd
from hdpo.logprobs import response_logits


def full_jsd(t_logits: torch.Tensor, s_logits: torch.Tensor) -> torch.Tensor:
    """Reference: JSD over the full vocabulary (the teacher not truncated)."""
    p, q = torch.softmax(t_logits.float(), -1), torch.softmax(s_logits.float(), -1)
    m = (p + q) / 2
    return 0.5 * (p * (p.clamp_min(1e-30).log() - m.log())).sum(-1) + 0.5 * (q * (q.log() - m.log())).sum(-1)


def timeit(fn, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def jsd_ratio(tokens: int, vocab: int, k: int) -> None:
    torch.manual_seed(0)
    t_logits = torch.randn(tokens, vocab)
    s_logits = torch.randn(tokens, vocab, requires_grad=True)
    vals, ids = t_logits.topk(k, -1)

    def topk():
        topk_jsd(vals, token_logprobs(s_logits, ids)).sum().backward()

    def full():
        full_jsd(t_logits, s_logits).sum().backward()

    a, b = timeit(topk), timeit(full)
    print(f"JSD fwd+bwd, {tokens} tokens x vocab {vocab}: top-{k} {a * 1e3:.1f} ms, full {b * 1e3:.1f} ms, "
          f"full/top-k = {b / a:.2f}x")


def step_ratios(runs: Path) -> None:
    """Per run folder: mean seconds per step and phase, seconds per 1k generated tokens (the rollout phase; the
    privileged phase where it runs apart; in one decode loop with the rollouts it is inside `rollout`), and
    against GRPO: the step-time ratio beside the generated-token ratio (issue 7: the first no larger)."""
    per_method: dict[str, dict[str, float]] = {}
    for metrics in sorted(runs.glob("*/metrics.jsonl")):
        rows = [json.loads(l) for l in metrics.read_text().splitlines() if l.strip()]
        train = [r for r in rows if r.get("kind") == "train"]
        if not train:
            continue
        if len(train) > 1:  # the first step pays the process's warm-up (kernels, allocator): left out
            train = train[1:]
        keys = [k for k in train[0] if k.startswith("time/")]
        mean = {k: statistics.mean(r[k] for r in train) for k in keys}
        tokens = statistics.mean(r["tokens/generated"] for r in train)
        dropped = statistics.mean(r.get("tokens/dropped", 0) for r in train)  # speculative rows dropped
        gen_s = mean.get("time/rollout", 0.0) + mean.get("time/privileged", 0.0)
        per_method[metrics.parent.name] = {**mean, "tokens": tokens, "needed": tokens - dropped}
        together = mean.get("time/privileged", 0.0) == 0.0  # privileged rollouts inside the rollout loop
        apart = {p: (mean.get(f"time/{p}", 0.0), statistics.mean(r.get(f"tokens/{t}", 0) for r in train))
                 for p, t in (("rollout", "generated" if together else "grpo"), ("privileged", "privileged"))}
        line = ", ".join(f"{p} {1000 * s_ / n:.3f}" for p, (s_, n) in apart.items() if n and s_ > 0)
        print(f"{metrics.parent.name}: {len(train)} steps, {tokens:,.0f} generated tokens/step"
              f"{f' ({dropped:,.0f} of them dropped)' if dropped else ''} in {gen_s:.1f}s: "
              f"{1000 * gen_s / max(tokens, 1):.3f} s per 1k generated tokens ({line})")
    base = next((v for k, v in per_method.items() if k.startswith("grpo")), None)
    for name, m in per_method.items():
        line = ", ".join(f"{k[5:]} {v:.1f}s" for k, v in m.items() if k.startswith("time/"))
        print(f"{name}: {line}")
        if base and m is not base:
            # the goal's tokens: the ones the step uses (speculative rows dropped are extra cost, not extra need)
            step, tok = m["time/step"] / base["time/step"], m["needed"] / base["needed"]
            spent = f", {m['tokens'] / base['tokens']:.2f}x with the dropped ones" if m["needed"] < m["tokens"] else ""
            print(f"{name} vs GRPO: step time {step:.2f}x, generated tokens {tok:.2f}x{spent} "
                  f"({'no larger' if step <= tok else 'LARGER'}: HDPO {'costs' if step <= tok else 'exceeds'} "
                  f"what its extra tokens cost)")


def generation_phases(hidden: int = 256, layers: int = 4, vocab: int = 8192, new: int = 64) -> dict:
    """Seconds per 1k generated tokens of a plain and a privileged phase, random weights (item 7's profile):
    plain = 32 sequences of 64-token prompts; privileged = fewer sequences (a few cliffs x M) with prompts 4x
    longer (the solution in context), in one batch each, as the transformers backend runs them."""
    from hdpo.generation import Sampling, TransformersGenerator
    from hdpo.preflight import IdTokenizer

    model = _small_model(vocab, hidden, layers, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    g = torch.Generator().manual_seed(0)
    gen = TransformersGenerator(model, IdTokenizer(vocab), 64, 64 * 4 + new)
    out = {}
    for name, seqs, plen in (("plain", 32, 64), ("privileged", 32, 256), ("privileged_few", 8, 256)):
        prompts = [torch.randint(0, vocab - 1, (plen,), generator=g).tolist() for _ in range(seqs)]
        t = time.perf_counter()
        rollouts = gen.generate_ids(prompts, Sampling(max_new_tokens=new))
        sec = time.perf_counter() - t
        tokens = sum(len(r.response_ids) for r in rollouts)
        out[name] = 1000 * sec / tokens
        print(f"generation {name:15s} {seqs:3d} x {plen}-token prompts: {out[name]:.3f} s per 1k tokens")
    return out


def attention_case(impl: str, rows: int, new: int) -> dict:
    """ms per decoding step of hdpo.decode on a random SmolLM2-135M-shaped model, prompts of 40-120 tokens and
    limits of new/4 to new tokens (rows leave and queued ones join: shapes change as in training), after a
    warm-up on prompts one token shorter, so every measured attention shape is new to the process.
    impl "cudnn_off": hdpo.decode as it is; "cudnn_allowed": the same loop with PyTorch's default backends."""
    from transformers import LlamaConfig

    from hdpo.decode import Request, decode
    from hdpo.preflight import random_model

    gpu = torch.cuda.is_available()
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                      tie_word_embeddings=True)
    model = random_model(cfg, torch.device("cuda" if gpu else "cpu"), False)
    model = model.to(torch.bfloat16 if gpu else torch.float32).eval()
    loop = decode
    if impl == "cudnn_allowed":  # the undecorated loop under no_grad: attention backends left as PyTorch sets them
        inner = decode.__wrapped__.__wrapped__
        assert inner.__name__ == "decode"
        loop = torch.no_grad()(inner)
    g = torch.Generator().manual_seed(0)
    reqs = [Request(torch.randint(2, 49152, (40 + (i * 37) % 81,), generator=g).tolist(),
                    new // 4 + (i * 53) % (new - new // 4 + 1), i) for i in range(2 * rows)]
    steps = [0]
    model.register_forward_pre_hook(lambda *_: steps.__setitem__(0, steps[0] + 1))
    run = lambda rs: loop(model, rs, 1.0, 1.0, False, rows, [0], 1)  # noqa: E731  (token 0 as EOS: rarely drawn)
    run([Request(r.prompt_ids[1:], r.limit, r.seed) for r in reqs])
    if gpu:
        torch.cuda.synchronize()
    steps[0], t = 0, time.perf_counter()
    out = run(reqs)
    if gpu:
        torch.cuda.synchronize()
    sec = time.perf_counter() - t
    return {"impl": impl, "device": "cuda" if gpu else "cpu", "ms_per_step": 1000 * sec / steps[0],
            "steps": steps[0], "tokens": sum(len(d.response_ids) for d in out), "seconds": sec}


def attention_ratio(rows: int, new: int) -> dict:
    """Decoding with cuDNN attention off (hdpo.decode) vs PyTorch's default backends, each in a fresh process
    (cuDNN caches its compiled graphs per process)."""
    res = {impl: _run_case("attention", impl, rows=rows, new=new) for impl in ("cudnn_allowed", "cudnn_off")}
    a, b = res["cudnn_allowed"]["ms_per_step"], res["cudnn_off"]["ms_per_step"]
    print(f"decode, {rows} rows, {res['cudnn_off']['steps']} steps, new shapes ({res['cudnn_off']['device']}): "
          f"default backends {a:.1f} ms/step, cuDNN attention off {b:.1f} ms/step -> {b / a:.2f}x")
    if res["cudnn_off"]["device"] == "cpu":
        print("  (CPU has no cuDNN attention: both runs use the same kernels; run on a GPU for the comparison)")
    return res


# --- baseline: the full-logits path the trainer used before chunking. hdpo.logprobs.response_logits and
# hdpo.losses.token_logprobs stay in the package as the reference the chunked path is tested equal to.

def baseline_grpo_microbatch(model, chunk, n_grpo, amp):
    with amp():
        logits, mask, ids = response_logits(model, [c[0] for c in chunk], [c[1] for c in chunk], 0)
    lp = token_logprobs(logits, ids.unsqueeze(-1)).squeeze(-1)
    adv = torch.tensor([c[2] for c in chunk], device=lp.device)
    (grpo_token_loss_sum(lp, lp.detach(), adv, mask, 0.2, 0.2) / n_grpo).backward()


def baseline_distill_microbatch(model, chunk, n_distill, amp):
    with amp():
        logits, mask, _ = response_logits(model, [c.prompt_ids for c in chunk], [c.response_ids for c in chunk], 0)
    T, k = logits.shape[1], chunk[0].topk_ids.shape[-1]
    t_vals = torch.zeros(len(chunk), T, k, device=logits.device)
    t_ids = torch.zeros(len(chunk), T, k, dtype=torch.long, device=logits.device)
    for j, c in enumerate(chunk):
        t_vals[j, :len(c.response_ids)], t_ids[j, :len(c.response_ids)] = c.topk_logits, c.topk_ids
    student = token_logprobs(logits, t_ids)
    (0.1 * (topk_jsd(t_vals, student) * mask).sum() / n_distill).backward()


# --- memory cases, one per subprocess ------------------------------------------------------------------

def _peak_bytes(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _reset_peak(device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return _peak_bytes(device)


def _small_model(vocab, hidden, layers, device):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True)
    return Qwen2ForCausalLM(cfg).to(device)


def memory_case(case: str, impl: str, vocab: int, seqs: int, prompt_len: int, resp_len: int, k: int) -> dict:
    """Extra peak memory of one case (bytes above what was allocated when it started)."""
    from hdpo.logprobs import chunked_token_logprobs, chunked_topk_jsd
    from hdpo.update import DistillItem, GrpoItem, MicroBatching, Objective, accumulate_gradients

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    amp = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
    g = torch.Generator().manual_seed(0)
    N = seqs * resp_len
    if case == "path":  # hidden states -> log-probs + JSD -> backward, the model left out
        H = 1536 if device.type == "cuda" else 64
        hidden = torch.randn(N, H, generator=g).to(device).requires_grad_()
        weight = (torch.randn(vocab, H, generator=g) * 0.02).to(device).requires_grad_()
        ids = torch.randint(0, vocab, (N, 1), generator=g).to(device)
        t_vals, t_ids = torch.randn(N, k, generator=g).to(device), torch.randint(0, vocab, (N, k), generator=g).to(device)
        base = _reset_peak(device)
        with amp():
            if impl == "baseline":
                logits = hidden @ weight.T
                lp = token_logprobs(logits, ids)
                jsd = topk_jsd(t_vals, token_logprobs(logits, t_ids))
            else:
                lp = chunked_token_logprobs(hidden, weight, None, ids)
                jsd = chunked_topk_jsd(hidden, weight, None, t_ids, t_vals)
        (lp.sum() + jsd.sum()).backward()
        return {"extra_bytes": _peak_bytes(device) - base}
    model = _small_model(vocab, 64, 2, device)
    prompts = [torch.randint(0, vocab, (prompt_len,), generator=g).tolist() for _ in range(seqs)]
    responses = [torch.randint(0, vocab, (resp_len,), generator=g).tolist() for _ in range(seqs)]
    grpo = [GrpoItem(p, r, 1.0 if i % 2 else -1.0) for i, (p, r) in enumerate(zip(prompts, responses))]
    distill = [DistillItem(p, r, torch.randn(len(r), k, generator=g), torch.randint(0, vocab, (len(r), k), generator=g))
               for p, r in zip(prompts, responses)]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    base = _reset_peak(device)
    t = time.perf_counter()
    if impl == "baseline":
        if case == "grpo":
            baseline_grpo_microbatch(model, grpo, N, amp)
        else:
            baseline_distill_microbatch(model, distill, N, amp)
    else:
        accumulate_gradients(model, grpo if case == "grpo" else [], distill if case == "distill" else [], (N, N),
                             Objective(0.1), MicroBatching(seqs), amp)
    return {"extra_bytes": _peak_bytes(device) - base, "seconds": time.perf_counter() - t}


def checkpoint_case(impl: str, gib: float, folder: str) -> dict:
    """Extra peak host memory of writing `gib` GiB of weights and AdamW-like states (on the GPU when there is
    one): hdpo.checkpoint.save streams them from the live tensors; the baseline first copies the state to the
    host (.cpu().clone() per tensor, as a trainer that snapshots its state would)."""
    from hdpo import checkpoint as ckpt

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731  (host peak, Linux KiB)
    n = int(gib * 2 ** 30 / 4 / 3)  # weights, exp_avg, exp_avg_sq
    blob = {"model": {"w": torch.randn(n, device=device)},
            "optimizer": {"state": {0: {"exp_avg": torch.randn(n, device=device),
                                        "exp_avg_sq": torch.rand(n, device=device)}}}}
    base = rss()  # host memory on either device: a copied state lands there, a streamed one passes through
    t = time.perf_counter()
    if impl == "baseline":
        def copy(x):
            return x.detach().cpu().clone() if isinstance(x, torch.Tensor) else (
                {k: copy(v) for k, v in x.items()} if isinstance(x, dict) else x)
        blob = copy(blob)
    written = ckpt.save(blob, Path(folder) / f"{impl}.pt")
    seconds = time.perf_counter() - t
    (Path(folder) / f"{impl}.pt").unlink()
    return {"extra_bytes": rss() - base, "written": written, "seconds": seconds, "device": device.type}


def checkpoint_ratio(gib: float = 1.0) -> dict:
    import tempfile

    with tempfile.TemporaryDirectory(dir=".") as folder:
        old = _run_case("checkpoint", "baseline", gib=gib, folder=folder)
        new = _run_case("checkpoint", "streamed", gib=gib, folder=folder)
    ratio = new["extra_bytes"] / max(old["extra_bytes"], 1)
    print(f"checkpoint of {gib:.2f} GiB: copied state {old['extra_bytes'] / 2 ** 30:.2f} GiB extra "
          f"({old['seconds']:.1f} s), streamed {new['extra_bytes'] / 2 ** 30:.3f} GiB extra ({new['seconds']:.1f} s)"
          f" -> {ratio:.3f}x")
    return {"gib": gib, "baseline": old, "streamed": new, "ratio": ratio}


BACKEND_WORKLOADS = {  # (prompts, samples per prompt, greedy too): the demo's shapes (config/demo.yaml)
    "train_step_rollouts": (4, 4, False),  # 2 prompts x K=4 rollouts + 2 cliffs x 4 privileged rollouts
    "validation": (8, 4, True),  # max_val_problems 8 x num_samples 4, and a greedy answer each
}


def _word_problems(n: int, offset: int) -> list[str]:
    return [f"Dana has {7 + 3 * i + offset} marbles. She gives {2 + i} to her brother and then buys {5 + 2 * i} "
            f"more. How many marbles does Dana have now?" for i in range(n)]


def backend_case(impl: str, threads: int, new: int, repeat: int) -> dict:
    """One backend in this (fresh) process on the demo model: start-up, then each workload `repeat` times with
    other problems each time; tokens/s = generated tokens / seconds (the median repeat)."""
    import tempfile

    from hdpo.config import SYSTEM_PROMPT, load_config
    from hdpo.data import Problem, build_messages, render_prompt
    from hdpo.generation import Sampling
    from hdpo.generators import make_generator
    from hdpo.models import load_model, load_tokenizer, resolve_model

    torch.set_num_threads(threads)
    cfg = load_config(Path(__file__).resolve().parents[1] / "config" / "demo.yaml")
    cache = Path(tempfile.gettempdir()) / "hdpo-benchmark-models"
    name = resolve_model(cfg.model, cache)
    tok = load_tokenizer(name)
    model = load_model(name, "float32")
    t0 = time.perf_counter()
    gen = make_generator(impl, model, tok, cfg.generation.batch_size, cfg.model.max_total_sequence_length,
                         dtype="float32", cpu_kv_cache_gib=cfg.generation.vllm_cpu_kv_cache_gib)
    if impl == "vllm":  # the first sync and probe happen on first use: part of start-up
        gen.generate(["warm-up"], 1, Sampling(max_new_tokens=1), seeds=[0])
    report = {"backend": impl, "threads": threads, "startup_s": time.perf_counter() - t0}
    for work, (n_prompts, n, greedy) in BACKEND_WORKLOADS.items():
        runs = []
        for r in range(repeat):
            problems = [Problem(f"b{i}", q, None, "0", "bench") for i, q in enumerate(_word_problems(n_prompts, r))]
            prompts = [render_prompt(tok, build_messages(p, SYSTEM_PROMPT)) for p in problems]
            t = time.perf_counter()
            groups = gen.generate(prompts, n, Sampling(1.0, 1.0, new), seeds=list(range(100 * r, 100 * r + n_prompts)))
            tokens = sum(len(x.response_ids) for g in groups for x in g)
            if greedy:
                tokens += sum(len(x.response_ids) for g in gen.generate(prompts, 1, Sampling(max_new_tokens=new,
                                                                                                greedy=True))
                              for x in g)
            runs.append({"seconds": time.perf_counter() - t, "tokens": tokens})
        mid = sorted(runs, key=lambda x: x["seconds"])[len(runs) // 2]
        report[work] = {**mid, "tokens_per_s": mid["tokens"] / mid["seconds"],
                        "tokens_per_s_all": [x["tokens"] / x["seconds"] for x in runs]}
    return report


def backend_ratios(threads: int = 1, new: int = 96, repeat: int = 3) -> dict:
    """The vLLM backend against the transformers backend (the baseline), each in a fresh process, same run."""
    base = _run_case("backend", "transformers", threads=threads, new=new, repeat=repeat)
    vllm = _run_case("backend", "vllm", threads=threads, new=new, repeat=repeat)
    print(f"demo model, float32, {threads} thread(s), up to {new} new tokens, median of {repeat}")
    print(f"{'':22s} {'transformers':>14s} {'vLLM':>14s} {'ratio':>7s}")
    print(f"{'start-up (s)':22s} {base['startup_s']:14.1f} {vllm['startup_s']:14.1f}")
    report = {"threads": threads, "new_tokens": new, "transformers": base, "vllm": vllm}
    for work in BACKEND_WORKLOADS:
        b, v = base[work]["tokens_per_s"], vllm[work]["tokens_per_s"]
        report[f"{work}_ratio"] = v / b
        print(f"{work + ' (tok/s)':22s} {b:14.1f} {v:14.1f} {v / b:6.2f}x")
    return report


def _run_case(case: str, impl: str, **kw) -> dict:
    cmd = [sys.executable, __file__, "--case", json.dumps({"case": case, "impl": impl, **kw})]
    out = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if out.returncode:
        raise RuntimeError(f"{case}/{impl} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory_ratios(vocab: int = 151936, seqs: int = 4, prompt_len: int = 64, resp_len: int = 1024, k: int = 64,
                  path_positions: int = 4096) -> dict:
    """Today's vs chunked extra peak memory at the real vocabulary; returns and prints the ratios."""
    gib = 2 ** 30
    report = {"vocab": vocab, "device": "cuda" if torch.cuda.is_available() else "cpu"}
    cases = [("path", dict(seqs=1, resp_len=path_positions)), ("grpo", {}), ("distill", {})]
    for case, over in cases:
        kw = dict(vocab=vocab, seqs=seqs, prompt_len=prompt_len, resp_len=resp_len, k=k) | over
        old, new = _run_case(case, "baseline", **kw), _run_case(case, "chunked", **kw)
        ratio = new["extra_bytes"] / max(old["extra_bytes"], 1)
        report[case] = {"baseline_gib": old["extra_bytes"] / gib, "chunked_gib": new["extra_bytes"] / gib,
                        "ratio": ratio, "tokens": kw["seqs"] * kw["resp_len"]}
        what = {"path": "log-probs + JSD + backward", "grpo": "GRPO micro-batch", "distill": "distill micro-batch"}
        print(f"{what[case]:28s} {kw['seqs']} x {kw['resp_len']} tokens, vocab {vocab}: today "
              f"{old['extra_bytes'] / gib:6.2f} GiB, chunked {new['extra_bytes'] / gib:6.3f} GiB "
              f"-> {ratio:.3f}x (1/{1 / max(ratio, 1e-9):.0f})")
    return report


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--case":  # a subprocess of memory_ratios
        spec = json.loads(sys.argv[2])
        case, impl = spec.pop("case"), spec.pop("impl")
        fn = {"attention": attention_case, "checkpoint": checkpoint_case, "backend": backend_case}.get(case)
        print(json.dumps(fn(impl, **spec) if fn else memory_case(case, impl, **spec)))
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=Path, default=None)
    ap.add_argument("--memory", action="store_true", help="peak-memory ratios, chunked vs today's path")
    ap.add_argument("--phases", action="store_true", help="s per 1k generated tokens, plain vs privileged phase")
    ap.add_argument("--attention", action="store_true",
                    help="ms per decoding step on new shapes, cuDNN attention off (ours) vs PyTorch's default")
    ap.add_argument("--rows", type=int, default=None, help="--attention: batch rows (default: GPU 128, CPU 4)")
    ap.add_argument("--new", type=int, default=None, help="--attention: most new tokens (default: GPU 256, CPU 16)")
    ap.add_argument("--checkpoint", action="store_true",
                    help="extra peak memory of a checkpoint write, streamed vs a copied state")
    ap.add_argument("--backends", action="store_true",
                    help="generated tokens/s, vLLM backend vs transformers backend, on the demo model and shapes")
    ap.add_argument("--threads", type=int, default=1, help="--backends: torch threads per backend (a demo job's)")
    ap.add_argument("--json", type=Path, default=None, help="also write the memory, attention, checkpoint or "
                                                            "backends report here")
    args = ap.parse_args()
    if args.runs:
        step_ratios(args.runs)
    elif args.phases:
        generation_phases()
    elif args.attention:
        gpu = torch.cuda.is_available()
        rep = attention_ratio(args.rows or (128 if gpu else 4), args.new or (256 if gpu else 16))
        if args.json:
            args.json.write_text(json.dumps(rep, indent=2))
    elif args.backends:
        rep = backend_ratios(args.threads, args.new or 96)
        if args.json:
            args.json.write_text(json.dumps(rep, indent=2))
    elif args.checkpoint:
        rep = checkpoint_ratio()
        if args.json:
            args.json.write_text(json.dumps(rep, indent=2))
    elif args.memory:
        rep = memory_ratios()
        if args.json:
            args.json.write_text(json.dumps(rep, indent=2))
    else:
        for vocab in (49152, 151936):
            jsd_ratio(tokens=256, vocab=vocab, k=64)
