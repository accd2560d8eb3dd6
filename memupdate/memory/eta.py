"""Estimates of a training's time left, from its progress so far (bench/eta.py scores them
against the variants it was chosen over).

Each estimator is fed the trainer's progress reports in order and answers seconds left, or None
while it cannot tell yet. An estimate is said as one ("~40 s") wherever it is shown.
"""

import math


class FactPace:
    """Time left at the pace at which facts have been passing since the count of facts still
    training last rose (None until one has passed)."""

    def __init__(self):
        self.start: tuple[float, int] | None = None

    def __call__(self, p) -> float | None:
        if self.start is None or p.active_facts > self.start[1]:
            self.start = (p.seconds, p.active_facts)
            return None
        done = self.start[1] - p.active_facts
        return None if done <= 0 else (p.seconds - self.start[0]) * p.active_facts / done


class LogOddsLine:
    """Time left for a share's log-odds, rising along a line fitted to the reports of the latest
    half of the training, to reach the level of half an item missing (None while the line does
    not rise)."""

    def __init__(self, min_points: int = 5):
        self.points: list[tuple[float, float]] = []
        self.min_points = min_points

    def add(self, seconds: float, share: float, items: int) -> float | None:
        floor = 0.5 / items  # half an item: the share is never exactly 0 or 1 here
        share = min(max(share, floor), 1 - floor)
        self.points.append((seconds, math.log(share / (1 - share))))
        recent = [(t, y) for t, y in self.points if t >= seconds / 2]
        if len(recent) < self.min_points:
            return None
        n = len(recent)
        mean_t = sum(t for t, _ in recent) / n
        mean_y = sum(y for _, y in recent) / n
        spread = sum((t - mean_t) ** 2 for t, _ in recent)
        if spread == 0:
            return None
        slope = sum((t - mean_t) * (y - mean_y) for t, y in recent) / spread
        if slope <= 0:
            return None
        now = mean_y + slope * (seconds - mean_t)
        return max(0.0, (math.log((1 - floor) / floor) - now) / slope)


class TokenLogit:
    """The log-odds of token recall along a line (LogOddsLine). Token recall climbs from the
    first step, long before the first fact passes."""

    def __init__(self):
        self.line = LogOddsLine()

    def __call__(self, p) -> float | None:
        return self.line.add(p.seconds, p.token_recall, p.target_tokens)


class TokensThenFactPace:
    """TokenLogit until half the facts have passed, then FactPace: early on only token recall
    moves; late, the last facts pass in a run that token recall, near 1, hardly shows.
    Chosen on nine recorded trainings (bench/eta.py, docs/benchmarks.md)."""

    def __init__(self, switch: float = 0.5):
        self.tokens, self.facts, self.switch = TokenLogit(), FactPace(), switch
        self.switched = False

    def __call__(self, p) -> float | None:
        by_tokens, by_facts = self.tokens(p), self.facts(p)
        self.switched = self.switched or p.fact_recall >= self.switch
        return by_facts if self.switched and by_facts is not None else by_tokens


TimeLeft = TokensThenFactPace  # the estimator the trainer reports


def within_budget(estimate: float | None, p, max_seconds: float | None = None) -> float | None:
    """`estimate`, but never past the training's budget (its steps at the pace so far, or its
    seconds): a training stops there whatever its recall. Seen on 1,000 phone numbers, whose
    token recall stayed flat for 30 epochs: estimates up to 67 years against a budget of hours."""
    if estimate is None or p.step == 0:
        return estimate
    left = (p.max_steps - p.step) * p.seconds / p.step
    if max_seconds:
        left = min(left, max_seconds - p.seconds)
    return min(estimate, max(0.0, left))
