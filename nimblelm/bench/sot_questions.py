"""Held-out questions in the style of the Skeleton-of-Thought paper's (Vicuna-80 categories): generic,
knowledge, roleplay and writing questions, which answer well as points, and math and coding ones, which the
router should send to plain decoding. Filled in from the word lists of `mt_questions` by a seeded draw; none
was used to tune the prompts or the router."""

from __future__ import annotations

import random

from nimblelm.bench.mt_questions import AUDIENCES, PAIRS, ROLES, TASKS, TOPICS

ACTIVITIES = ["learning a new language", "running a first marathon", "keeping houseplants alive",
              "saving money on groceries", "starting a vegetable garden", "working from home", "preparing for a job interview",
              "sleeping better", "organizing a small wedding", "teaching a dog new tricks"]


def _generic(r: random.Random) -> str:
    return f"What are some tips for {r.choice(ACTIVITIES)}?"


def _knowledge(r: random.Random) -> str:
    a, b = r.choice(PAIRS)
    return f"What are the main differences between {a} and {b}?"


def _roleplay(r: random.Random) -> str:
    return (f"Pretend you are a {r.choice(ROLES)}. What are the most important things you would tell "
            f"{r.choice(AUDIENCES)} about {r.choice(TOPICS)}?")


def _writing(r: random.Random) -> str:
    return f"Write a short guide with the key steps of {r.choice(ACTIVITIES)}."


def _math(r: random.Random) -> str:
    a, b, c = r.randrange(12, 99), r.randrange(3, 12), r.randrange(100, 999)
    return f"Solve for x: {a} * x + {c} = {a * b + c}. Show your reasoning."


def _coding(r: random.Random) -> str:
    task, name = r.choice(TASKS)
    return f"Write a Python function `{name}` that {task}."


CATEGORIES = {"generic": _generic, "knowledge": _knowledge, "roleplay": _roleplay, "writing": _writing,
              "math": _math, "coding": _coding}


def questions(count: int, seed: int = 0) -> list[tuple[str, str]]:
    """`count` (category, question) pairs, the categories in turn, the same for the same seed."""
    r = random.Random(seed)
    names = list(CATEGORIES)
    return [(names[i % len(names)], CATEGORIES[names[i % len(names)]](r)) for i in range(count)]
