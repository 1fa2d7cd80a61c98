"""The cliff ledger: one row per (training step, prompt), written by the trainer beside metrics.jsonl.

A row says what happened to one prompt of one step:
  step                 the training step (1-based, as in metrics.jsonl)
  index, id            the prompt's position in train.jsonl and its problem id
  rewards              the K plain-prompt rewards
  cliff                every reward <= hdpo.cliff_reward_sum (the GRPO gradient of this prompt is zero)
  selected             a cliff within the per-step cap (privileged rollouts were generated for it)
  privileged_generated / privileged_kept   privileged rollouts sampled, and kept (verified correct)
  distilled            privileged_kept > 0: the prompt contributed to the JSD loss
  reinjected_from      the step at which this prompt was a distilled cliff, when expand-then-sharpen put it
                       back into this step's batch; else null
  teacher_tail_mass    over the kept rollouts' tokens, the teacher's probability mass outside its top-k
                       (what the top-k cut drops before renormalising): mean, p50, p90, max; null if none kept

Expand-then-sharpen (the paper's future work) is a pure function of the ledger: `due_reinjections` says which
former cliffs return at a step, so a resumed run (whose ledger is cut back to the checkpoint) draws the same
batches. Pure functions here; the trainer does the I/O.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import torch


def tail_summary(values: Iterable[float]) -> Optional[dict]:
    """mean, p50, p90, max of per-token tail masses (None when there are none)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    if t.numel() == 0:
        return None
    q = torch.quantile(t, torch.tensor([0.5, 0.9], dtype=torch.float64))
    return {"mean": float(t.mean()), "p50": float(q[0]), "p90": float(q[1]), "max": float(t.max()),
            "tokens": int(t.numel())}


def step_rows(step: int, indices: list[int], ids: list[str], rewards: list[list[float]], cliff_reward_sum: float,
              selected: list[int], generated: dict[int, int], kept: dict[int, int],
              reinjected_from: list[Optional[int]], tails: dict[int, Optional[dict]]) -> list[dict]:
    """The ledger rows of one rank's prompts at one step. `selected`, `generated`, `kept`, `tails` are keyed by
    the prompt's position in this rank's batch."""
    rows = []
    chosen = set(selected)
    for j, (idx, pid, r) in enumerate(zip(indices, ids, rewards)):
        rows.append({"step": step, "index": int(idx), "id": pid, "rewards": [float(x) for x in r],
                     "cliff": sum(r) <= cliff_reward_sum, "selected": j in chosen,
                     "privileged_generated": int(generated.get(j, 0)), "privileged_kept": int(kept.get(j, 0)),
                     "distilled": kept.get(j, 0) > 0, "reinjected_from": reinjected_from[j],
                     "teacher_tail_mass": tails.get(j)})
    return rows


def due_reinjections(rows: Iterable[dict], step: int, delay: int, cap: int) -> list[tuple[int, int]]:
    """(train index, origin step) of the former cliffs that return to the batch of `step` (1-based).

    A prompt distilled as a cliff at step s (and not itself a reinjection) returns once, at the first step
    >= s + delay with room: at most `cap` per step, oldest first (then by train index). Rows at or after
    `step` are ignored, so the answer depends only on the past."""
    events, done = [], set()
    for r in rows:
        if r["step"] >= step:
            continue
        if r.get("reinjected_from") is not None:
            done.add((r["index"], r["reinjected_from"]))
        elif r.get("distilled"):
            events.append((r["step"], r["index"]))
    due = sorted((s, i) for s, i in events if s + delay <= step and (i, s) not in done)
    return [(i, s) for s, i in due[:cap]]


def former_cliffs(rows: Iterable[dict], limit: int) -> list[tuple[int, int]]:
    """(train index, step of its first cliff) of the run's earliest `limit` distinct cliff prompts: the cliff
    probe's problem set (it grows until `limit`, then stays fixed)."""
    first: dict[int, int] = {}
    for r in rows:
        if r["cliff"] and (r["index"] not in first or r["step"] < first[r["index"]]):
            first[r["index"]] = r["step"]
    return sorted(first.items(), key=lambda kv: (kv[1], kv[0]))[:limit]


def place_reinjections(regular: list[int], due: list[tuple[int, int]]) -> tuple[list[int], list[Optional[int]]]:
    """The step's batch: the regular draw with its last len(due) slots given to the returning prompts (so the
    batch size and the per-rank split stay the same). -> (indices, origin step per slot or None)."""
    n = min(len(due), len(regular))
    keep = len(regular) - n
    indices = regular[:keep] + [i for i, _ in due[:n]]
    origins: list[Optional[int]] = [None] * keep + [s for _, s in due[:n]]
    return indices, origins


def recovery(rows: list[dict]) -> dict:
    """Former cliffs met again later in training with the plain prompt (a later epoch or a reinjection):
    how many, and how many of those had at least one correct rollout then. GRPO's ledger gives the control."""
    first_cliff: dict[int, int] = {}
    met, solved = set(), set()
    for r in sorted(rows, key=lambda r: r["step"]):
        i = r["index"]
        if i in first_cliff and r["step"] > first_cliff[i]:
            met.add(i)
            if sum(r["rewards"]) > 0:
                solved.add(i)
        if r["cliff"] and i not in first_cliff:
            first_cliff[i] = r["step"]
    return {"former_cliffs": len(first_cliff), "met_again": len(met), "solved_again": len(solved)}


def summary(rows: list[dict]) -> dict:
    """Totals of one run's ledger, for the README's note and the report."""
    cliffs = [r for r in rows if r["cliff"]]
    gen = sum(r["privileged_generated"] for r in rows)
    kept = sum(r["privileged_kept"] for r in rows)
    tails = [r["teacher_tail_mass"]["mean"] for r in rows if r.get("teacher_tail_mass")]
    return {"prompts": len(rows), "cliffs": len(cliffs), "selected": sum(r["selected"] for r in rows),
            "distilled": sum(r["distilled"] for r in rows),
            "reinjected": sum(r.get("reinjected_from") is not None for r in rows),
            "privileged_generated": gen, "privileged_kept": kept,
            "teacher_pass_rate": kept / gen if gen else math.nan,
            "tail_mass_mean": sum(tails) / len(tails) if tails else math.nan, **recovery(rows)}
