"""The answer at a glance: per task, which full-set method is best on each headline metric, by
how much it leads the runner-up (paired bootstrap interval), and the cheapest method that the
best does not beat significantly.

Only rows evaluated on the full sets compete (subset rows and their ``map ⊂`` partners are
compared in their own table). Cost is the seconds to train the method's networks, fit it and
predict 1,000 inputs, medians over seeds, so that a method is "cheapest" by what a user pays.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from bench.derived_rows import UNTUNED
from bench.metrics.registry import metric, parse_auroc_key, parse_shift_key
from bench.ranking import ahead, difference_cell, summarize

if TYPE_CHECKING:
    from bench.leaderboard import Collected
    from bench.paired import Interval

COST_KEYS = ("costs/train_s", "costs/fit_posthoc_s", "costs/predict_per_1k_s")


@dataclass(frozen=True)
class Headline:
    """A metric the answer box names a winner for."""

    title: str
    key: str
    direction: int  # +1 higher is better, -1 lower is better


@dataclass(frozen=True)
class Answer:
    headline: Headline
    best: str
    best_mean: float
    runner_up: str | None
    lead: Interval | None  # best − runner-up, paired
    cheapest_tie: str | None  # the cheapest method the best does not beat significantly (None: the best)
    ties: int  # other rows the best does not beat significantly

    @property
    def significant(self) -> bool:
        return ahead(self.lead, self.headline.direction)


ANSWERED = ("nll", "ece")  # registered metrics answered on the test set and (the first) on every shift set
ANSWERED_SCORE = "entropy"  # the OOD score every row has


def headlines(keys: set[str]) -> list[Headline]:
    """NLL and ECE, the entropy AUROC of every OOD set and the NLL of every shift set."""
    answered = [metric(name) for name in ANSWERED]
    out = [Headline(m.title, m.test_key, m.direction) for m in answered]
    out += [Headline(f"OOD AUROC {p[0]} ({ANSWERED_SCORE})", k, 1)
            for k in sorted(keys) if (p := parse_auroc_key(k)) and p[1] == ANSWERED_SCORE]
    on_shift = answered[0]
    out += [Headline(f"shift {on_shift.title} {p[0]}", k, on_shift.direction)
            for k in sorted(keys) if (p := parse_shift_key(k)) and p[1] == on_shift.name]
    return out


def total_cost(runs: list[dict[str, float]]) -> float | None:
    """Median over seeds of train + fit seconds + seconds per 1,000 predictions (None: unknown)."""
    totals = [sum(r[k] for k in COST_KEYS) for r in runs if all(k in r for k in COST_KEYS)]
    return float(np.median(totals)) if totals else None


def answer(task: str, found: Collected, rows: list[str], headline: Headline) -> Answer | None:
    """The answer for one metric among ``rows`` (full-set methods), or None if fewer than two have it."""
    runs = found.table[task]
    means = {m: summarize([r[headline.key] for r in runs[m] if headline.key in r]).mean
             for m in rows if any(headline.key in r for r in runs[m])}
    if len(means) < 2:
        return None
    order = sorted(means, key=lambda m: (-headline.direction * means[m], m))
    best, runner_up = order[0], order[1]
    lead = found.compare(task, best, runner_up).get(headline.key)
    ties = [m for m in order
            if m == best or not ahead(found.compare(task, best, m).get(headline.key), headline.direction)]
    costs = {m: c for m in ties if (c := total_cost(runs[m])) is not None}
    cheapest = min(costs, key=costs.__getitem__) if costs else None
    return Answer(headline, best, means[best], runner_up, lead, None if cheapest == best else cheapest,
                  len(ties) - 1)


def answer_lines(task: str, found: Collected, rows: list[str]) -> list[str]:
    """The markdown answer box of a task (heading, then one bullet per headline metric)."""
    lines = answer_bullets(task, found, rows)
    if not lines:
        return []
    return ["**At a glance** (full-set rows; intervals: paired bootstrap 95 %, best − runner-up; cost: "
            "seconds to train, fit and predict 1,000 inputs, median over seeds):", "", *lines, ""]


def answer_bullets(task: str, found: Collected, rows: list[str]) -> list[str]:
    """One markdown bullet per headline metric. ``[s=1]`` rows do not compete: they are their
    method's own probit predictive again."""
    rows = [m for m in rows if not m.endswith(UNTUNED)]
    keys = {k for m in rows for r in found.table[task][m] for k in r}
    lines = []
    for headline in headlines(keys):
        a = answer(task, found, rows, headline)
        if a is None:
            continue
        lead = (f"ahead of `{a.runner_up}` by {difference_cell(a.lead.diff, a.lead.low, a.lead.high)}"
                if a.lead is not None else f"runner-up `{a.runner_up}` (no paired interval)")
        verdict = "" if a.significant else " — not significantly: a tie"
        cheap = ("; every other row is significantly worse" if a.ties == 0
                 else f"; cheapest row not significantly worse: `{a.cheapest_tie}`" if a.cheapest_tie
                 else "; no row it does not beat significantly is cheaper")
        lines.append(f"- **{headline.title}**: `{a.best}` ({a.best_mean:.4f}), {lead}{verdict}{cheap}.")
    return lines
