"""Skeleton-of-Thought (Ning et al., 2024): the model first writes a short numbered outline of its answer,
then every point is expanded at once, as one batch, and the points are joined in order.

The expansion prompts of one question all start with the question and its skeleton, word for word, so the
engine's prefix cache computes that start once for all points. A router decides which questions suit an
answer in independent points (lists of tips, reasons, aspects); the others, and any whose skeleton has
fewer than two points, are answered by plain decoding. The prompts are this project's own wording of the
paper's: an organizer that writes only the skeleton, and a writer that continues one point only.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace

from nimblelm.errors import InvalidRequestError
from nimblelm.outputs import CompletionOutput, RequestOutput
from nimblelm.sampling_params import SamplingParams

ROUTERS = ("rule", "model", "always")
SKELETON_MAX_TOKENS = 160
MAX_POINTS = 10

_POINT = re.compile(r"^\s*(\d+)\s*[.)]\s*(.*?)\s*$")
# Questions that ask for several things side by side: the rule router's cue words.
_LIST_CUES = re.compile(
    r"\b(tips|ways|steps|reasons|ideas|examples|factors|benefits|advantages|disadvantages|pros|cons|"
    r"strategies|differences|features|aspects|methods|suggestions|habits|skills|causes|effects|"
    r"what are|how can|how do|how to|compare|list)\b")
# ... and questions whose answer is one chain of reasoning or one artifact: never split.
_WHOLE_CUES = re.compile(r"\b(code|function|program|script|solve|calculate|compute|prove|equation|translate)\b"
                         r"|\d\s*[-+*/^=]\s*\d")


@dataclass
class SkeletonInfo:
    """How a question was answered: routed to Skeleton-of-Thought or not, its points, and the time of
    each stage."""

    routed: bool
    points: list[str]
    skeleton_seconds: float = 0.0
    expansion_seconds: float = 0.0


def suits_skeleton(question: str) -> bool:
    """The rule router: a question that asks for several things (tips, reasons, a comparison) and is not
    code, arithmetic or a proof."""
    q = question.lower()
    return bool(_LIST_CUES.search(q)) and not _WHOLE_CUES.search(q)


def parse_points(text: str) -> list[str]:
    """The skeleton's points, numbered 1, 2, 3, ... from the start of its text; the list ends at the first
    line that does not continue the numbering, at a point said before (a model looping), or at MAX_POINTS."""
    points = []
    for line in text.splitlines():
        m = _POINT.match(line)
        if not line.strip():
            continue
        if not m or int(m.group(1)) != len(points) + 1 or not m.group(2) or m.group(2) in points:
            break
        points.append(m.group(2))
        if len(points) == MAX_POINTS:
            break
    return points


def _chat(llm, user: str, reply_start: str) -> str:
    """The prompt text that has the model answer `user`, its reply already begun with reply_start."""
    if llm.tokenizer.chat_template:
        head = llm.tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                 add_generation_prompt=True)
        return head + reply_start
    return f"{user}\n\nAnswer:\n{reply_start}"


def skeleton_prompt(llm, question: str) -> str:
    return _chat(llm, (
        "You organize answers; you do not write them. Give only the skeleton of an answer to the question "
        "below: a numbered list (1., 2., 3., ...) of 3 to 10 points, each a phrase of 3 to 5 words, no full "
        f"sentences.\n\nQuestion: {question}"), "1.")


def point_prompt(llm, question: str, points: Sequence[str], i: int) -> str:
    """The prompt that expands point i (from 1); every point's starts with the same question and skeleton."""
    skeleton = "\n".join(f"{j}. {p}" for j, p in enumerate(points, start=1))
    return _chat(llm, (
        f"Here is a question and the skeleton of its answer.\n\nQuestion: {question}\n\nSkeleton:\n{skeleton}\n\n"
        f"Write point {i} only, in one or two short sentences, and do not go on to the other points."),
        f"{i}. {points[i - 1]}")


def router_prompt(llm, question: str) -> str:
    return _chat(llm, (
        "Could the answer to the question below be written as a list of independent points, each of which "
        f"could be written without seeing the others? Answer yes or no.\n\nQuestion: {question}"), "")


def _route(llm, questions: list[str], router: str) -> list[bool]:
    if router == "always":
        return [True] * len(questions)
    if router == "rule":
        return [suits_skeleton(q) for q in questions]
    outs = llm.generate([router_prompt(llm, q) for q in questions], SamplingParams(temperature=0, max_tokens=3),
                        use_tqdm=False)
    return [o.outputs[0].text.strip().lower().startswith("yes") for o in outs]


def _answer(question: str, prompt_ids: list[int], text: str, token_ids: list[int], finish: str,
            info: SkeletonInfo) -> RequestOutput:
    out = RequestOutput(request_id="", prompt=question, prompt_token_ids=prompt_ids,
                        outputs=[CompletionOutput(0, text, token_ids, finish)], finished=True)
    out.skeleton = info
    return out


def _own_part(text: str, i: int) -> str:
    """Point i's expansion: its first paragraph, up to where the model starts on point i + 1."""
    body = text.split(f"\n{i + 1}.")[0]
    if body.startswith("\n\n"):  # the model left the point: what follows a blank line is something else
        return ""
    lead = len(body) - len(body.lstrip("\n"))  # it may begin the expansion on a line of its own
    return (body[:lead] + body[lead:].split("\n\n")[0]).rstrip()


def expand(llm, answers: Sequence[tuple[str, list[str]]],
           params: SamplingParams) -> list[tuple[str, list[RequestOutput]]]:
    """Every point of every (question, points) expanded in one batch; per question, its points joined in
    order into the answer text, and each point's output."""
    prompts = [point_prompt(llm, q, points, i) for q, points in answers for i in range(1, len(points) + 1)]
    outs = iter(llm.generate(prompts, params, use_tqdm=False))
    joined = []
    for _, points in answers:
        mine = [next(outs) for _ in points]
        lines = [f"{i}. {p}{_own_part(o.outputs[0].text, i)}" for i, (p, o) in enumerate(zip(points, mine), start=1)]
        joined.append(("\n".join(lines), mine))
    return joined


def generate(llm, questions: list[str], params: SamplingParams, router: str = "rule") -> list[RequestOutput]:
    """Answers to questions (plain text), each by Skeleton-of-Thought where the router sends it and its
    skeleton has two points or more, else by plain decoding of the question (in the chat template where
    the model has one)."""
    if router not in ROUTERS:
        raise InvalidRequestError(f"skeleton router {router!r} is not one of {', '.join(ROUTERS)}")
    if not all(isinstance(q, str) and q.strip() for q in questions):
        raise InvalidRequestError("Skeleton-of-Thought answers text questions")
    if params.n != 1 or params.structured_output is not None:
        raise InvalidRequestError("Skeleton-of-Thought gives one free-text answer per question (n=1, no "
                                  "structured output)")
    routed = _route(llm, questions, router)
    points: dict[int, list[str]] = {}
    skeleton_seconds = 0.0
    if any(routed):
        start = time.perf_counter()
        asked = [i for i, r in enumerate(routed) if r]
        sketch = replace(params, max_tokens=SKELETON_MAX_TOKENS, stop=None)
        outs = llm.generate([skeleton_prompt(llm, questions[i]) for i in asked], sketch, use_tqdm=False)
        skeleton_seconds = time.perf_counter() - start
        for i, out in zip(asked, outs):
            found = parse_points("1." + out.outputs[0].text)
            if len(found) >= 2:
                points[i] = found
    answers: dict[int, RequestOutput] = {}
    plain = [i for i in range(len(questions)) if i not in points]
    if plain:
        prompts = [_chat(llm, questions[i], "") for i in plain]
        for i, out in zip(plain, llm.generate(prompts, params, use_tqdm=False)):
            c = out.outputs[0]
            answers[i] = _answer(questions[i], out.prompt_token_ids, c.text, c.token_ids, c.finish_reason,
                                 SkeletonInfo(False, []))
    if points:
        start = time.perf_counter()
        expanded = expand(llm, [(questions[i], found) for i, found in points.items()], params)
        seconds = time.perf_counter() - start
        for (i, found), (text, outs) in zip(points.items(), expanded):
            finish = "length" if any(o.outputs[0].finish_reason == "length" for o in outs) else "stop"
            answers[i] = _answer(questions[i], outs[0].prompt_token_ids, text,
                                 llm.tokenizer.encode(text, add_special_tokens=False), finish,
                                 SkeletonInfo(True, found, skeleton_seconds, seconds))
    return [answers[i] for i in range(len(questions))]
