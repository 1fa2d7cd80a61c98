import os
import threading
import time

import pytest

from hdpo.reward import RewardScorer, score_one

CASES = [  # (response, gold, expected reward)
    ("So the total is \\boxed{145}.", "145", 1.0),
    ("\\boxed{\\frac{14}{3}}", "\\frac{14}{3}", 1.0),
    ("the answer is \\boxed{0.5}", "\\frac12", 1.0),
    ("We get $x = 7$, so the answer is \\boxed{7}", "7", 1.0),
    ("\\boxed{146}", "145", 0.0),
    ("\\boxed{\\frac{3}{14}}", "\\frac{14}{3}", 0.0),
    ("I am not sure how to solve this.", "145", 0.0),
    ("Final answer: \\boxed{12}", "\\boxed{12}", 1.0),  # gold already boxed
]


def mixed_batch(n: int = 50):
    items = [CASES[i % len(CASES)] for i in range(n)]
    # make items differ so a reordering would show
    items += [(f"\\boxed{{{i}}}", str(i if i % 3 else i + 1), float(i % 3 != 0)) for i in range(n)]
    return items


def hang_on_gold(response, gold, timeout_s):
    """Injected pool task: hangs on one item, like a math-verify call stuck in C code."""
    if gold == "HANG":
        time.sleep(60)
    return score_one(response, gold, timeout_s)


def slow_on_gold(response, gold, timeout_s):
    """Injected pool task: 'SLOW' takes 2 s (an item near the limit on a loaded machine), 'HANG' never ends."""
    if gold == "SLOW":
        time.sleep(2)
        gold = "4"
    return hang_on_gold(response, gold, timeout_s)


def crash_on_gold(response, gold, timeout_s):
    """Injected pool task: kills its worker on one item, like a segfault in native code."""
    if gold == "CRASH":
        os._exit(1)
    return score_one(response, gold, timeout_s)


@pytest.fixture(scope="module")
def pooled():
    with RewardScorer(workers=2, timeout_s=5) as scorer:
        yield scorer


@pytest.mark.parametrize("response,gold,expected", CASES)
def test_score_one(response, gold, expected):
    reward, status = score_one(response, gold, 5)
    assert reward == expected
    assert status == ("correct" if expected else ("no_answer" if "not sure" in response else "wrong"))


def test_a_gold_of_only_punctuation_scores_zero_and_is_counted(caplog):
    """'???' would verify against a response that repeats it (math-verify keeps it as a string): it scores 0 as
    gold_unparseable, counted and logged once; symbols that are answers (the empty set, infinity, an interval
    with Unicode minus signs, a LaTeX empty set) still verify."""
    for gold in ("???", "-", "[ ]"):
        assert score_one(f"\\boxed{{{gold}}}", gold, 5) == (0.0, "gold_unparseable")
    for gold in ("\\{\\}", "∞", "∅", "(−∞, ∞)", "\\emptyset", "Monday"):
        assert score_one(f"\\boxed{{{gold}}}", gold, 5) == (1.0, "correct"), gold
    assert score_one("\\boxed{7}", ["???", "7"], 5) == (1.0, "correct")  # another accepted answer still counts
    scorer = RewardScorer(workers=0)
    with caplog.at_level("WARNING"):
        assert scorer.score(["\\boxed{???}", "\\boxed{???}", "\\boxed{7}"], ["???", "???", "7"]) == [0.0, 0.0, 1.0]
    assert scorer.stats.gold_unparseable == 2 and scorer.stats.correct == 1
    assert caplog.text.count("gold answer could not be parsed") == 1


def test_plain_integer_gold_and_statuses():
    assert score_one("\\boxed{42}", "42", 5) == (1.0, "correct")
    assert score_one("The result is 42", "42", 5) == (1.0, "correct")
    assert score_one("", "42", 5) == (0.0, "no_answer")
    assert score_one(None, "42", 5) == (0.0, "no_answer")
    assert score_one("\\boxed{42}", "", 5) == (0.0, "gold_unparseable")


def test_fractional_timeout_still_scores():
    # math-verify's alarm takes whole seconds; a float would make it fail silently
    assert score_one("\\boxed{145}", "145", 0.3) == (1.0, "correct")


def test_no_answer_counts_as_parse_failure():
    scorer = RewardScorer(workers=0)
    assert scorer.score(["no numbers here", "\\boxed{3}"], ["3", "3"]) == [0.0, 1.0]
    assert scorer.stats.as_dict() == {"scored": 2, "correct": 1, "parse_failures": 1, "gold_unparseable": 0,
                                      "timeouts": 0, "timeouts_retried": 0, "errors": 0}


def test_pool_preserves_order_and_matches_in_process(pooled):
    items = mixed_batch()
    responses, golds, expected = zip(*items)
    in_process = RewardScorer(workers=0).score_with_status(list(responses), list(golds))
    before = pooled.stats.scored
    in_pool = pooled.score_with_status(list(responses), list(golds))
    assert [r for r, _ in in_pool] == list(expected)
    assert in_pool == in_process
    assert pooled.stats.scored - before == len(items)


def test_scoring_from_a_thread(pooled):
    items = mixed_batch(16)
    responses, golds, expected = map(list, zip(*items))
    out = {}

    def run():
        out["pool"] = pooled.score(responses, golds)
        out["inline"] = RewardScorer(workers=0).score(responses, golds)  # alarms off, with a warning

    t = threading.Thread(target=run)
    t.start()
    t.join(60)
    assert out["pool"] == expected
    assert out["inline"] == expected


def test_hung_worker_scores_timeout_and_pool_recovers():
    responses = ["\\boxed{1}", "\\boxed{2}", "\\boxed{3}", "\\boxed{5}", "\\boxed{4}"]
    golds = ["1", "2", "HANG", "4", "4"]
    with RewardScorer(workers=2, timeout_s=5, guard_s=1.0, _task=hang_on_gold) as scorer:
        scorer._start_and_wait()
        first = list(scorer._pool._processes.values())
        out = scorer.score_with_status(responses, golds)
        # the hung worker (asleep for 60 s) was killed with its pool, not waited for
        assert first and not any(p.is_alive() for p in first)
        assert out == [(1.0, "correct"), (1.0, "correct"), (0.0, "timeout"), (0.0, "wrong"), (1.0, "correct")]
        assert scorer.stats.timeouts == 1 and scorer.stats.scored == 5
        assert scorer.score(["\\boxed{9}"], ["9"]) == [1.0]  # rebuilt pool works


def test_crashing_worker_scores_error_and_others_survive():
    with RewardScorer(workers=1, timeout_s=5, _task=crash_on_gold) as scorer:
        scorer.score(["\\boxed{0}"], ["0"])  # workers warmed up: a crash now is the item's, not the startup's
        out = scorer.score_with_status(["\\boxed{1}", "\\boxed{2}", "\\boxed{3}"], ["1", "CRASH", "3"])
        assert out == [(1.0, "correct"), (0.0, "error"), (1.0, "correct")]
        assert scorer.stats.errors == 1
        assert scorer.score(["\\boxed{9}"], ["9"]) == [1.0]


def test_timed_out_item_is_rescored_once_with_the_longer_limit():
    """Hard limit 1 s, retry limit 8 s: the slow item is re-scored and verified, the hanging one still scores 0
    (and nothing waits on it for more than the two limits); both are counted."""
    responses = ["\\boxed{1}", "\\boxed{4}", "\\boxed{3}", "\\boxed{4}"]
    golds = ["1", "SLOW", "HANG", "4"]
    with RewardScorer(workers=2, timeout_s=5, guard_s=1.0, _task=slow_on_gold, retry_timeout_s=20,
                      retry_guard_s=8.0) as scorer:
        scorer._start_and_wait()
        first = list(scorer._pool._processes.values())
        out = scorer.score_with_status(responses, golds)
        assert first and not any(p.is_alive() for p in first)  # HANG's worker was killed, not waited for
    assert out == [(1.0, "correct"), (1.0, "correct"), (0.0, "timeout"), (1.0, "correct")]
    # SLOW and HANG always outlive 1 s; on a loaded machine a plain item may too, and is then rescued by the retry
    assert scorer.stats.timeouts == 1 and scorer.stats.timeouts_retried >= 2 and scorer.stats.scored == 4


def test_retry_gets_the_longer_limit_in_process():
    """math-verify's own alarm, as under load: times out at 5 s, verifies with 20 s."""
    seen = []

    def alarm_bound(response, gold, timeout_s):
        seen.append(timeout_s)
        return (0.0, "timeout") if timeout_s < 20 else score_one(response, gold, None)

    scorer = RewardScorer(workers=0, timeout_s=5, _task=alarm_bound, retry_timeout_s=20)
    assert scorer.score_with_status(["\\boxed{2}", "\\boxed{3}"], ["2", "4"]) == [(1.0, "correct"), (0.0, "wrong")]
    assert seen == [5, 5, 20, 20] and scorer.stats.timeouts == 0 and scorer.stats.timeouts_retried == 2
    never = RewardScorer(workers=0, timeout_s=5, _task=alarm_bound)  # no retry limit: a timeout scores 0 at once
    assert never.score(["\\boxed{2}"], ["2"]) == [0.0] and never.stats.timeouts == 1
    with pytest.raises(ValueError, match="retry_timeout_s"):
        RewardScorer(workers=0, timeout_s=5, retry_timeout_s=2)
