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
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field, replace

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


@dataclass
class Stage:
    """Requests a plan needs run before it goes on: one per prompt (a {"prompt", "prompt_token_ids"} dict)."""

    name: str  # "route", "skeleton", "points" or "plain"
    prompts: list[dict]
    params: list[SamplingParams]  # one per prompt
    points: list[str] = field(default_factory=list)  # the points stage's points, in order


@dataclass
class Answer:
    text: str
    finish_reason: str
    routed: bool
    points: list[str]
    outputs: list[RequestOutput]  # every request the plan ran, in order


def _chat(tokenizer, user: str, reply_start: str, system: str | None = None) -> dict:
    """The prompt that has the model answer `user` (after `system`), its reply already begun with reply_start."""
    if tokenizer.chat_template:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) + reply_start
        # The template wrote the special tokens: encoding must not add a second BOS.
        return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}
    text = (f"{system}\n\n" if system else "") + f"{user}\n\nAnswer:\n{reply_start}"
    return {"prompt": text, "prompt_token_ids": tokenizer.encode(text)}


def plain_prompt(tokenizer, question: str, system: str | None = None) -> dict:
    """The prompt of plain decoding: the question as it is, where the router or the skeleton says no."""
    return _chat(tokenizer, question, "", system)


def skeleton_prompt(tokenizer, question: str, system: str | None = None) -> dict:
    return _chat(tokenizer, (
        "You organize answers; you do not write them. Give only the skeleton of an answer to the question "
        "below: a numbered list (1., 2., 3., ...) of 3 to 10 points, each a phrase of 3 to 5 words, no full "
        f"sentences.\n\nQuestion: {question}"), "1.", system)


def point_head(points: Sequence[str], i: int) -> str:
    """Point i's line as its writer's reply begins it and the answer shows it: the point as a bold heading and a
    colon, which asks for what follows. Begun as the bare point, a point the skeleton wrote as a whole sentence
    reads as finished: Qwen2.5-Coder-1.5B ended its reply there, expanding none of a skeleton's points."""
    return f"{i}. **{points[i - 1].rstrip('.:')}**:"


def point_prompt(tokenizer, question: str, points: Sequence[str], i: int, system: str | None = None) -> dict:
    """The prompt that expands point i (from 1); every point's starts with the same question and skeleton."""
    skeleton = "\n".join(f"{j}. {p}" for j, p in enumerate(points, start=1))
    return _chat(tokenizer, (
        f"Here is a question and the skeleton of its answer.\n\nQuestion: {question}\n\nSkeleton:\n{skeleton}\n\n"
        f"Write point {i} only, in one or two short sentences, and do not go on to the other points."),
        point_head(points, i), system)


def router_prompt(tokenizer, question: str) -> dict:
    return _chat(tokenizer, (
        "Could the answer to the question below be written as a list of independent points, each of which "
        f"could be written without seeing the others? Answer yes or no.\n\nQuestion: {question}"), "")


def own_part(text: str, i: int) -> str:
    """Point i's expansion: its first paragraph, up to where the model starts on point i + 1."""
    body = text.split(f"\n{i + 1}.")[0]
    if body.startswith("\n\n"):  # the model left the point: what follows a blank line is something else
        return ""
    lead = len(body) - len(body.lstrip("\n"))  # it may begin the expansion on a line of its own
    return (body[:lead] + body[lead:].split("\n\n")[0]).rstrip()


def point_params(params: SamplingParams, i: int) -> SamplingParams:
    """Point i's expansion stops where own_part cuts it, at a blank line or at point i + 1's number: no
    step decodes text the answer leaves out."""
    return replace(params, stop=[*params.stop_strings, "\n\n", f"\n{i + 1}."])


def point_line(points: Sequence[str], i: int, output: RequestOutput) -> str:
    """Point i's line of the answer: the point and its expansion."""
    return point_head(points, i) + own_part(output.outputs[0].text, i)


def check(params: SamplingParams, router: str) -> None:
    if router not in ROUTERS:
        raise InvalidRequestError(f"skeleton router {router!r} is not one of {', '.join(ROUTERS)}")
    if params.n != 1 or params.structured_output is not None:
        raise InvalidRequestError("Skeleton-of-Thought gives one free-text answer per question (n=1, no "
                                  "structured output)")


def plan(tokenizer, question: str, params: SamplingParams, router: str = "rule",
         system: str | None = None) -> Generator[Stage, list[RequestOutput], Answer]:
    """One question's answer as the stages it needs run (each sent back its outputs, in order): the route
    (router "model"), the skeleton, then its points, or plain decoding where the router or the skeleton
    says no. Driven by `generate` (the offline API) and by the server."""
    outputs: list[RequestOutput] = []
    routed = router == "always" or (router == "rule" and suits_skeleton(question))
    if router == "model":
        outs = yield Stage("route", [router_prompt(tokenizer, question)], [SamplingParams(temperature=0, max_tokens=3)])
        outputs += outs
        routed = outs[0].outputs[0].text.strip().lower().startswith("yes")
    points: list[str] = []
    if routed:
        sketch = replace(params, max_tokens=SKELETON_MAX_TOKENS, stop=None)
        outs = yield Stage("skeleton", [skeleton_prompt(tokenizer, question, system)], [sketch])
        outputs += outs
        points = parse_points("1." + outs[0].outputs[0].text)
    if len(points) < 2:
        outs = yield Stage("plain", [plain_prompt(tokenizer, question, system)], [params])
        c = outs[0].outputs[0]
        return Answer(c.text, c.finish_reason, False, [], outputs + outs)
    numbers = range(1, len(points) + 1)
    outs = yield Stage("points", [point_prompt(tokenizer, question, points, i, system) for i in numbers],
                       [point_params(params, i) for i in numbers], points)
    text = "\n".join(point_line(points, i, o) for i, o in enumerate(outs, start=1))
    finish = "length" if any(o.outputs[0].finish_reason == "length" for o in outs) else "stop"
    return Answer(text, finish, True, points, outputs + outs)


def generate(llm, questions: list[str], params: SamplingParams, router: str = "rule") -> list[RequestOutput]:
    """Answers to questions (plain text), each by Skeleton-of-Thought where the router sends it and its
    skeleton has two points or more, else by plain decoding of the question (in the chat template where
    the model has one). Every question's current stage runs in one batch with the others'."""
    check(params, router)
    if not all(isinstance(q, str) and q.strip() for q in questions):
        raise InvalidRequestError("Skeleton-of-Thought answers text questions")
    plans = [plan(llm.tokenizer, q, params, router) for q in questions]
    stages = {i: next(p) for i, p in enumerate(plans)}
    seconds = [dict.fromkeys(("skeleton", "points"), 0.0) for _ in questions]
    answers: dict[int, Answer] = {}
    while stages:
        batch = [(i, prompt, p) for i, stage in stages.items() for prompt, p in zip(stage.prompts, stage.params)]
        start = time.perf_counter()
        outs = iter(llm.generate([b[1] for b in batch], [b[2] for b in batch], use_tqdm=False))
        took = time.perf_counter() - start
        for i, stage in list(stages.items()):
            if stage.name in seconds[i]:
                seconds[i][stage.name] = took
            try:
                stages[i] = plans[i].send([next(outs) for _ in stage.prompts])
            except StopIteration as done:
                answers[i] = done.value
                del stages[i]
    results = []
    for i, question in enumerate(questions):
        a = answers[i]
        first = a.outputs[-1 - len(a.points)] if a.routed else a.outputs[-1]  # the skeleton's, or plain's
        out = RequestOutput(request_id="", prompt=question, prompt_token_ids=first.prompt_token_ids,
                            outputs=[CompletionOutput(0, a.text, llm.tokenizer.encode(a.text, add_special_tokens=False),
                                                      a.finish_reason)], finished=True)
        out.skeleton = SkeletonInfo(a.routed, a.points, seconds[i]["skeleton"], seconds[i]["points"])
        results.append(out)
    return results
