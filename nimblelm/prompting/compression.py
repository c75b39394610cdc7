"""Prompt compression: drop the tokens a small LM finds least informative before the prompt reaches the model.

Every method ranks the prompt's tokens by their surprisal under the scorer (`Scorer`) and keeps the most
informative ones up to a token budget (a rate of the prompt's scorer tokens, or a count). What is kept is
always the prompt's own text: each token owns the characters from its first one to the next token's, and the
compressed prompt is the kept tokens' characters in order, so kept spans come back exactly.

- `selective_context` (Li et al., 2023): the surprisal of each token given the whole prompt before it; units
  (tokens, words or sentences) scored by the sum over their tokens, the least informative dropped first.
- `llmlingua` (Jiang et al., 2023): a budget controller first drops whole paragraphs (the prompt's parts
  between blank lines: demonstrations, documents), the lowest-perplexity ones, down to `coarse_factor` times
  the budget (while the kept ones hold fewer tokens than the budget, the next ranked stays whatever its
  length); then iterative token-level compression walks the rest in segments, each scored given the
  compressed text before it, keeping the most surprising tokens of each segment in proportion.
- `longllmlingua` (Jiang et al., 2024): question-aware. Paragraphs ranked by how likely they make the
  question and the paper's restrictive statement after it (their mean surprisal given the paragraph), each
  kept paragraph given a share of its tokens to keep that falls linearly with its rank (`dynamic_ratio`
  above the mean for the first, as far below for the last), then tokens by contrastive surprisal: how much
  less surprising the question makes them.

Both rank the paragraphs, and `reorder="sort"` (LongLLMLingua's document reordering, its default there) puts the
kept ones in rank order, best first, where the lost-in-the-middle effect hurts least; paragraphs that hold nothing
but kept-verbatim text stay in place, and a blank line separates paragraphs that reordering brought together.

Parts of the prompt the user names in `keep` are never dropped; they count against the budget.
"""

from __future__ import annotations

import itertools
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from nimblelm.errors import InvalidRequestError

METHODS = ("selective_context", "llmlingua", "longllmlingua")
UNITS = ("token", "word", "sentence")
REORDERS = ("original", "sort")
SEPARATOR = "\n\n"  # between paragraphs that reordering brings together


@dataclass(frozen=True)
class PromptCompression:
    method: str = "llmlingua"
    rate: float | None = 0.5  # tokens kept / the prompt's tokens (the scorer's); target_tokens overrides it
    target_tokens: int | None = None
    scorer: str | None = None  # a model path or alias; None: the smallest packaged model
    keep: tuple[str, ...] = ()  # substrings of the prompt kept verbatim wherever they occur
    question: str | None = None  # longllmlingua: what the prompt should answer (ranks, is not added)
    unit: str = "word"  # selective_context: what is dropped whole
    segment_tokens: int = 100  # llmlingua, longllmlingua: tokens per iterative segment
    # llmlingua, longllmlingua: paragraphs kept up to this many times the budget (the llmlingua package keeps
    # documents to its budget and 100 tokens)
    coarse_factor: float = 1.0
    # The kept paragraphs' shares of tokens kept, from the first ranked to the last: the mean plus this, down to
    # the mean minus this. None: LongLLMLingua's 0.3 for longllmlingua, 0 (one share) for llmlingua.
    dynamic_ratio: float | None = None
    # llmlingua, longllmlingua: the kept paragraphs in the prompt's order ("original") or in rank order ("sort").
    # None: "sort" for longllmlingua, "original" for llmlingua.
    reorder: str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise InvalidRequestError(f"prompt compression method {self.method!r} is not one of {', '.join(METHODS)}")
        if self.target_tokens is None and (self.rate is None or not 0 < self.rate <= 1):
            raise InvalidRequestError(f"prompt compression rate must be in (0, 1] (tokens kept / tokens given), "
                                      f"got {self.rate}")
        if self.target_tokens is not None and self.target_tokens < 1:
            raise InvalidRequestError(f"prompt compression target_tokens must be >= 1, got {self.target_tokens}")
        if self.unit not in UNITS:
            raise InvalidRequestError(f"prompt compression unit {self.unit!r} is not one of {', '.join(UNITS)}")
        if self.segment_tokens < 1 or self.coarse_factor < 1:
            raise InvalidRequestError("prompt compression segment_tokens must be >= 1 and coarse_factor >= 1")
        if self.dynamic_ratio is not None and not 0 <= self.dynamic_ratio <= 1:
            raise InvalidRequestError(f"prompt compression dynamic_ratio must be in [0, 1], got {self.dynamic_ratio}")
        if self.reorder is not None and self.reorder not in REORDERS:
            raise InvalidRequestError(f"prompt compression reorder {self.reorder!r} is not one of {', '.join(REORDERS)}")
        if self.reorder == "sort" and self.method == "selective_context":
            raise InvalidRequestError("prompt compression reorder='sort' needs a method that ranks paragraphs "
                                      "(llmlingua, longllmlingua)")
        if self.method == "longllmlingua" and not (self.question or "").strip():
            raise InvalidRequestError("prompt compression method longllmlingua needs the question")
        object.__setattr__(self, "keep", tuple(k for k in (self.keep or ()) if k))


@dataclass
class CompressedPrompt:
    text: str
    original_tokens: int  # the scorer's tokens
    compressed_tokens: int
    seconds: float

    @property
    def ratio(self) -> float:
        """Compression ratio: tokens given / tokens kept."""
        return self.original_tokens / max(1, self.compressed_tokens)


class _Prompt:
    """A prompt as the scorer's tokens: each token's characters, whether `keep` forces it, its paragraph."""

    def __init__(self, text: str, ids: list[int], starts: list[int], keep: Sequence[str]):
        self.text, self.ids = text, ids
        bounds = [0, *starts[1:], len(text)] if ids else [0]
        self.spans = list(itertools.pairwise(bounds))  # token i owns text[spans[i][0]:spans[i][1]]
        kept = [False] * len(text)
        for k in keep:
            for m in re.finditer(re.escape(k), text):
                kept[m.start():m.end()] = [True] * len(k)
        self.forced = [any(kept[a:b]) for a, b in self.spans]
        # A paragraph ends after each run of blank lines; a token belongs to the one its first character is in.
        breaks = [m.end() for m in re.finditer(r"\n\s*\n", text)]
        self.paragraph = [sum(b <= a for b in breaks) for a, _ in self.spans]
        # A paragraph of kept text and white space is kept whole: the blank line after a kept instruction stays.
        loose = {k for i, k in enumerate(self.paragraph) if not self.forced[i] and not self.owned(i).isspace()}
        self.forced = [f or k not in loose for f, k in zip(self.forced, self.paragraph)]

    def __len__(self) -> int:
        return len(self.ids)

    def owned(self, i: int) -> str:
        a, b = self.spans[i]
        return self.text[a:b]

    def joined(self, order: Sequence[int]) -> tuple[str, int]:
        """The characters of the tokens in `order`, and how many SEPARATORs were added: where `order` is not the
        prompt's own, one between two paragraphs where the first does not end in a blank line."""
        separate = list(order) != sorted(order)
        parts, added = [], 0
        for prev, i in itertools.pairwise([None, *order]):
            if (separate and prev is not None and self.paragraph[i] != self.paragraph[prev]
                    and not re.search(r"\n\s*\n\s*$", "".join(parts[-4:]))):
                parts.append(SEPARATOR)
                added += 1
            parts.append(self.owned(i))
        return "".join(parts), added


def _budget(config: PromptCompression, n: int) -> int:
    return min(n, config.target_tokens if config.target_tokens is not None else math.ceil(config.rate * n))


def _top(scores: dict[int, float], k: int) -> list[int]:
    """The k positions of the highest scores, the earlier one first on a tie."""
    return sorted(sorted(scores, key=lambda i: (-scores[i], i))[:max(0, k)])


def _selective_context(p: _Prompt, config: PromptCompression, scorer) -> list[int]:
    s = _surprisal_windows(p.ids, scorer)
    units: list[list[int]] = []
    for i in range(len(p)):
        text = p.owned(i)
        prev = p.owned(i - 1) if i else ""
        starts = {"token": True, "word": text[:1].isspace() or not prev,
                  "sentence": not prev or bool(re.search(r"[.!?]\s*$|\n", prev))}[config.unit]
        if not units or starts or p.forced[i] != p.forced[units[-1][0]]:
            units.append([i])
        else:
            units[-1].append(i)
    keep = set(range(len(p)))
    over = len(p) - _budget(config, len(p))
    droppable = [u for u in units if not p.forced[u[0]] and all(math.isfinite(s[i]) for i in u)]
    for unit in sorted(droppable, key=lambda u: (sum(s[i] for i in u), u[0])):
        if over <= 0:
            break
        keep -= set(unit)
        over -= len(unit)
    return sorted(keep)


def _surprisal_windows(ids: list[int], scorer) -> list[float]:
    """Each token's surprisal given up to a window of the tokens before it: windows that overlap by half."""
    w, half = scorer.window, scorer.window // 2
    if len(ids) <= w:
        return scorer.surprisals([((), ids)])[0] if ids else []
    requests = [(ids[max(0, a - half):a], ids[a:a + half]) for a in range(0, len(ids), half)]
    return [x for row in scorer.surprisals(requests) for x in row]


# LongLLMLingua ranks a document by the question followed by this sentence: "restrictive", the paper says.
RESTRICTIVE = " We can get the answer to this question in the given documents."


def _ranked(p: _Prompt, config: PromptCompression, scorer, items: list[list[int]]) -> list[int]:
    """The paragraphs `items` (their tokens) best first."""
    if config.method == "longllmlingua":  # the question's mean surprisal given the paragraph: lower ranks first
        q = scorer.tokenize(config.question + RESTRICTIVE)[0]
        rows = scorer.surprisals([([p.ids[i] for i in item][-(scorer.window - len(q)):], q) for item in items])
        rank = [sum(r) / len(r) for r in rows]
    else:  # the paragraph's own perplexity: higher ranks first
        rows = scorer.surprisals([((), [p.ids[i] for i in item][:scorer.window]) for item in items])
        rank = [-sum(x for x in r if math.isfinite(x)) / max(1, len(r) - 1) for r in rows]
    return sorted(range(len(items)), key=lambda j: (rank[j], j))


def _spread(config: PromptCompression) -> float:
    if config.dynamic_ratio is not None:
        return config.dynamic_ratio
    return 0.3 if config.method == "longllmlingua" else 0.0


def _reorder(config: PromptCompression) -> str:
    if config.reorder is not None:
        return config.reorder
    return "sort" if config.method == "longllmlingua" else "original"


def _coarse(p: _Prompt, config: PromptCompression, scorer, budget: int) -> tuple[list[int], list[list[int]]]:
    """The tokens of the paragraphs kept by rank (forced tokens always), up to coarse_factor x budget, in the
    order they will stand; and the kept paragraphs' tokens that are not forced, best ranked first (one group
    where nothing was ranked)."""
    paragraphs: dict[int, list[int]] = {}
    for i in range(len(p)):
        if not p.forced[i]:
            paragraphs.setdefault(p.paragraph[i], []).append(i)
    ids, items = list(paragraphs), list(paragraphs.values())
    forced = [i for i in range(len(p)) if p.forced[i]]
    limit = config.coarse_factor * budget - len(forced)
    fits = len(p) - len(forced) <= limit
    sort = _reorder(config) == "sort"
    if len(items) < 2 or (fits and not _spread(config) and not sort):
        return list(range(len(p))), [[i for item in items for i in item]]
    ranked = _ranked(p, config, scorer, items)
    chosen, kept = ranked, range(len(p))
    if not fits:
        chosen, total, room = [], 0, max(1, budget - len(forced))
        for j in ranked:
            # Short of the budget, the next ranked always (token pruning cuts it down): else a short first
            # paragraph and long others would leave fewer tokens than the budget.
            if total + len(items[j]) <= limit or total < room:
                chosen.append(j)
                total += len(items[j])
        kept = {*forced, *(i for j in chosen for i in items[j])}
    # Sorted, the chosen paragraphs take the places the chosen paragraphs held, best ranked first.
    place = dict(zip((ids[j] for j in chosen), sorted(ids[j] for j in chosen))) if sort else {}
    order = sorted(kept, key=lambda i: (place.get(p.paragraph[i], p.paragraph[i]), i))
    return order, [items[j] for j in chosen]


def _shares(groups: list[list[int]], room: int, spread: float) -> dict[int, float]:
    """Each token's share of its group kept: the groups' shares fall linearly from the mean plus `spread` (the
    first group) to the mean minus it (the last), each within [0, 1], the mean such that they keep `room`."""
    n = len(groups)
    if not spread or n < 2:
        return {i: 1.0 for g in groups for i in g}
    deltas = [spread * (1 - 2 * j / (n - 1)) for j in range(n)]

    def kept(mean: float) -> float:
        return sum(len(g) * min(1.0, max(0.0, mean + d)) for g, d in zip(groups, deltas))

    low, high = -1.0, 2.0  # keeps nothing, and every token
    for _ in range(50):
        mid = (low + high) / 2
        low, high = (mid, high) if kept(mid) < room else (low, mid)
    return {i: min(1.0, max(0.0, high + d)) for g, d in zip(groups, deltas) for i in g}


def _turns(free: list[int], scores: list[float], shares: list[float]) -> dict[int, float]:
    """A priority for each free position of a segment, the highest kept first: tokens of one share compete by
    score, and the shares' classes take turns in proportion to the tokens each should keep (Webster's
    apportionment: the j-th best of a class of n tokens at share s comes at (j + 1/2) / (n s))."""
    classes: dict[float, list[int]] = {}
    for j, s in zip(free, shares):
        classes.setdefault(s, []).append(j)
    priority = {}
    for s, members in classes.items():
        for rank, j in enumerate(sorted(members, key=lambda j: (-scores[j], j))):
            priority[j] = -(rank + 0.5) / (len(members) * s) if s > 0 else -math.inf
    return priority


def _iterative(p: _Prompt, config: PromptCompression, scorer, order: list[int], groups: list[list[int]],
               budget: int) -> list[int]:
    """Token-level compression in segments of `order`: each segment scored given the compressed tokens
    before it, its most informative tokens kept so that the kept share tracks the budget, each token (of
    `groups`, those not forced) weighed by its group's share (_shares)."""
    free = sum(len(g) for g in groups)
    room = budget - (len(order) - free)  # what the tokens not forced may keep
    if room >= free:
        return order
    if room <= 0:
        return [i for i in order if p.forced[i]]
    share = _shares(groups, room, _spread(config))
    total = sum(share.values())
    q = scorer.tokenize(config.question)[0] if config.method == "longllmlingua" else []
    out: list[int] = []
    seen = 0.0
    kept_free = 0
    for a in range(0, len(order), config.segment_tokens):
        segment = order[a:a + config.segment_tokens]
        tokens = [p.ids[i] for i in segment]
        fits = scorer.window - len(segment) - len(q)  # the compressed tokens before the segment that fit
        context = [p.ids[i] for i in out[len(out) - fits:]] if fits > 0 else []
        if q:  # contrastive: how much less surprising the question makes each token
            plain, asked = scorer.surprisals([(context, tokens), (q + context, tokens)])
            scores = [x - y if math.isfinite(x) else math.inf for x, y in zip(plain, asked)]
        else:
            scores = scorer.surprisals([(context, tokens)])[0]
        free_here = [j for j, i in enumerate(segment) if not p.forced[i]]
        seen += sum(share[segment[j]] for j in free_here)
        k = round(room * seen / total) - kept_free
        chosen = set(_top(_turns(free_here, scores, [share[segment[j]] for j in free_here]), k))
        kept_free += len(chosen)
        out += [i for j, i in enumerate(segment) if p.forced[i] or j in chosen]
    return out


def compress(prompt: str, config: PromptCompression, scorer) -> CompressedPrompt:
    """The prompt compressed by config's method, its scorer tokens before and after."""
    start = time.perf_counter()
    question = len(scorer.tokenize(config.question)[0]) if config.method == "longllmlingua" else 0
    if question and question + config.segment_tokens >= scorer.window:
        raise InvalidRequestError(f"the question and a segment of {config.segment_tokens} tokens do not fit the "
                                  f"scorer's window of {scorer.window} tokens")
    ids, starts = scorer.tokenize(prompt)
    p = _Prompt(prompt, ids, starts, config.keep)
    budget = _budget(config, len(p))
    if config.method == "selective_context":
        kept = _selective_context(p, config, scorer)
    else:
        kept = _iterative(p, config, scorer, *_coarse(p, config, scorer, budget), budget)
    text, separators = p.joined(kept)
    if separators:
        separators *= len(scorer.tokenize(SEPARATOR)[0])
    return CompressedPrompt(text, len(p), len(kept) + separators, time.perf_counter() - start)
