"""Which constrained-decoding library the server uses: per-token mask cost on the real tokenizer.

Walks a valid JSON answer token by token through each library's matcher, timing the mask of allowed
tokens that the sampler needs at every step, and the one-off setup (tokenizer index, grammar
compile). Run from the repository root, with the candidates installed somewhere importable:

    pip install --no-deps --target /tmp/cand llguidance==1.9.1 outlines-core==0.2.14 \
        xgrammar==0.2.8 apache-tvm-ffi==0.1.15.post2
    PYTHONPATH=/tmp/cand python benchmarks/structured_output_masks.py

The result and the choice are written up in docs/architecture.md (Structured output).
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "role": {"enum": ["admin", "user", "guest"]},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string"}},
            "required": ["city", "zip"],
        },
    },
    "required": ["name", "age", "email", "tags", "role", "address"],
}
ANSWER = json.dumps(
    {
        "name": "Ada Lovelace",
        "age": 36,
        "email": "ada@example.com",
        "tags": ["mathematics", "engines", "poetry of science"],
        "role": "admin",
        "address": {"city": "London", "zip": "W1"},
    }
)


def summary(times: list[float]) -> str:
    ms = sorted(t * 1e3 for t in times)
    p99 = ms[min(len(ms) - 1, int(0.99 * len(ms)))]
    return f"mean {statistics.mean(ms):.3f} ms  p50 {statistics.median(ms):.3f} ms  p99 {p99:.3f} ms  max {ms[-1]:.3f} ms"


def bench_llguidance(tok, vocab: int, ids: list[int]) -> None:
    import llguidance
    import llguidance.hf

    t0 = time.perf_counter()
    lltok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    t1 = time.perf_counter()
    for name, grammar in (
        ("json_schema", llguidance.LLMatcher.grammar_from_json_schema(SCHEMA)),
        ("json_object", llguidance.LLMatcher.grammar_from_json_schema({"type": "object"})),
    ):
        t2 = time.perf_counter()
        matcher = llguidance.LLMatcher(lltok, grammar)
        t3 = time.perf_counter()
        mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
        times = []
        for t in ids:
            s = time.perf_counter()
            matcher.unsafe_compute_mask_ptr(mask.data_ptr(), mask.numel() * 4)
            times.append(time.perf_counter() - s)
            assert (int(mask[t // 32]) >> (t % 32)) & 1, "the answer's token was masked out"
            assert matcher.consume_token(t), matcher.get_error()
        print(f"llguidance   {name}: tokenizer {t1 - t0:.2f} s, compile {(t3 - t2) * 1e3:.1f} ms, mask {summary(times)}")


def bench_xgrammar(tok, vocab: int, ids: list[int]) -> None:
    import xgrammar as xgr

    t0 = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    t1 = time.perf_counter()
    for name, compile_ in (
        ("json_schema", lambda: compiler.compile_json_schema(json.dumps(SCHEMA), any_whitespace=True)),
        ("json_object", compiler.compile_builtin_json_grammar),
    ):
        t2 = time.perf_counter()
        matcher = xgr.GrammarMatcher(compile_())
        t3 = time.perf_counter()
        mask = xgr.allocate_token_bitmask(1, vocab)
        times = []
        for t in ids:
            s = time.perf_counter()
            matcher.fill_next_token_bitmask(mask)
            times.append(time.perf_counter() - s)
            assert (int(mask[0, t // 32]) >> (t % 32)) & 1, "the answer's token was masked out"
            assert matcher.accept_token(t)
        print(f"xgrammar     {name}: tokenizer {t1 - t0:.2f} s, compile {(t3 - t2) * 1e3:.1f} ms, mask {summary(times)}")


def bench_outlines_core(tok, vocab: int, ids: list[int]) -> None:
    from outlines_core import Guide, Index, Vocabulary
    from outlines_core.json_schema import build_regex_from_schema

    byte_of = {c: b for b, c in _byte_level_alphabet().items()}
    t0 = time.perf_counter()
    table: dict[bytes, list[int]] = {}
    eos = tok.eos_token_id
    for token, i in tok.get_vocab().items():
        if i != eos and i not in tok.all_special_ids:
            table.setdefault(bytes(byte_of[c] for c in token), []).append(i)
    vocabulary = Vocabulary(eos, table)
    t1 = time.perf_counter()
    # outlines-core takes a regex; a generic JSON object is not regular, so only json_schema is measured.
    t2 = time.perf_counter()
    index = Index(build_regex_from_schema(json.dumps(SCHEMA)), vocabulary)
    guide = Guide(index)
    t3 = time.perf_counter()
    mask = torch.zeros((vocab + 31) // 32, dtype=torch.int32)
    times = []
    for t in ids:
        s = time.perf_counter()
        guide.write_mask_into(mask.data_ptr(), mask.numel(), mask.element_size())
        times.append(time.perf_counter() - s)
        guide.advance(t)
    print(f"outlines-core json_schema: vocabulary {t1 - t0:.2f} s, compile {(t3 - t2) * 1e3:.1f} ms, mask {summary(times)}")


def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's byte-level BPE writes byte b as a printable character: itself when printable, else 256 + k."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return {b: chr(b) if b in printable else chr(next(extra)) for b in range(256)}


def main() -> None:
    torch.set_num_threads(1)
    from nimblelm.models.loader import load_model

    loaded = load_model(sys.argv[1] if len(sys.argv) > 1 else "smollm2-135m", progress=False)
    tok, vocab = loaded.tokenizer, loaded.config.vocab_size
    ids = tok.encode(ANSWER, add_special_tokens=False)
    print(f"tokenizer vocabulary {vocab}, answer of {len(ids)} tokens")
    for bench in (bench_llguidance, bench_xgrammar, bench_outlines_core):
        try:
            bench(tok, vocab, ids)
        except Exception as e:  # a candidate that is missing or fails is reported, the others still run
            print(f"{bench.__name__}: {type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
