"""Benchmark workloads: requests sampled from ShareGPT and HumanEval (read by nimblelm/corpora.py), random
token ids, random token ids behind one shared prefix, ShareGPT questions behind one shared system prompt,
ShareGPT conversations replayed turn by turn, ShareGPT questions alone as chat prompts, held-out two-turn
chats in the style of MT-bench, and an editing workload built from HumanEval (the speculative-decoding
survey's).

The last five are chat workloads: their prompts are the model's chat template rendered here and tokenized
once, so every backend gets the very same token ids (what a chat endpoint would have rendered).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from nimblelm.errors import InvalidRequestError


@dataclass(frozen=True)
class BenchRequest:
    """One request of a throughput workload: the exact prompt token ids and the output length to force."""

    prompt_token_ids: tuple[int, ...]
    output_len: int
    #: requests with the same conversation are the turns of one chat, in order: each is sent only after the
    #: one before it finished (None: an independent request)
    conversation: int | None = None

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
    out: list[BenchRequest] = []
    for _, p, olen in _filtered_pairs(pairs, tokenizer, seed, max_output_len, min_len, max_prompt_len,
                                      max_total_len):
        out.append(BenchRequest(tuple(p), olen))
        if len(out) == num_requests:
            return out
    raise InvalidRequestError(
        f"only {len(out)} ShareGPT pairs pass the filter, fewer than the {num_requests} requested")


def _filtered_pairs(pairs: Sequence[tuple[str, str]], tokenizer, seed: int, max_output_len: int | None,
                    min_len: int, max_prompt_len: int, max_total_len: int) -> Iterator[tuple[int, list[int], int]]:
    """(pair index, prompt ids, output length) of the pairs that pass the filter, in the seed's order."""
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    batch = 256
    for start in range(0, len(order), batch):
        idx = order[start:start + batch]
        p_ids = _encode(tokenizer, [pairs[i][0] for i in idx])
        c_ids = _encode(tokenizer, [pairs[i][1] for i in idx])
        for i, p, c in zip(idx, p_ids, c_ids):
            if keep_pair(len(p), len(c), min_len=min_len, max_prompt_len=max_prompt_len,
                         max_total_len=max_total_len):
                yield i, [int(t) for t in p], len(c) if max_output_len is None else min(len(c), max_output_len)


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


# ----------------------------------------------------------------------------------- chat workloads


def chat_text(tokenizer, messages: list[dict]) -> str:
    """The model's chat template over messages, ending with the assistant's generation prompt."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("this workload renders chat prompts, and the model's tokenizer has no chat "
                                  "template: use --dataset sharegpt, prefix or random")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _chat_ids(tokenizer, text: str) -> list[int]:
    # The template wrote the special tokens itself: encoding must not add a second BOS.
    return [int(t) for t in _encode(tokenizer, [text])[0]]


def shared_prefix_text(texts: Sequence[str], tokenizer, prefix_len: int, seed: int) -> str:
    """A system prompt of about prefix_len tokens: texts in a seeded order, each followed by a blank line,
    until there are prefix_len tokens, cut there and decoded (so it is exactly reproducible, and its own
    token count can move by a few tokens once re-encoded inside a prompt)."""
    if prefix_len <= 0:
        raise InvalidRequestError(f"--prefix-len must be > 0, got {prefix_len}")
    order = list(range(len(texts)))
    random.Random(f"shared-prefix {seed}").shuffle(order)  # not the questions' order: other texts first
    ids: list[int] = []
    for i in order:
        ids += _encode(tokenizer, [texts[i] + "\n\n"])[0]
        if len(ids) >= prefix_len:
            return tokenizer.decode(ids[:prefix_len])
    raise InvalidRequestError(f"the texts hold {len(ids)} tokens, fewer than --prefix-len {prefix_len}")


def shared_prefix_requests(pairs: Sequence[tuple[str, str]], tokenizer, num_requests: int, *, prefix_len: int = 1000,
                           seed: int = 0, prefix_seed: int | None = None, max_output_len: int | None = None,
                           max_total_len: int = 2048) -> list[BenchRequest]:
    """ShareGPT questions behind one shared system prompt (what prefix caching is for).

    The system prompt is shared_prefix_text of the pairs' model turns, drawn with prefix_seed (default:
    seed); the questions and output lengths are sample_sharegpt's (same filter, same seed order), each
    rendered with the chat template as [system, question], and kept while the prompt plus its output fit
    max_total_len. Every prompt starts with the same tokens up to the system turn's end (a special token
    ends it, so its tokenization cannot differ).
    """
    if num_requests <= 0:
        raise InvalidRequestError(f"number of prompts must be > 0, got {num_requests}")
    system = shared_prefix_text([c for _, c in pairs], tokenizer, prefix_len, seed if prefix_seed is None else prefix_seed)
    out: list[BenchRequest] = []
    for i, _, olen in _filtered_pairs(pairs, tokenizer, seed, max_output_len, 4, 1024, max_total_len):
        ids = _chat_ids(tokenizer, chat_text(tokenizer, [{"role": "system", "content": system},
                                                         {"role": "user", "content": pairs[i][0]}]))
        if len(ids) + olen <= max_total_len:
            out.append(BenchRequest(tuple(ids), olen))
            if len(out) == num_requests:
                return out
    raise InvalidRequestError(f"only {len(out)} ShareGPT questions fit {max_total_len} tokens behind the "
                              f"{prefix_len}-token system prompt, fewer than the {num_requests} requested")


def multiturn_requests(dialogues: Sequence[Sequence[tuple[str, str]]], tokenizer, num_conversations: int, *,
                       seed: int = 0, max_turns: int = 8, max_output_len: int | None = None, min_len: int = 4,
                       max_total_len: int = 2048) -> list[BenchRequest]:
    """ShareGPT conversations replayed turn by turn: num_conversations of them, in a seeded order.

    Turn k's prompt is the chat template over the first k human turns and the dataset's own replies
    between them (so every backend gets the same text, whatever it generated), ending with the generation
    prompt; its output length is the dataset's reply to it, capped at max_output_len. Each prompt is the
    one before it plus that reply and the new human turn, token for token (the new text is tokenized on
    its own and appended). A conversation stops before its (max_turns+1)-th turn, a reply under min_len
    tokens, or a turn whose prompt plus output would pass max_total_len; one left with fewer than two turns
    is skipped, since a single turn has no earlier turn to find in a cache.
    """
    if num_conversations <= 0:
        raise InvalidRequestError(f"number of conversations must be > 0, got {num_conversations}")
    if max_turns < 2:
        raise InvalidRequestError(f"--max-turns must be >= 2, got {max_turns}")
    order = list(range(len(dialogues)))
    random.Random(seed).shuffle(order)
    out: list[BenchRequest] = []
    conversations = 0
    for d in order:
        turns: list[BenchRequest] = []
        messages: list[dict] = []
        text, ids = "", []
        for human, reply in dialogues[d][:max_turns]:
            messages.append({"role": "user", "content": human})
            longer = chat_text(tokenizer, messages)
            if not longer.startswith(text):
                raise InvalidRequestError("the chat template rewrites earlier turns when one is added, so a "
                                          "conversation cannot be replayed as growing prompts")
            ids = ids + _chat_ids(tokenizer, longer[len(text):])
            reply_len = len(_encode(tokenizer, [reply])[0])
            olen = reply_len if max_output_len is None else min(reply_len, max_output_len)
            if reply_len < min_len or len(ids) + olen > max_total_len:
                break
            turns.append(BenchRequest(tuple(ids), olen, conversation=conversations))
            messages.append({"role": "assistant", "content": reply})
            text = longer
        if len(turns) >= 2:
            out += turns
            conversations += 1
            if conversations == num_conversations:
                return out
    raise InvalidRequestError(f"only {conversations} ShareGPT conversations keep two turns within "
                              f"{max_total_len} tokens, fewer than the {num_conversations} requested")


def chat_requests(pairs: Sequence[tuple[str, str]], tokenizer, num_requests: int, *, seed: int = 0,
                  max_output_len: int = 128, max_total_len: int = 2048) -> list[BenchRequest]:
    """ShareGPT first questions as chat prompts (the model's template, generation prompt on), in
    sample_sharegpt's seeded order and filter; each request may generate up to max_output_len tokens (its
    own answer, which may end sooner), where it fits max_total_len."""
    if num_requests <= 0:
        raise InvalidRequestError(f"number of prompts must be > 0, got {num_requests}")
    out: list[BenchRequest] = []
    for i, _, _ in _filtered_pairs(pairs, tokenizer, seed, None, 4, 1024, max_total_len):
        ids = _chat_ids(tokenizer, chat_text(tokenizer, [{"role": "user", "content": pairs[i][0]}]))
        if len(ids) + max_output_len <= max_total_len:
            out.append(BenchRequest(tuple(ids), max_output_len))
            if len(out) == num_requests:
                return out
    raise InvalidRequestError(f"only {len(out)} ShareGPT questions fit {max_total_len} tokens with "
                              f"{max_output_len} to generate, fewer than the {num_requests} requested")


def mt_requests(tokenizer, num_requests: int, answer: Callable[[list[list[int]]], list[str]], *, seed: int = 0,
                max_output_len: int = 128) -> list[BenchRequest]:
    """Held-out two-turn chats (mt_questions): each conversation's first question, then its follow-up after
    the model's own answer to the first (answer: first-turn prompts' ids -> the answers' texts, as
    MT-bench's second turn is), num_requests prompts in all, turn by turn."""
    from nimblelm.bench import mt_questions

    if num_requests <= 0:
        raise InvalidRequestError(f"number of prompts must be > 0, got {num_requests}")
    chats = mt_questions.conversations(-(-num_requests // 2), seed)
    firsts = [_chat_ids(tokenizer, chat_text(tokenizer, [{"role": "user", "content": q}])) for _, q, _ in chats]
    out = []
    for (_, question, follow_up), first, reply in zip(chats, firsts, answer(firsts)):
        second = chat_text(tokenizer, [{"role": "user", "content": question}, {"role": "assistant", "content": reply},
                                       {"role": "user", "content": follow_up}])
        out += [BenchRequest(tuple(first), max_output_len), BenchRequest(tuple(_chat_ids(tokenizer, second)),
                                                                          max_output_len)]
    return out[:num_requests]


EDIT_INSTRUCTION = ("Add type hints to every argument and to the return value of this Python function. Change "
                    "nothing else, and reply with the whole function in one code block.")


def _without_type_hints(source: str) -> str:
    """The code with its annotations removed (ast round trip, so the layout is ast.unparse's)."""
    import ast

    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            node.returns = None
            args = node.args
            for arg in [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]:
                if arg is not None:
                    arg.annotation = None
    return ast.unparse(tree)


def edit_requests(problems: Sequence[dict], tokenizer, num_requests: int, *, seed: int = 0,
                  max_output_len: int = 256, max_total_len: int = 2048) -> list[BenchRequest]:
    """An editing workload, where the answer mostly repeats the prompt (what prompt lookup is for): HumanEval
    solutions with their type hints removed, and the chat request to add them back (EDIT_INSTRUCTION). A
    seeded order of the problems; each request may generate up to max_output_len tokens."""
    if num_requests <= 0:
        raise InvalidRequestError(f"number of prompts must be > 0, got {num_requests}")
    order = list(range(len(problems)))
    random.Random(seed).shuffle(order)
    out: list[BenchRequest] = []
    for i in order:
        code = _without_type_hints(problems[i]["prompt"] + (problems[i].get("canonical_solution") or ""))
        text = chat_text(tokenizer, [{"role": "user", "content": f"{EDIT_INSTRUCTION}\n\n```python\n{code}\n```"}])
        ids = _chat_ids(tokenizer, text)
        if len(ids) + max_output_len <= max_total_len:
            out.append(BenchRequest(tuple(ids), max_output_len))
            if len(out) == num_requests:
                return out
    raise InvalidRequestError(f"only {len(out)} HumanEval problems fit {max_total_len} tokens with "
                              f"{max_output_len} to generate, fewer than the {num_requests} requested")


def chains(requests: Sequence[BenchRequest]) -> list[list[int]]:
    """The order constraint of a workload: lists of request indices, each list sent one after another
    (a conversation's turns, in order); an independent request is a list of its own. Lists are ordered
    by their first request."""
    out: list[list[int]] = []
    by_conversation: dict[int, list[int]] = {}
    for i, r in enumerate(requests):
        if r.conversation is None:
            out.append([i])
        elif r.conversation in by_conversation:
            by_conversation[r.conversation].append(i)
        else:
            by_conversation[r.conversation] = [i]
            out.append(by_conversation[r.conversation])
    return out


def common_prefix_len(requests: Sequence[BenchRequest]) -> int:
    """How many leading prompt tokens every request shares."""
    first = requests[0].prompt_token_ids
    n = len(first)
    for r in requests[1:]:
        ids = r.prompt_token_ids
        n = min(n, len(ids))
        n = next((k for k in range(n) if ids[k] != first[k]), n)
    return n


def random_prompt(length: int, vocab_size: int, seed: int, exclude_ids: Sequence[int] = ()) -> list[int]:
    """One random prompt of token ids (used by the latency tests)."""
    return list(random_requests(1, length, 1, vocab_size=vocab_size, seed=seed,
                                exclude_ids=exclude_ids)[0].prompt_token_ids)
