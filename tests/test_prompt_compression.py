"""Prompt compression (nimblelm/prompting): each method on a tiny model against a slow reference of its rule,
scored by transformers on the same weights; kept text round-trips; budgets; errors."""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch

from nimblelm import LLM
from nimblelm.errors import InvalidRequestError
from nimblelm.prompting import PromptCompression, compress
from nimblelm.prompting.scorer import Scorer

PARAGRAPHS = [
    "The harbor town kept its lighthouse lit through every winter storm.",
    "Fishermen traded cod and herring at the market each morning before dawn.",
    "A railway reached the town in 1881, and tourists came with it.",
    "The old lighthouse keeper, Maren, wrote down the weather twice a day.",
]
PROMPT = "\n\n".join(PARAGRAPHS) + "\n\nQuestion: who kept the weather log?"


@pytest.fixture(scope="module")
def scorer(tiny_llama):
    return Scorer(llm=LLM(str(tiny_llama), dtype="float32", max_model_len=256))  # the oracle's precision


class OracleScorer:
    """The reference's scores: transformers' model on the same weights, one sequence at a time."""

    def __init__(self, model: str, window: int):
        from nimblelm.bench.backends import hf_model_from
        from nimblelm.models.loader import load_model

        lm = load_model(model)
        self.model = hf_model_from(lm.config, lm.weights, "float32")
        self.tokenizer = lm.tokenizer
        self.window = window

    def tokenize(self, text):
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [a for a, _ in enc["offset_mapping"]]

    def surprisal(self, context, tokens):
        ids = list(context) + list(tokens)
        with torch.inference_mode():
            logp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].double(), -1)
        return [math.inf if i == 0 else -logp[i - 1, ids[i]].item() for i in range(len(context), len(ids))]


@pytest.fixture(scope="module")
def oracle(tiny_llama):
    return OracleScorer(str(tiny_llama), 256)


def _owned(text, starts):
    bounds = [0, *starts[1:], len(text)]
    return [text[a:b] for a, b in itertools.pairwise(bounds)]


def reference_selective_context(text, rate, oracle):
    ids, starts = oracle.tokenize(text)
    s, owned = oracle.surprisal([], ids), _owned(text, starts)
    words = []
    for i, piece in enumerate(owned):
        if i == 0 or piece[:1].isspace():
            words.append([])
        words[-1].append(i)
    keep, budget = set(range(len(ids))), math.ceil(rate * len(ids))
    for word in sorted(words, key=lambda w: (sum(s[i] for i in w), w[0])):
        if len(keep) <= budget:
            break
        if all(math.isfinite(s[i]) for i in word):
            keep -= set(word)
    return "".join(owned[i] for i in sorted(keep))


def reference_shares(sizes, room, spread):
    """The paragraphs' kept shares, best ranked first: linear from mean + spread to mean - spread, each in
    [0, 1], keeping `room` tokens; found by halving the interval of the mean."""
    if not spread or len(sizes) < 2:
        return [1.0] * len(sizes)
    deltas = [spread - 2 * spread * j / (len(sizes) - 1) for j in range(len(sizes))]
    low, high = -1.0, 2.0
    for _ in range(50):
        mean = (low + high) / 2
        if sum(n * min(1.0, max(0.0, mean + d)) for n, d in zip(sizes, deltas)) < room:
            low = mean
        else:
            high = mean
    return [min(1.0, max(0.0, high + d)) for d in deltas]


def reference_llmlingua(text, rate, oracle, segment, question=None, coarse_factor=1.0, spread=None, reorder=None):
    """The compressed text, and the blank lines added between paragraphs that reordering brought together."""
    ids, starts = oracle.tokenize(text)
    owned = _owned(text, starts)
    budget = math.ceil(rate * len(ids))
    spread = (0.3 if question else 0.0) if spread is None else spread
    sort = (reorder or ("sort" if question else "original")) == "sort"
    # coarse: paragraphs (ending after blank lines) by their perplexity (or the question's, with LongLLMLingua's
    # restrictive statement, surprisal given them), kept up to coarse_factor x budget
    breaks = [m.end() for m in re.finditer(r"\n\s*\n", text)]
    paragraphs = [[]]
    for i in range(len(ids)):
        start = 0 if i == 0 else starts[i]
        if i and any(starts[i - 1] < b <= start for b in breaks):
            paragraphs.append([])
        paragraphs[-1].append(i)
    order, groups = list(range(len(ids))), [list(range(len(ids)))]
    if len(ids) > coarse_factor * budget or spread or sort:
        if question:
            q = oracle.tokenize(question + " We can get the answer to this question in the given documents.")[0]
            rank = [sum(oracle.surprisal([ids[i] for i in p], q)) / len(q) for p in paragraphs]
        else:
            rank = []
            for p in paragraphs:
                r = oracle.surprisal([], [ids[i] for i in p])
                rank.append(-sum(r[1:]) / max(1, len(r) - 1))
        ranked = sorted(range(len(paragraphs)), key=lambda j: (rank[j], j))
        groups = [paragraphs[j] for j in ranked]
        if len(ids) > coarse_factor * budget:
            groups, total = [], 0
            for j in ranked:
                if total + len(paragraphs[j]) <= coarse_factor * budget or total < budget:
                    groups.append(paragraphs[j])
                    total += len(paragraphs[j])
            order = sorted(i for g in groups for i in g)
        if sort:  # the kept paragraphs best ranked first
            order = [i for g in groups for i in g]
    if budget >= len(order):
        return _joined(order, owned, paragraphs)
    share = {}
    for g, s in zip(groups, reference_shares([len(g) for g in groups], budget, spread)):
        share.update(dict.fromkeys(g, s))
    q = oracle.tokenize(question)[0] if question else []
    out, seen, total = [], 0.0, sum(share.values())
    for a in range(0, len(order), segment):
        seg = order[a:a + segment]
        context = [ids[i] for i in out]
        plain = oracle.surprisal(context, [ids[i] for i in seg])
        if q:
            asked = oracle.surprisal(q + context, [ids[i] for i in seg])
            plain = [x - y if math.isfinite(x) else math.inf for x, y in zip(plain, asked)]
        seen += sum(share[i] for i in seg)
        k = round(budget * seen / total) - len(out)
        # tokens of one share compete by score; the shares take turns, the r-th best of n at share s at (r + 1/2) / ns
        turn = {}
        for s in {share[i] for i in seg}:
            members = sorted((j for j in range(len(seg)) if share[seg[j]] == s), key=lambda j: (-plain[j], j))
            turn.update({j: (r + 0.5) / (len(members) * s) if s else math.inf for r, j in enumerate(members)})
        best = sorted(range(len(seg)), key=lambda j: (turn[j], j))[:max(0, k)]
        out += [seg[j] for j in sorted(best)]
    return _joined(out, owned, paragraphs)


def _joined(order, owned, paragraphs):
    """The tokens' text; out of the prompt's order, each paragraph's kept text is followed by a blank line where
    it lacks one and another comes after it."""
    if order == sorted(order):
        return "".join(owned[i] for i in order), 0
    of = {i: k for k, p in enumerate(paragraphs) for i in p}
    pieces = ["".join(owned[i] for i in g) for _, g in itertools.groupby(order, key=of.get)]
    text, added = pieces[0], 0
    for piece in pieces[1:]:
        if not re.search(r"\n\s*\n\s*$", text):
            text, added = text + "\n\n", added + 1
        text += piece
    return text, added


@pytest.mark.parametrize("rate", [0.3, 0.5, 0.8])
def test_selective_context_matches_the_reference(scorer, oracle, rate):
    got = compress(PROMPT, PromptCompression(method="selective_context", rate=rate), scorer)
    assert got.text == reference_selective_context(PROMPT, rate, oracle)
    assert got.compressed_tokens <= math.ceil(rate * got.original_tokens)


@pytest.mark.parametrize("rate, segment, coarse", [(0.5, 16, 1.0), (0.3, 7, 2.0), (0.2, 100, 1.0), (0.5, 9, 2.0)])
def test_llmlingua_matches_the_reference(scorer, oracle, rate, segment, coarse):
    config = PromptCompression(method="llmlingua", rate=rate, segment_tokens=segment, coarse_factor=coarse)
    got = compress(PROMPT, config, scorer)
    assert (got.text, 0) == reference_llmlingua(PROMPT, rate, oracle, segment, coarse_factor=coarse)
    assert got.compressed_tokens == math.ceil(rate * got.original_tokens) or rate == 0.2


@pytest.mark.parametrize("rate, coarse, spread, reorder", [
    (0.5, 1.0, None, None), (0.25, 1.0, None, None), (0.5, 2.0, None, None), (0.3, 2.0, 0.0, None),
    (0.4, 2.0, 1.0, None), (0.5, 1.0, None, "original"), (0.3, 2.0, 0.0, "original"), (1.0, 1.0, 0.0, None)])
def test_longllmlingua_matches_the_reference(scorer, oracle, rate, coarse, spread, reorder):
    question = "who kept the weather log?"
    config = PromptCompression(method="longllmlingua", rate=rate, segment_tokens=12, question=question,
                               coarse_factor=coarse, dynamic_ratio=spread, reorder=reorder)
    got = compress(PROMPT, config, scorer)
    text, added = reference_llmlingua(PROMPT, rate, oracle, 12, question=question, coarse_factor=coarse,
                                      spread=spread, reorder=reorder)
    assert got.text == text
    assert got.compressed_tokens == math.ceil(rate * got.original_tokens) + added * len(scorer.tokenize("\n\n")[0])


@pytest.mark.parametrize("rate, coarse", [(0.5, 1.0), (0.3, 2.0), (1.0, 1.0)])
def test_llmlingua_sorted_matches_the_reference(scorer, oracle, rate, coarse):
    config = PromptCompression(method="llmlingua", rate=rate, segment_tokens=9, coarse_factor=coarse, reorder="sort")
    got = compress(PROMPT, config, scorer)
    text, added = reference_llmlingua(PROMPT, rate, oracle, 9, coarse_factor=coarse, reorder="sort")
    assert got.text == text
    assert got.compressed_tokens == math.ceil(rate * got.original_tokens) + added * len(scorer.tokenize("\n\n")[0])


def test_sorting_moves_whole_paragraphs_and_leaves_kept_ones_in_place(scorer):
    """At rate 1 nothing is pruned: the text is the documents in rank order, each intact, with the instruction
    and question (kept verbatim, their own paragraphs) where they were."""
    instruction, question = "Answer from the documents below.", "Question: who kept the weather log?"
    prompt = "\n\n".join([instruction, *PARAGRAPHS, question])
    config = PromptCompression(method="longllmlingua", rate=1.0, question="who kept the weather log?",
                               keep=(instruction, question))
    got = compress(prompt, config, scorer)
    parts = got.text.split("\n\n")
    assert parts[0] == instruction and parts[-1] == question
    assert sorted(parts[1:-1]) == sorted(PARAGRAPHS) and parts[1:-1] != PARAGRAPHS  # the tiny model ranks 1, 4, 2, 3
    plain = compress(prompt, PromptCompression(**{**config.__dict__, "reorder": "original"}), scorer)
    assert plain.text == prompt


@pytest.mark.parametrize("sizes, room, spread", [([10, 10, 10], 15, 0.3), ([4, 50, 7, 20], 30, 0.3),
                                                 ([5, 5], 9, 0.5), ([8, 3, 30], 12, 1.0), ([6, 6], 6, 0.0)])
def test_kept_shares_fall_with_rank_and_keep_the_room(sizes, room, spread):
    from nimblelm.prompting.compression import _shares

    groups, start = [], 0
    for n in sizes:
        groups.append(list(range(start, start + n)))
        start += n
    share = _shares(groups, room, spread)
    per_group = [share[g[0]] for g in groups]
    assert all(share[i] == s for g, s in zip(groups, per_group) for i in g)
    assert all(0 <= s <= 1 for s in per_group) and per_group == sorted(per_group, reverse=True)
    assert sum(share.values()) == pytest.approx(room if spread else start, abs=1e-6)
    unclamped = [s for s in per_group if 0 < s < 1]
    if spread and len(unclamped) > 1:  # linear in rank where no bound is hit: the first mean + spread
        step = 2 * spread / (len(groups) - 1)
        assert all(a - b == pytest.approx(step) for a, b in itertools.pairwise(per_group) if 0 < b and a < 1)


def test_a_segments_tokens_are_kept_by_their_shares_then_their_scores():
    """A segment keeping 5 of 3 tokens at share 1 and 10 at share 0.2 keeps 3 and 2 (their shares' 3 and 2), each
    class its best scored; a class at share 0 only once the others are spent."""
    from nimblelm.prompting.compression import _top, _turns

    scores = [float(x) for x in (5, 1, 3, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 4, 2)]
    shares = [1.0] * 3 + [0.2] * 10 + [0.0] * 2
    free = list(range(15))
    assert _top(_turns(free, scores, shares), 5) == [0, 1, 2, 3, 4]
    assert _top(_turns(free, scores, shares), 4) == [0, 2, 3, 4]
    assert _top(_turns(free, scores, shares), 14) == [*range(13), 13]
    one = _turns(free[3:13], scores, shares[3:13])  # one share: the best scores
    assert _top(one, 3) == [3, 4, 5]


def test_the_coarse_stage_keeps_whole_paragraphs(scorer):
    """At a budget whose double holds some paragraphs but not all, the coarse stage keeps whole ones."""
    from nimblelm.prompting.compression import _coarse, _Prompt

    ids, starts = scorer.tokenize(PROMPT)
    p = _Prompt(PROMPT, ids, starts, ())
    kept = set(_coarse(p, PromptCompression(rate=0.2, coarse_factor=2.0), scorer, budget=math.ceil(0.2 * len(p)))[0])
    paragraphs = {}
    for i in range(len(p)):
        paragraphs.setdefault(p.paragraph[i], set()).add(i)
    assert len(paragraphs) == 5
    whole = [j for j, tokens in paragraphs.items() if tokens <= kept]
    assert 1 <= len(whole) < 5 and kept == set().union(*(paragraphs[j] for j in whole))
    assert len(kept) <= 2 * math.ceil(0.2 * len(p))


def test_the_coarse_stage_keeps_at_least_the_budget(scorer):
    """A short paragraph and a long one that does not fit under twice the budget: whichever ranks first, the
    kept paragraphs hold the budget, so the prompt is compressed to it and not past it."""
    text = "Zebra quartz fjord, vexing plumb jackdaws.\n\n" + " ".join(
        f"The weather log for day {i} says it rained in the morning and cleared by noon." for i in range(14))
    out = compress(text, PromptCompression(method="llmlingua", rate=0.3), scorer)
    assert out.compressed_tokens == math.ceil(0.3 * out.original_tokens)


@pytest.mark.parametrize("method", ["selective_context", "llmlingua", "longllmlingua"])
def test_rate_one_gives_the_prompt_back_and_kept_spans_survive(scorer, method):
    question = "who kept the weather log?"  # in the prompt's order (longllmlingua would sort its paragraphs)
    whole = compress(PROMPT, PromptCompression(method=method, rate=1.0, question=question, reorder="original"), scorer)
    assert whole.text == PROMPT and whole.ratio == 1.0
    keep = ("Question: who kept the weather log?", "in 1881")
    got = compress(PROMPT, PromptCompression(method=method, rate=0.3, keep=keep, question=question,
                                             segment_tokens=10, reorder="original"), scorer)
    assert all(k in got.text for k in keep)
    assert got.compressed_tokens < whole.compressed_tokens
    # what is kept is the prompt's own text: a subsequence of its characters
    it = iter(PROMPT)
    assert all(c in it for c in got.text)


def test_target_tokens_and_an_empty_prompt(scorer):
    # 10 tokens hold no paragraph: the first ranked one stays, and token pruning cuts it to 10
    got = compress(PROMPT, PromptCompression(method="llmlingua", rate=None, target_tokens=10), scorer)
    assert got.compressed_tokens == 10 and got.text.strip()
    empty = compress("", PromptCompression(), scorer)
    assert empty.text == "" and empty.original_tokens == 0


@pytest.mark.parametrize("options, message", [
    ({"method": "gist"}, "is not one of selective_context, llmlingua, longllmlingua"),
    ({"rate": 0}, "rate must be in (0, 1]"),
    ({"rate": 1.5}, "rate must be in (0, 1]"),
    ({"target_tokens": 0}, "target_tokens must be >= 1"),
    ({"unit": "phrase"}, "unit 'phrase' is not one of token, word, sentence"),
    ({"dynamic_ratio": 1.5}, "dynamic_ratio must be in [0, 1], got 1.5"),
    ({"method": "longllmlingua"}, "needs the question"),
    ({"reorder": "reverse"}, "reorder 'reverse' is not one of original, sort"),
    ({"method": "selective_context", "reorder": "sort"}, "needs a method that ranks paragraphs"),
])
def test_impossible_options_are_one_clear_error(options, message):
    with pytest.raises(InvalidRequestError, match=re.escape(message)):
        PromptCompression(**options)


def test_generate_compresses_text_prompts_with_the_engine_as_its_own_scorer(tiny_llama):
    from nimblelm import SamplingParams

    llm = LLM(str(tiny_llama), dtype="float32", max_model_len=256)
    config = PromptCompression(method="selective_context", rate=0.5, scorer=str(tiny_llama))
    out = llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0), use_tqdm=False, prompt_compression=config)[0]
    c = out.prompt_compression
    assert c.original_tokens > c.compressed_tokens and out.prompt == c.text
    assert out.prompt_token_ids == llm.tokenizer.encode(c.text)
    assert llm._scorers[str(tiny_llama)].llm is llm
    with pytest.raises(InvalidRequestError, match="needs text prompts"):
        llm.generate([[1, 2, 3]], prompt_compression=config)


def test_compress_prompt_prints_the_prompt_and_its_statistics(tiny_llama, tmp_path, capsys):
    from nimblelm.cli import main

    path = tmp_path / "prompt.txt"
    path.write_text(PROMPT)
    assert main(["compress-prompt", "--file", str(path), "--scorer", str(tiny_llama), "--scorer-window", "256",
                 "--rate", "0.5", "--keep", "Question:", "--threads", "1"]) == 0
    out, err = capsys.readouterr()
    assert "Question:" in out and len(out) < len(PROMPT)
    assert err.startswith("prompt compression (llmlingua): ") and " scorer tokens (" in err


@pytest.mark.parametrize("argv, message", [
    (["--rate", "2", "x"], "rate must be in (0, 1]"),
    (["--file", "/no/such/file"], "cannot read --file /no/such/file"),
    ([], "give the prompt or --file PATH"),
    (["--method", "longllmlingua", "x"], "needs the question"),
    (["--dynamic-ratio", "-0.1", "x"], "dynamic_ratio must be in [0, 1]"),
    (["--coarse-factor", "0.5", "x"], "coarse_factor >= 1"),
    (["--method", "selective_context", "--reorder", "sort", "x"], "needs a method that ranks paragraphs"),
])
def test_compress_prompt_errors_are_one_line(argv, message, capsys):
    from nimblelm.cli import main

    assert main(["compress-prompt", *argv]) == 1
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_generate_with_prompt_compression_says_what_it_kept(tiny_llama, capsys):
    from nimblelm.cli import main

    config = f'{{"method": "selective_context", "rate": 0.4, "scorer": "{tiny_llama}", "keep": "Question:"}}'
    assert main(["generate", "--model", str(tiny_llama), "--max-model-len", "256", "--max-tokens", "3",
                 "--threads", "1", "--prompt-compression", config, PROMPT]) == 0
    assert "prompt compression (selective_context): " in capsys.readouterr().err
    assert main(["generate", "--model", str(tiny_llama), "--prompt-compression", '{"ratio": 2}', "x"]) == 1
    assert "unknown prompt compression field(s): ratio" in capsys.readouterr().err


def test_the_server_compresses_prompts_asked_to_and_says_so_in_usage(tiny_server, tiny_qwen, tiny_llm):
    """`prompt_compression` through the openai client's extra_body: the answer is the engine's answer to
    the prompt compressed as compress() compresses it with the same scorer."""
    import openai

    from nimblelm import SamplingParams

    client = openai.OpenAI(base_url=tiny_server.base_url, api_key="unused", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    prompt = PARAGRAPHS[0] + " " + PARAGRAPHS[1]
    options = {"method": "selective_context", "rate": 0.5}
    got = client.completions.create(model=model, prompt=prompt, max_tokens=6, temperature=0,
                                    extra_body={"prompt_compression": options})
    short = compress(prompt, PromptCompression(**options), Scorer(str(tiny_qwen), max_model_len=128)).text
    expected = tiny_llm.generate(short, SamplingParams(temperature=0, max_tokens=6), use_tqdm=False)[0]
    assert got.choices[0].text == expected.outputs[0].text
    assert got.usage.prompt_tokens == len(expected.prompt_token_ids)
    assert got.usage.prompt_tokens_before_compression == len(tiny_llm.tokenizer.encode(prompt))
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": prompt}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=4, temperature=0,
                                          extra_body={"prompt_compression": options})
    assert chat.usage.prompt_tokens < chat.usage.prompt_tokens_before_compression
    plain = client.completions.create(model=model, prompt=prompt, max_tokens=1)
    assert "prompt_tokens_before_compression" not in plain.usage.model_dump(exclude_unset=True)


@pytest.mark.parametrize("body, message", [
    ({"prompt": "x y z", "prompt_compression": {"method": "gist"}}, "is not one of"),
    ({"prompt": "x y z", "prompt_compression": {"rate": 3}}, "rate must be in (0, 1]"),
    ({"prompt": [1, 2, 3], "prompt_compression": {}}, "needs text prompts"),
    ({"prompt": "x y z", "prompt_compression": {"method": "longllmlingua"}}, "needs the question"),
    ({"prompt": "x y z", "prompt_compression": {"dynamic_ratio": 2}}, "dynamic_ratio must be in [0, 1]"),
    ({"prompt": "x y z", "prompt_compression": {"reorder": "reverse"}}, "reorder 'reverse' is not one of"),
])
def test_the_servers_prompt_compression_errors_are_clear_400s(tiny_server, body, message):
    import httpx2 as httpx

    r = httpx.post(f"{tiny_server.base_url}/completions", json={"max_tokens": 2, **body}, timeout=60)
    assert r.status_code == 400 and message in r.json()["error"]["message"]
