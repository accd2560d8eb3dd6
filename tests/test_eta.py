"""The time-left estimators (memory/eta.py) on progress series whose end is known."""

import math

import pytest

from memupdate.memory.eta import FactPace, TokenLogit, TokensThenFactPace, within_budget
from memupdate.memory.memft import Progress

ELL = 500  # target tokens


def report(seconds: float, token_recall: float, active: int = 10, passed=0.0) -> Progress:
    return Progress(
        step=int(seconds),
        max_steps=2000,
        epoch=1,
        loss=1.0,
        token_recall=token_recall,
        fact_recall=passed,
        tokens_processed=0,
        active_facts=active,
        seconds=seconds,
        eta_seconds=None,
        target_tokens=ELL,
        facts=10,
    )


def logistic(t: float, slope: float, middle: float) -> float:
    return 1 / (1 + math.exp(-slope * (t - middle)))


def test_token_logit_finds_the_end_of_a_linear_rise_in_log_odds():
    slope, middle = 0.05, 100.0
    # the end: log-odds reach the level of half a token missing
    end = middle + math.log((ELL - 0.5) / 0.5) / slope
    estimate = TokenLogit()
    answers = {t: estimate(report(t, logistic(t, slope, middle))) for t in range(1, 200)}
    assert answers[1] is None  # too few reports to fit a line
    for t in (50, 100, 150):
        assert answers[t] == pytest.approx(end - t, rel=0.02)


def test_token_logit_says_nothing_while_recall_falls():
    estimate = TokenLogit()
    answers = [estimate(report(t, 0.9 - t / 100)) for t in range(1, 40)]
    assert answers[-1] is None


def test_fact_pace_extrapolates_from_when_the_count_last_rose():
    estimate = FactPace()
    assert estimate(report(10, 0.5, active=10)) is None  # nothing passed yet
    assert estimate(report(20, 0.5, active=8)) == pytest.approx(10 * 8 / 2)
    # more facts training than at the start (old facts knocked back): start again
    assert estimate(report(30, 0.5, active=12)) is None
    assert estimate(report(40, 0.5, active=6)) == pytest.approx(10 * 6 / 6)


def test_the_trainers_estimate_follows_tokens_then_the_pace_of_facts():
    chosen, tokens, facts = TokensThenFactPace(), TokenLogit(), FactPace()
    for t in range(1, 100):
        passed = max(0, t - 50) / 50  # no fact passes before t = 50, half of them by t = 75
        p = report(t, logistic(t, 0.05, 60.0), active=round(10 * (1 - passed)), passed=passed)
        by_tokens, by_facts, answer = tokens(p), facts(p), chosen(p)
        if passed < 0.5:
            assert answer == by_tokens
        elif by_facts is not None:
            assert answer == by_facts
    assert answer is not None and answer == by_facts


def test_no_estimate_goes_past_the_budget():
    stalled = report(100, 0.09)  # step 100 of 2,000 in 100 s: the step budget ends in 1,900 s
    assert within_budget(1e6, stalled) == pytest.approx(1900)
    assert within_budget(1e6, stalled, max_seconds=400) == pytest.approx(300)
    assert within_budget(50.0, stalled) == 50.0  # an estimate within the budget stands
    assert within_budget(None, stalled) is None  # unknown stays unknown
