"""Held-out two-turn questions in the style of MT-bench: eight categories, each a first question and a
follow-up on the answer, filled in from small word lists by a seeded draw. Nothing here comes from a corpus
the engine could have seen (ShareGPT feeds suffix's datastore and the trained heads), so retrieval and
trained drafters meet them as new text."""

from __future__ import annotations

import random

NAMES = ["Amara", "Bruno", "Chen", "Dalia", "Emeka", "Freya", "Goran", "Hana", "Ines", "Jonas"]
TOPICS = ["tidal energy", "beekeeping", "the printing press", "glaciers", "public libraries", "volcanoes",
          "sourdough bread", "the Silk Road", "solar sails", "coral reefs", "chess openings", "night trains"]
AUDIENCES = ["a ten-year-old", "a retired engineer", "a busy nurse", "a first-year student", "a city mayor"]
ROLES = ["lighthouse keeper", "museum guide", "ship's cook", "park ranger", "night-shift baker"]
GENRES = ["short story", "poem", "letter", "news report", "diary entry"]
TASKS = [
    ("returns the n-th Fibonacci number", "fibonacci"),
    ("checks whether a string is a palindrome, ignoring case and spaces", "is_palindrome"),
    ("merges two sorted lists into one sorted list", "merge_sorted"),
    ("counts how often each word occurs in a text", "word_counts"),
    ("returns the largest sum of a contiguous sub-list of numbers", "max_subarray"),
    ("converts a Roman numeral to an integer", "roman_to_int"),
]
PAIRS = [("trains", "planes"), ("cats", "dogs"), ("paper books", "e-books"), ("rivers", "canals"),
         ("chess", "go"), ("tea", "coffee")]
ASPECTS = ["their history", "their cost to society", "how people use them today", "their effect on the environment"]


def _writing(r: random.Random) -> tuple[str, str]:
    genre, topic = r.choice(GENRES), r.choice(TOPICS)
    return (f"Write a {genre} about {topic}, in about 150 words.",
            f"Rewrite your {genre} in exactly four sentences, keeping its main idea.")


def _roleplay(r: random.Random) -> tuple[str, str]:
    role, topic, audience = r.choice(ROLES), r.choice(TOPICS), r.choice(AUDIENCES)
    return (f"Pretend you are a {role}. In character, tell a visitor what you know about {topic}.",
            f"Stay in character and explain the same thing to {audience}.")


def _reasoning(r: random.Random) -> tuple[str, str]:
    a, b = r.sample(NAMES, 2)
    start, given = r.randint(12, 40), r.randint(2, 9)
    question = (f"{a} has {start} marbles and gives {given} to {b}, who already had {given + 3}. Then {b} gives "
                "half of hers back. How many marbles does each of them have now? Explain step by step.")
    return question, f"What would the answer be if {a} had started with {start + 10} marbles?"


def _math(r: random.Random) -> tuple[str, str]:
    a, x, b = r.randint(2, 9), r.randint(-6, 12), r.randint(1, 30)
    return (f"Solve for x: {a}x + {b} = {a * x + b}. Show each step.",
            "Check your answer by substituting it back into the equation.")


def _coding(r: random.Random) -> tuple[str, str]:
    task, name = r.choice(TASKS)
    return (f"Write a Python function `{name}` that {task}.",
            f"Now write three pytest tests for `{name}`, including one for an edge case.")


def _extraction(r: random.Random) -> tuple[str, str]:
    people = r.sample(NAMES, 3)
    cities = r.sample(["Lagos", "Oslo", "Lima", "Kyoto", "Porto", "Quito", "Tunis", "Perth"], 3)
    years = sorted(r.sample(range(1990, 2024), 3))
    text = " ".join(f"In {y}, {p} moved to {c} to work on {r.choice(TOPICS)}." for p, c, y in zip(people, cities, years))
    return (f"Read this text and list every person with the city they moved to and the year:\n\n{text}",
            "Give the same information as a JSON array of objects with keys name, city and year.")


def _stem(r: random.Random) -> tuple[str, str]:
    topic = r.choice(["how a refrigerator moves heat", "why the sky is blue", "how vaccines train the immune system",
                      "how a transistor switches", "why ice floats on water", "how GPS finds a position"])
    return (f"Explain {topic}.", f"Now explain it to {r.choice(AUDIENCES)} in three sentences.")


def _humanities(r: random.Random) -> tuple[str, str]:
    (a, b), aspect = r.choice(PAIRS), r.choice(ASPECTS)
    return (f"Compare {a} and {b} in terms of {aspect}.", "Summarize your comparison in one sentence.")


CATEGORIES = {"writing": _writing, "roleplay": _roleplay, "reasoning": _reasoning, "math": _math,
              "coding": _coding, "extraction": _extraction, "stem": _stem, "humanities": _humanities}


def conversations(count: int, seed: int = 0) -> list[tuple[str, str, str]]:
    """count (category, first question, follow-up), the categories in turn, each filled in by the seed."""
    r = random.Random(f"mt-questions {seed}")
    names = list(CATEGORIES)
    return [(names[i % len(names)], *CATEGORIES[names[i % len(names)]](r)) for i in range(count)]
