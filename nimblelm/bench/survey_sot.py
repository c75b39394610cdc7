"""The Skeleton-of-Thought part of `nimblelm bench survey data`: SoT against plain decoding of the same
questions on the same engine, and a judge model's pairwise verdict.

Batch 1: each question alone, plain decoding and SoT in turn (the first of the two rotating: the machine's
speed drifts), the engine's prefix cache emptied before each, so SoT's shared question-and-skeleton prefix is
the only cache it finds. Under load: every question at once, plain decoding's batch against SoT's (its stages
batched across the questions). The judge, the largest packaged model by default, reads each routed question's
two answers in both orders and says which is better or calls a tie. Small judges pick the answer shown first
whatever it says, so the verdict that counts is position-balanced: the judge's probability of naming SoT's
answer in its first token (A against B), averaged over the two orders, where a bias toward either position
cancels.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence

JUDGE_VERDICTS = ("sot", "plain", "tie", "unclear")
JUDGE_TOP = 20  # top alternatives read at the reply's first token
TIE = 0.05  # a balanced preference within this of 0.5 is a tie


def _judge_prompt(tokenizer, question: str, first: str, second: str) -> list[int]:
    from nimblelm.bench.datasets import chat_text

    text = (f"Compare two answers to a question.\n\nQuestion: {question}\n\nAnswer A:\n{first}\n\nAnswer B:\n"
            f"{second}\n\nWhich answer is more helpful, relevant, accurate and detailed? Reply with one word: "
            "A, B, or tie.")
    return tokenizer.encode(chat_text(tokenizer, [{"role": "user", "content": text}]), add_special_tokens=False)


def verdict(reply: str) -> str:
    """'A', 'B' or 'tie' from the judge's reply; 'unclear' for anything else."""
    word = reply.strip().strip(".*:\"'").lower()
    if word.startswith("tie"):
        return "tie"
    if word[:1] in ("a", "b") and (len(word) == 1 or not word[1].isalpha()):
        return word[0].upper()
    for name in ("answer a", "answer b"):
        if word.startswith(name):
            return name[-1].upper()
    return "unclear"


def _plain(llm, questions: Sequence[str], params) -> list:
    from nimblelm.prompting.skeleton import plain_prompt

    return llm.generate([plain_prompt(llm.tokenizer, q) for q in questions], params, use_tqdm=False)


def run_survey_sot(llm, judge, questions: Sequence[tuple[str, str]], *, max_tokens: int, router: str = "rule",
                   logger: Callable[[str], None] = lambda m: None) -> dict:
    from nimblelm import SamplingParams
    from nimblelm.prompting import skeleton

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    texts = [q for _, q in questions]
    rows = []
    for i, (category, question) in enumerate(questions):
        runs = {}
        for mode in (("plain", "sot") if i % 2 == 0 else ("sot", "plain")):
            llm.reset_prefix_cache()
            start = time.perf_counter()
            out = (_plain(llm, [question], params) if mode == "plain"
                   else skeleton.generate(llm, [question], params, router))[0]
            runs[mode] = (out, time.perf_counter() - start)
        sot = runs["sot"][0]
        rows.append({"category": category, "question": question, "routed": sot.skeleton.routed,
                     "points": len(sot.skeleton.points), "plain_s": runs["plain"][1], "sot_s": runs["sot"][1],
                     "skeleton_s": sot.skeleton.skeleton_seconds, "expansion_s": sot.skeleton.expansion_seconds,
                     "plain_text": runs["plain"][0].outputs[0].text, "sot_text": sot.outputs[0].text})
        logger(f"sot {category}: routed {sot.skeleton.routed}, plain {runs['plain'][1]:.1f} s, "
               f"SoT {runs['sot'][1]:.1f} s")
    load = {}
    for mode in ("plain", "sot"):
        llm.reset_prefix_cache()
        start = time.perf_counter()
        outs = _plain(llm, texts, params) if mode == "plain" else skeleton.generate(llm, texts, params, router)
        load[mode] = {"seconds": time.perf_counter() - start,
                      "output_tokens": sum(len(o.outputs[0].token_ids) for o in outs)}
    for r in rows:
        r["verdicts"], r["preference"] = judge_answers(judge, r) if r["routed"] else ([], None)
    return {"questions": rows, "load": load, "router": router, "max_tokens": max_tokens}


def first_choice_share(top: dict, a: int, b: int) -> float | None:
    """P(A) / (P(A) + P(B)) at the reply's first token from its top alternatives (token id -> Logprob); None
    when neither label is among them."""
    pa, pb = (math.exp(top[t].logprob) if t in top else 0.0 for t in (a, b))
    return pa / (pa + pb) if pa + pb > 0 else None


def judge_answers(judge, row: dict) -> tuple[list[str], float | None]:
    """The judge's verdicts with SoT's answer first, then second, as 'sot', 'plain', 'tie' or 'unclear'; and
    its position-balanced preference for SoT's answer (0..1; None where a label is not one token or the judge
    named neither)."""
    from nimblelm import SamplingParams

    tok = judge.tokenizer
    q, sot, plain = row["question"], row["sot_text"], row["plain_text"]
    prompts = [{"prompt_token_ids": _judge_prompt(tok, q, sot, plain)},
               {"prompt_token_ids": _judge_prompt(tok, q, plain, sot)}]
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=JUDGE_TOP)
    outs = judge.generate(prompts, params, use_tqdm=False)
    named = [{"A": "sot", "B": "plain"}, {"A": "plain", "B": "sot"}]
    verdicts = [names.get(v, v) for names, v in zip(named, (verdict(o.outputs[0].text) for o in outs))]
    labels = [tok.encode(label, add_special_tokens=False) for label in ("A", "B")]
    if any(len(ids) != 1 for ids in labels):
        return verdicts, None
    shares = [first_choice_share(o.outputs[0].logprobs[0], labels[0][0], labels[1][0]) for o in outs]
    # SoT's answer is A in the first order and B in the second.
    return verdicts, None if None in shares else (shares[0] + 1 - shares[1]) / 2


def balanced(preference: float) -> str:
    """A question's position-balanced verdict: 'sot', 'plain' or 'tie' (within TIE of even)."""
    return "tie" if abs(preference - 0.5) <= TIE else "sot" if preference > 0.5 else "plain"


def agreed(verdicts: list[str]) -> str:
    """A question's verdict once the order is taken out (verdicts: SoT's answer shown first, then plain's):
    'sot' or 'plain' when both orders say so, 'tie' when both call one, else 'split' (the order decided)."""
    first, second = verdicts
    return first if first == second and first in ("sot", "plain", "tie") else "split"


def summarize_sot(sot: dict) -> dict:
    rows = sot["questions"]
    routed = [r for r in rows if r["routed"]]
    verdicts = [v for r in routed for v in r["verdicts"]]
    # The judge picked the answer it was shown first: SoT's in the first order, plain's in the second.
    decisive = [v for r in routed for v in r["verdicts"] if v in ("sot", "plain")]
    first_picked = sum((r["verdicts"][0] == "sot") + (r["verdicts"][1] == "plain") for r in routed)
    by_question = [agreed(r["verdicts"]) for r in routed]
    preferences = [r["preference"] for r in routed if r.get("preference") is not None]
    by_preference = [balanced(p) for p in preferences]

    def speedup(rs):
        return sum(r["plain_s"] for r in rs) / sum(r["sot_s"] for r in rs) if rs else None

    def words(rs, key):
        return statistics.fmean(len(r[key].split()) for r in rs) if rs else None

    return {"questions": len(rows), "routed": len(routed), "speedup_routed": speedup(routed),
            "speedup_all": speedup(rows), "load_speedup": sot["load"]["plain"]["seconds"] / sot["load"]["sot"]["seconds"],
            "verdicts": {v: verdicts.count(v) for v in JUDGE_VERDICTS},
            "sot_or_tie": (verdicts.count("sot") + verdicts.count("tie")) / len(verdicts) if verdicts else None,
            "first_picked": first_picked / len(decisive) if decisive else None,
            "agreed": {v: by_question.count(v) for v in ("sot", "plain", "tie", "split")},
            "preference": statistics.fmean(preferences) if preferences else None,
            "balanced": {v: by_preference.count(v) for v in ("sot", "plain", "tie")},
            "balanced_sot_or_tie": (1 - by_preference.count("plain") / len(by_preference)) if by_preference else None,
            "words_plain": words(routed, "plain_text"), "words_sot": words(routed, "sot_text")}


def sot_markdown(report: dict) -> list[str]:
    sot = report["sot"]
    s = summarize_sot(sot)
    cfg = report["config"]
    out = ["", "## Skeleton-of-Thought", "",
           (f"{s['questions']} held-out questions (generic, knowledge, roleplay, writing, math, coding in turn), "
            f"{cfg['model']} answering greedy up to {sot['max_tokens']} tokens per answer (SoT: per point), router "
            f"{sot['router']}; judge {cfg.get('judge')}, both orders."), "",
           ("| category | question | routed | points | plain s | SoT s | speedup | plain words | SoT words | verdicts "
            "| preference for SoT |"),
           "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in sot["questions"]:
        pref = r.get("preference")
        out.append(f"| {r['category']} | {r['question']} | {'yes' if r['routed'] else 'no'} | {r['points']} | "
                   f"{r['plain_s']:.1f} | {r['sot_s']:.1f} | {r['plain_s'] / r['sot_s']:.2f}× | "
                   f"{len(r['plain_text'].split())} | {len(r['sot_text'].split())} | {', '.join(r['verdicts']) or '-'} "
                   f"| {'-' if pref is None else f'{pref:.2f}'} |")
    load = sot["load"]
    out += ["", (f"Batch 1, routed questions: {_x(s['speedup_routed'])} end to end ({s['routed']} of "
                 f"{s['questions']} routed); all questions: {_x(s['speedup_all'])}. Under load (every question at "
                 f"once): plain {load['plain']['seconds']:.1f} s, SoT {load['sot']['seconds']:.1f} s "
                 f"({_x(s['load_speedup'])}). Judge verdicts over the routed questions' pairs, both orders: "
                 + ", ".join(f"{k} {v}" for k, v in s["verdicts"].items())
                 + (f"; SoT preferred or tied in {100 * s['sot_or_tie']:.0f}%" if s["sot_or_tie"] is not None else "")
                 + (f"; the answer shown first won {100 * s['first_picked']:.0f}% of the decisive verdicts"
                    if s["first_picked"] is not None else "")
                 + ". Per question, both orders together (split: the two orders disagree, so the order decided): "
                 + ", ".join(f"{k} {v}" for k, v in s["agreed"].items())
                 + (f". Mean answer length, routed: plain {s['words_plain']:.0f} words, SoT {s['words_sot']:.0f}."
                    if s["words_plain"] is not None else "."))]
    if s["preference"] is not None:
        out += ["", (f"Position-balanced (the judge's first-token probability of naming SoT's answer, averaged over "
                     f"both orders; a tie within {TIE} of even): mean preference for SoT {s['preference']:.2f}; per "
                     "question " + ", ".join(f"{k} {v}" for k, v in s["balanced"].items())
                     + f"; SoT preferred or tied in {100 * s['balanced_sot_or_tie']:.0f}% of the questions.")]
    return out


def sot_targets(report: dict) -> list[str]:
    s = summarize_sot(report["sot"])
    if not s["routed"]:
        return ["SoT: the router accepted no question: no target measured"]
    return [(f"SoT at batch 1 on routed questions at least 1.5×: {_x(s['speedup_routed'])} "
            f"({'met' if s['speedup_routed'] >= 1.5 else 'missed'})"),
            "judge prefers SoT or ties in at least 45% of pairs, position-balanced: "
            + (f"{100 * s['balanced_sot_or_tie']:.0f}% ({'met' if s['balanced_sot_or_tie'] >= 0.45 else 'missed'})"
               if s["balanced_sot_or_tie"] is not None else "no verdicts")]


def _x(v) -> str:
    return f"{v:.2f}×" if v is not None else "-"
