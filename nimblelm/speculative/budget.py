"""How many of its drafts each sequence verifies next step: as many as pay for the rows they add.

A draft at position j (1 = first) of a sequence whose drafts are kept with probability a adds a^j tokens in
expectation, and one row to the step. With T tokens expected from a step of R rows taking t(R) seconds,
the row pays when (T + a^j) / t(R + 1) > T / t(R). Rows are taken best first, over every sequence at once,
so a large batch (where a row costs more of the step) and a low acceptance both turn speculation down,
to none. t is measured: the model runner times its decode-step traces when it starts, and adds what every
step spends outside its trace (the LM head, sampling, verification), timed as steps run. Leaving that part
out made rows look dearer than they are: on Qwen2.5-Coder-1.5B the trace is 89 ms of a 162 ms step, and a
draft model's budget held it to one draft where four pay.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass


@dataclass
class Acceptance:
    """A sequence's recent record of kept drafts: each draft tried up to the first rejection is a trial.
    Older steps weigh less (DECAY per step); PRIOR_KEPT of PRIOR_TRIED start it at an even chance."""

    kept: float = 0.0
    tried: float = 0.0

    DECAY = 0.8
    PRIOR_KEPT, PRIOR_TRIED = 1.0, 2.0

    def update(self, num_drafts: int, num_kept: int) -> None:
        self.kept = self.DECAY * self.kept + num_kept
        self.tried = self.DECAY * self.tried + num_kept + (num_kept < num_drafts)

    def idle(self) -> None:
        """A step that verified none of its drafts: the record fades toward the prior as it would with trials, so
        a sequence the budget stopped drafting is tried again now and then (with a cost that any verifying step
        pays, a few early rejections would otherwise stop it for good)."""
        self.kept *= self.DECAY
        self.tried *= self.DECAY

    @property
    def rate(self) -> float:
        return (self.kept + self.PRIOR_KEPT) / (self.tried + self.PRIOR_TRIED)


class StepCost:
    """Seconds of a decode step by rows: a step runs the trace of the first measured row count that holds
    its rows (padded up to it); past the last one, the slope of the last two continues.

    The measured times are made to rise with the rows (_rising): timing noise can make a bucket look as
    cheap as a smaller one, or cheaper, and a row that looks free invites drafts no step can afford."""

    def __init__(self, seconds_by_rows: dict[int, float]):
        self.rows = sorted(seconds_by_rows)
        self.seconds = _rising(self.rows, [seconds_by_rows[r] for r in self.rows])

    def __call__(self, rows: int) -> float:
        i = bisect.bisect_left(self.rows, rows)
        if i < len(self.rows):
            return self.seconds[i]
        if len(self.rows) == 1:
            return self.seconds[0] * rows / self.rows[0]
        (r0, r1), (s0, s1) = self.rows[-2:], self.seconds[-2:]
        return s1 + (s1 - s0) * (rows - r1) / (r1 - r0)


def _rising(rows: list[int], seconds: list[float]) -> list[float]:
    """The closest non-decreasing fit (pooling adjacent violators into their mean), then at least half the
    average cost of a row for every row added: more rows never cost less, nor nothing, unless every
    measurement says so."""
    blocks: list[list[float]] = []  # [sum of seconds, count] of pooled neighbours
    for t in seconds:
        blocks.append([t, 1])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] > blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    fit = [total / count for total, count in blocks for _ in range(int(count))]
    floor = 0.5 * (fit[-1] - fit[0]) / (rows[-1] - rows[0]) if len(rows) > 1 else 0.0
    for i in range(1, len(fit)):
        fit[i] = max(fit[i], fit[i - 1] + floor * (rows[i] - rows[i - 1]))
    return fit


def draft_budget(room: dict[int, int], rates: dict[int, float], base_rows: int, cost: StepCost,
                 draft_pass: float = 0.0, overhead: float = 0.0, verify_extra: float = 0.0) -> dict[int, int]:
    """How many drafts each sequence (room: at most how many it may take) verifies in a step of base_rows
    rows before them: the ones worth their rows; sequences worth none are left out.

    draft_pass: seconds a proposer that drafts one position per pass (a draft model, the target's own
    layers) spends on each pass, whatever the sequences in it: drafting to depth d costs d passes. Each
    depth cap is tried, and the one with the most tokens per second of drafting and verifying wins.
    overhead: seconds of every step beyond cost(rows), whatever its rows. verify_extra: seconds a step that
    verifies drafts spends beyond cost(rows) + overhead, whatever its rows (over a low-bit KV cache a step that
    verifies a token tree, or drafts under H2O, runs eagerly, not from its trace)."""
    if draft_pass <= 0 and verify_extra <= 0:
        return _rows_that_pay(room, rates, base_rows, cost, overhead)
    best, best_rate = {}, base_rows / (cost(base_rows) + overhead)
    depths = range(1, max(room.values(), default=0) + 1) if draft_pass > 0 else [max(room.values(), default=0)]
    for depth in depths:
        capped = {s: min(n, depth) for s, n in room.items()}
        keep = _rows_that_pay(capped, rates, base_rows, cost, overhead + verify_extra + depth * draft_pass)
        if keep:
            tokens = base_rows + sum(rates[s] ** j for s, n in keep.items() for j in range(1, n + 1))
            seconds = cost(base_rows + sum(keep.values())) + overhead + verify_extra + max(keep.values()) * draft_pass
            rate = tokens / seconds
            if rate > best_rate:
                best, best_rate = keep, rate
    return best


def _rows_that_pay(room: dict[int, int], rates: dict[int, float], base_rows: int, cost: StepCost,
                   fixed: float) -> dict[int, int]:
    """The rows, best first, that raise tokens per second of a step whose time is cost(rows) + fixed the
    most. Every prefix of the best-first order is weighed, not only while each row pays on its own: a step
    runs a padded bucket of rows, so the row that opens a bucket pays for itself only with those after it."""
    # Rates are below 1 (Acceptance's prior), so a sequence's gains fall with j: best first keeps its
    # drafts in order.
    candidates = sorted(((rates[s] ** j, s, j) for s, n in room.items() for j in range(1, n + 1)),
                        key=lambda c: -c[0])
    tokens, rows = float(base_rows), base_rows
    best_rate, best_len = tokens / (cost(rows) + fixed), 0
    for i, (gain, _, _) in enumerate(candidates, start=1):
        tokens += gain
        rows += 1
        if tokens / (cost(rows) + fixed) > best_rate:
            best_rate, best_len = tokens / (cost(rows) + fixed), i
    keep: dict[int, int] = {}
    for _, s, j in candidates[:best_len]:
        keep[s] = j
    return keep


class PassTime:
    """Seconds of a recurring piece of work (a proposer's drafting pass, a step's part outside its trace): a
    moving average of the times taken."""

    DECAY = 0.9

    def __init__(self):
        self.seconds = 0.0  # until the first pass is timed, drafting looks free: the first steps draft

    def add(self, seconds: float) -> None:
        self.seconds = seconds if self.seconds == 0.0 else self.DECAY * self.seconds + (1 - self.DECAY) * seconds
