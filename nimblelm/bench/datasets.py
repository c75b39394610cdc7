"""Benchmark workloads: requests sampled from ShareGPT and HumanEval (read by nimblelm/corpora.py), random
token ids, and random token ids behind one shared prefix."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass

from nimblelm.errors import InvalidRequestError


@dataclass(frozen=True)
class BenchRequest:
    """One request of a throughput workload: the exact prompt token ids and the output length to force."""

    prompt_token_ids: tuple[int, ...]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)


def keep_pair(prompt_len: int, output_len: int, *, min_len: int = 4, max_prompt_len: int = 1024,
              max_total_len: int = 2048) -> bool:
    """The usual serving-benchmark filter on token lengths."""
    return (prompt_len >= min_len and output_len >= min_len and prompt_len <= max_prompt_len
            and prompt_len + output_len <= max_total_len)


def sample_sharegpt(pairs: Sequence[tuple[str, str]], tokenizer, num_requests: int, *, seed: int = 0,
                    max_output_len: int | None = None, min_len: int = 4, max_prompt_len: int = 1024,
                    max_total_len: int = 2048) -> list[BenchRequest]:
    """Seeded sample of num_requests pairs that pass the filter, tokenized without special tokens.

    The pairs are shuffled with the seed and taken in that order until enough pass the filter, so the
    same seed, data and tokenizer give the same requests. The output length is the completion's token
    length, capped at max_output_len.
    """
    if num_requests <= 0:
        raise InvalidRequestError(f"number of prompts must be > 0, got {num_requests}")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    out: list[BenchRequest] = []
    batch = 256
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        prompts = [pairs[i][0] for i in idx]
        completions = [pairs[i][1] for i in idx]
        p_ids = _encode(tokenizer, prompts)
        c_ids = _encode(tokenizer, completions)
        for p, c in zip(p_ids, c_ids):
            if not keep_pair(len(p), len(c), min_len=min_len, max_prompt_len=max_prompt_len,
                             max_total_len=max_total_len):
                continue
            olen = len(c) if max_output_len is None else min(len(c), max_output_len)
            out.append(BenchRequest(tuple(int(t) for t in p), olen))
            if len(out) == num_requests:
                return out
    raise InvalidRequestError(
        f"only {len(out)} ShareGPT pairs pass the filter, fewer than the {num_requests} requested")


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    try:
        enc = tokenizer(texts, add_special_tokens=False)
        return [list(x) for x in enc["input_ids"]]
    except TypeError:
        return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


# --------------------------------------------------------------------------------- random workload


def random_requests(num_requests: int, input_len: int, output_len: int, *, vocab_size: int,
                    range_ratio: float = 0.0, seed: int = 0,
                    exclude_ids: Sequence[int] = ()) -> list[BenchRequest]:
    """Requests of random token ids; lengths drawn uniformly from [len*(1-r), len*(1+r)], seeded."""
    if num_requests <= 0:
        raise InvalidRequestError(f"number of prompts must be > 0, got {num_requests}")
    if input_len <= 0 or output_len <= 0:
        raise InvalidRequestError(f"input and output lengths must be > 0, got {input_len} and {output_len}")
    if not 0.0 <= range_ratio < 1.0:
        raise InvalidRequestError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    rng = random.Random(seed)
    excluded = {int(x) for x in exclude_ids}
    allowed = [t for t in range(vocab_size) if t not in excluded] if excluded else None

    def length(n: int) -> int:
        lo = max(1, int(n * (1 - range_ratio)))
        hi = max(lo, int(n * (1 + range_ratio)))
        return rng.randint(lo, hi)

    out = []
    for _ in range(num_requests):
        il, ol = length(input_len), length(output_len)
        if allowed is not None:
            ids = tuple(rng.choice(allowed) for _ in range(il))
        else:
            ids = tuple(rng.randrange(vocab_size) for _ in range(il))
        out.append(BenchRequest(ids, ol))
    return out


def prefix_requests(num_requests: int, prefix_len: int, input_len: int, output_len: int, *, vocab_size: int,
                    range_ratio: float = 0.0, seed: int = 0, exclude_ids: Sequence[int] = ()) -> list[BenchRequest]:
    """One fixed random prefix of prefix_len tokens shared by every request, then a random suffix.

    Suffix and output lengths vary as in random_requests; the prefix is the same ids for the same seed.
    The workload for prefix caching: a cache can skip the shared prefix of every request after the first.
    """
    if prefix_len < 0:
        raise InvalidRequestError(f"--prefix-len must be >= 0, got {prefix_len}")
    prefix = random_requests(1, prefix_len, 1, vocab_size=vocab_size, seed=seed + 7_777_777,
                             exclude_ids=exclude_ids)[0].prompt_token_ids if prefix_len else ()
    tails = random_requests(num_requests, input_len, output_len, vocab_size=vocab_size, range_ratio=range_ratio,
                            seed=seed, exclude_ids=exclude_ids)
    return [BenchRequest(tuple(prefix) + r.prompt_token_ids, r.output_len) for r in tails]


def humaneval_requests(problems: Sequence[dict], tokenizer, num_requests: int, *, seed: int = 0,
                       max_output_len: int = 128, max_total_len: int = 2048) -> list[BenchRequest]:
    """Seeded sample of HumanEval prompts; each output length is its canonical solution's token length,
    capped at max_output_len (at least 4). More requests than problems cycle through a reshuffle."""
    if num_requests <= 0:
        raise InvalidRequestError(f"number of prompts must be > 0, got {num_requests}")
    if not problems:
        raise InvalidRequestError("no HumanEval problems")
    rng = random.Random(seed)
    prompts = _encode(tokenizer, [p["prompt"] for p in problems])
    solutions = _encode(tokenizer, [p.get("canonical_solution") or "" for p in problems])
    usable = [i for i in range(len(problems)) if len(prompts[i]) + 4 <= max_total_len]
    out: list[BenchRequest] = []
    while len(out) < num_requests:
        order = list(usable)
        rng.shuffle(order)
        for i in order:
            olen = max(4, min(len(solutions[i]), max_output_len, max_total_len - len(prompts[i])))
            out.append(BenchRequest(tuple(int(t) for t in prompts[i]), olen))
            if len(out) == num_requests:
                break
    return out


def random_prompt(length: int, vocab_size: int, seed: int, exclude_ids: Sequence[int] = ()) -> list[int]:
    """One random prompt of token ids (used by the latency tests)."""
    return list(random_requests(1, length, 1, vocab_size=vocab_size, seed=seed,
                                exclude_ids=exclude_ids)[0].prompt_token_ids)
