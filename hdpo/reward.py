"""Binary math-verify reward with a time limit that holds in any thread or process.

math-verify limits its own parse/verify time with signal.alarm, which only works in a process's main thread and
cannot interrupt C code (a regex or big-integer step). So `RewardScorer` scores in a pool of spawned worker
processes, where each task runs in the worker's main thread and math-verify's alarms work, and the parent adds
a hard guard: an item that outlives it scores 0 as a timeout and the pool is killed and rebuilt.

A verdict should not depend on machine load: an item that times out is scored once more with the longer limit
`retry_timeout_s` (config `eval.reward_retry_timeout_s`) before it counts as 0. Both limits are hard, so a
hang still cannot stall training; `RewardStats.timeouts` counts the items that timed out twice (scored 0),
`timeouts_retried` those that timed out at the first limit.
"""
from __future__ import annotations

import concurrent.futures as cf
import logging
import math
import multiprocessing
import os
import threading
import time
import unicodedata
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from typing import Callable, Optional

logger = logging.getLogger(__name__)

STATUSES = ("correct", "wrong", "no_answer", "gold_unparseable", "timeout", "error")
_warned_no_alarm = False


@dataclass
class RewardStats:
    scored: int = 0
    correct: int = 0
    parse_failures: int = 0  # nothing extracted from the response
    gold_unparseable: int = 0
    timeouts: int = 0  # timed out at both limits: scored 0
    timeouts_retried: int = 0  # timed out at the first limit and were scored again with the longer one
    errors: int = 0

    def as_dict(self) -> dict:
        return asdict(self)


def _excerpt(text: str, n: int = 120) -> str:
    text = str(text)
    return repr(text if len(text) <= n else "..." + text[-n:])  # the answer sits at the end


def usable_gold(gold: str) -> bool:
    """A gold answer holds a digit, a letter, a math symbol (the minus sign, infinity, the empty set) or a LaTeX
    command; one of only punctuation and blanks ('???', '-', '[ ]') is a data error that scores 0 (counted)."""
    return any(c.isalnum() or c == "\\" or unicodedata.category(c) in ("Sm", "So") for c in gold)


def score_one(response: str, gold: str | list[str], timeout_s: Optional[float] = 5.0) -> tuple[float, str]:
    """(reward, status): 1.0 iff math-verify finds the response's answer equal to the gold. Never raises.

    timeout_s None or <= 0 disables math-verify's alarms; so does calling from a non-main thread (with a warning).
    """
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    from math_verify.errors import TimeoutException

    global _warned_no_alarm
    seconds = None
    if timeout_s is not None and timeout_s > 0:
        if threading.current_thread() is threading.main_thread():
            seconds = max(1, math.ceil(timeout_s))  # signal.alarm takes whole seconds; a float fails silently
        elif not _warned_no_alarm:
            _warned_no_alarm = True
            logger.warning("math-verify scored outside the main thread: its alarm time limits are off "
                           "(use RewardScorer with workers >= 1 for a time limit)")
    try:
        gold_parsed = []  # a list of accepted answers: any one of them scores 1
        for g in (gold if isinstance(gold, (list, tuple)) else [gold]):
            g = str(g)
            if not usable_gold(g):  # '???' parses as the string itself: a response repeating it would score 1
                continue
            gold_parsed += parse(g if "\\boxed" in g else f"\\boxed{{{g}}}",
                                 parsing_timeout=seconds, raise_on_error=True)
        if not gold_parsed:
            return 0.0, "gold_unparseable"
        pred_parsed = parse(str(response or ""), [LatexExtractionConfig(), ExprExtractionConfig()],
                            parsing_timeout=seconds, raise_on_error=True)
        if not pred_parsed:
            return 0.0, "no_answer"
        # verify(gold, pred) is any() over pairs; looping here tells a timeout from a plain mismatch.
        timed_out = False
        for g in gold_parsed:
            for p in pred_parsed:
                try:
                    if verify(g, p, timeout_seconds=seconds, raise_on_error=True):
                        return 1.0, "correct"
                except TimeoutException:
                    timed_out = True
                except Exception:  # math-verify's own rule: a comparison that fails is a mismatch
                    logger.debug("comparison failed", exc_info=True)
        return 0.0, ("timeout" if timed_out else "wrong")
    except TimeoutException:
        return 0.0, "timeout"
    except Exception:
        logger.debug("scoring failed", exc_info=True)
        return 0.0, "error"


def _succeeded(f: cf.Future) -> bool:
    return f.done() and not f.cancelled() and f.exception() is None


def _watch_parent(parent_pid: int, period_s: float = 0.5) -> None:
    """Worker initializer: exit as soon as the parent is gone. A SIGKILLed trainer runs no cleanup, and its
    workers (and the multiprocessing resource tracker they keep open) would live on with parent PID 1."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(period_s)
        os._exit(1)

    threading.Thread(target=watch, name="hdpo-parent-watch", daemon=True).start()


def _warm_worker() -> None:
    score_one("\\boxed{1}", "1")  # import math-verify and compile its regexes before the first real task


class RewardScorer:
    """Scores batches of (response, gold) with `workers` spawned processes (0: in this process).

    The pool starts lazily (or with start()) and lives across calls; one caller at a time. guard_s is the
    parent's per-item hard limit; its default leaves room for math-verify's own limits (two parses, up to four
    comparisons, whole seconds each).
    """

    def __init__(self, workers: int = 2, timeout_s: float = 5.0, guard_s: Optional[float] = None,
                 _task: Callable[[str, str, float], tuple[float, str]] = score_one,
                 retry_timeout_s: Optional[float] = None, retry_guard_s: Optional[float] = None):
        if workers < 0 or timeout_s <= 0:
            raise ValueError(f"RewardScorer needs workers >= 0 and timeout_s > 0, got {workers}, {timeout_s}")
        if retry_timeout_s is not None and retry_timeout_s < timeout_s:
            raise ValueError(f"RewardScorer: retry_timeout_s={retry_timeout_s} is below timeout_s={timeout_s}")
        self.workers = workers
        self.timeout_s = timeout_s
        self.guard_s = guard_s if guard_s is not None else 6 * math.ceil(timeout_s) + 5
        self.retry_timeout_s = retry_timeout_s  # None: a timeout scores 0 at once
        self.retry_guard_s = retry_guard_s if retry_guard_s is not None else \
            6 * math.ceil(retry_timeout_s or timeout_s) + 5
        self.stats = RewardStats()
        self._task = _task  # tests inject a module-level function that hangs
        self._pool: Optional[cf.ProcessPoolExecutor] = None
        self._warmups: list[cf.Future] = []
        self._warned_golds: set[str] = set()

    # --- pool lifecycle ---
    def start(self) -> None:
        """Start the workers now without waiting (overlaps their startup with other work)."""
        if self.workers and self._pool is None:
            # spawn, not fork: the trainer holds torch threads and maybe CUDA, which fork would copy half-way
            self._pool = cf.ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                                initializer=_watch_parent, initargs=(os.getpid(),))
            self._warmups = [self._pool.submit(_warm_worker) for _ in range(self.workers)]

    def _start_and_wait(self, startup_s: float = 120.0) -> None:
        # Items' guards must not count the workers' startup (interpreter + math-verify import).
        self.start()
        cf.wait(self._warmups, timeout=startup_s)
        if not any(_succeeded(f) for f in self._warmups):
            self._kill_pool()
            raise RuntimeError("reward worker processes fail to start; if the program is a script, "
                               "guard its entry point with `if __name__ == '__main__':`")

    def _kill_pool(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        procs = list((getattr(pool, "_processes", None) or {}).values())  # no public terminate before 3.14
        pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def __enter__(self) -> "RewardScorer":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._kill_pool() if exc_type else self.close()  # after an interrupt a worker may still be busy

    # --- scoring ---
    def score(self, responses: list[str], golds: list[str]) -> list[float]:
        return [r for r, _ in self.score_with_status(responses, golds)]

    def score_with_status(self, responses: list[str], golds: list[str]) -> list[tuple[float, str]]:
        if len(responses) != len(golds):
            raise ValueError(f"{len(responses)} responses but {len(golds)} golds")
        items = list(zip(responses, golds))
        results = self._score_items(items, self.timeout_s, self.guard_s)
        if self.retry_timeout_s is not None:  # a timeout may be the machine's load: once more, with more time
            again = [i for i, (_, status) in enumerate(results) if status == "timeout"]
            if again:
                logger.info("re-scoring %d timed-out item(s) with a %g s limit", len(again), self.retry_timeout_s)
                redo = self._score_items([items[i] for i in again], self.retry_timeout_s, self.retry_guard_s)
                for i, r in zip(again, redo):
                    results[i] = r
                self.stats.timeouts_retried += len(again)
        for (resp, gold), (_, status) in zip(items, results):
            self._record(resp, gold, status)
        return results

    def _score_items(self, items: list[tuple[str, str]], timeout_s: float, guard_s: float) -> list[tuple[float, str]]:
        if self.workers == 0:
            return [self._task(r, g, timeout_s) for r, g in items]
        return self._score_in_pool(items, timeout_s, guard_s)

    def _score_in_pool(self, items: list[tuple[str, str]], timeout_s: Optional[float] = None,
                       guard_s: Optional[float] = None) -> list[tuple[float, str]]:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        guard_s = self.guard_s if guard_s is None else guard_s
        self._start_and_wait()
        submit = lambda i: self._pool.submit(self._task, items[i][0], items[i][1], timeout_s)  # noqa: E731
        futures = [submit(i) for i in range(len(items))]
        results: list[tuple[float, str]] = []
        crashed: set[int] = set()
        i = 0
        # Waiting in submission order: items before i are done, so item i has run for at least guard_s
        # when its wait runs out.
        while i < len(items):
            try:
                results.append(futures[i].result(timeout=guard_s))
            except cf.TimeoutError:
                results.append((0.0, "timeout"))
                self._restart(futures, i + 1, submit)
            except BrokenProcessPool:  # a worker died (this item or another): retry this item once
                retry = i not in crashed
                crashed.add(i)
                self._restart(futures, i if retry else i + 1, submit)
                if retry:
                    continue
                results.append((0.0, "error"))
            except Exception:
                logger.debug("reward task failed", exc_info=True)
                results.append((0.0, "error"))
            i += 1
        return results

    def _restart(self, futures: list[cf.Future], first: int, submit) -> None:
        """Kill the pool, start a new one and resubmit every item from `first` on that has no result."""
        self._kill_pool()
        self._start_and_wait()
        for j in range(first, len(futures)):
            if not _succeeded(futures[j]):
                futures[j] = submit(j)

    def _record(self, response: str, gold: str, status: str) -> None:
        s = self.stats
        s.scored += 1
        if status == "correct":
            s.correct += 1
        elif status == "no_answer":
            s.parse_failures += 1
            logger.debug("no answer extracted from %s", _excerpt(response))
        elif status == "gold_unparseable":
            s.gold_unparseable += 1
            if gold not in self._warned_golds:  # the same gold recurs in every rollout of its prompt
                self._warned_golds.add(gold)
                logger.warning("gold answer could not be parsed: %s", _excerpt(gold))
        elif status == "timeout":
            s.timeouts += 1
            logger.warning("reward timed out (scored 0): gold %s, response %s", _excerpt(gold, 40), _excerpt(response))
        elif status == "error":
            s.errors += 1
            logger.warning("reward failed (scored 0): gold %s, response %s", _excerpt(gold, 40), _excerpt(response))
