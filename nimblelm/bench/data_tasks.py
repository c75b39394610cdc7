"""The prompt-compression workloads of `nimblelm bench survey data`, built from fixed seeds and local text only.

- `qa`: long-document question answering. The document is reference text of Python functions (the standard
  library's own docstrings, as this Python ships them); the question quotes the first sentence of one
  function's documentation and asks which function it describes. Graded by the function's name in the answer.
- `needle`: a one-sentence fact ("The <subject> code is <number>.") planted at a chosen depth of such a
  document; the question asks for the number. Graded by the number in the answer.
- `sharegpt`: ShareGPT's longest first-turn prompts as they are. No reference answer: graded by agreement
  (word-level F1) with the answering model's own answer to the uncompressed prompt.

Every task splits its prompt into an instruction and a question, kept verbatim, and a context between them:
the part every compressor compresses.
"""

from __future__ import annotations

import importlib
import inspect
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

#: Standard-library modules whose functions make the documents: those with the most documented functions.
DOC_MODULES = ("os.path", "shutil", "math", "statistics", "random", "json", "base64", "heapq", "bisect", "difflib",
               "inspect", "urllib.parse", "tempfile", "time", "socket", "subprocess", "functools", "textwrap",
               "zlib", "calendar", "csv", "re", "struct", "glob")
NEEDLE_SUBJECTS = ("archive room", "garden gate", "backup server", "north warehouse", "museum vault", "harbor office",
                   "night shift", "storage locker", "conference bridge", "lab freezer", "rooftop door", "parking deck")
NEEDLE_DEPTHS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class DataTask:
    workload: str
    instruction: str  # before the context, kept verbatim
    context: str  # what a compressor compresses
    question: str  # after the context, kept verbatim; also what question-aware methods rank by
    answer: str | None  # what a right answer contains; None: graded against the uncompressed prompt's answer
    max_tokens: int
    ask: str = ""  # what question-aware methods rank by when the prompt has no separate question

    @property
    def rank_question(self) -> str:
        return self.question or self.ask

    def prompt(self, context: str | None = None) -> str:
        """The user message, with `context` (a compressed one) in place of the task's own."""
        parts = [self.instruction, self.context if context is None else context, self.question]
        return "\n\n".join(p for p in parts if p)


@dataclass(frozen=True)
class _Section:
    name: str
    text: str  # "module.name(signature)" and its documentation, as one paragraph
    first_sentence: str


def _sections() -> list[_Section]:
    out = []
    for module_name in DOC_MODULES:
        module = importlib.import_module(module_name)
        for name in sorted(dir(module)):
            obj = getattr(module, name)
            if name.startswith("_") or inspect.isclass(obj) or not callable(obj):
                continue
            if getattr(obj, "__module__", None) not in (module.__name__, None) and not inspect.isbuiltin(obj):
                continue  # re-exported from elsewhere: documented with its own module
            doc = inspect.getdoc(obj)
            if not doc:
                continue
            try:
                signature = str(inspect.signature(obj))
            except (TypeError, ValueError):
                signature = "(...)"
            body = re.sub(r"\n\s*\n", "\n", doc.strip())  # one paragraph per function
            first = re.split(r"(?<=\.)\s", " ".join(doc.split("\n\n")[0].split()), maxsplit=1)[0]
            out.append(_Section(name, f"{module_name}.{name}{signature}\n{body}", first))
    return out


def _document(sections: Sequence[_Section], tokenizer, tokens: int) -> list[_Section]:
    """Sections in the given order, each that still fits, until the document holds about `tokens` tokens."""
    chosen, total = [], 0
    for s in sections:
        n = len(tokenizer.encode(s.text, add_special_tokens=False)) + 2
        if total + n <= tokens:
            chosen.append(s)
            total += n
        if total > 0.95 * tokens:
            break
    return chosen


def doc_qa_tasks(tokenizer, count: int, context_tokens: Sequence[int], seed: int = 0) -> list[DataTask]:
    """`count` documents of about context_tokens[i % len] tokens, each with a question about one function."""
    pool = _sections()
    described = Counter(s.first_sentence for s in pool)
    names = Counter(s.name for s in pool)
    r = random.Random(seed)
    tasks = []
    for i in range(count):
        r.shuffle(pool)
        doc = _document(pool, tokenizer, context_tokens[i % len(context_tokens)])
        # A question has one right answer: a sentence and a name that no other function shares.
        askable = [s for s in doc if described[s.first_sentence] == 1 and names[s.name] == 1
                   and len(s.first_sentence.split()) >= 5]
        target = r.choice(askable or doc)
        tasks.append(DataTask(
            "qa", "Below is reference documentation of Python functions. Answer the question after it with the "
                  "function's name only.",
            "\n\n".join(s.text for s in doc),
            f"Question: which function does the documentation describe as \"{target.first_sentence}\"?",
            target.name, 16))
    return tasks


def needle_tasks(tokenizer, count: int, context_tokens: Sequence[int], seed: int = 0) -> list[DataTask]:
    """`count` documents of about context_tokens[i % len] tokens, each with one planted fact at a depth of
    NEEDLE_DEPTHS[i % len] (a share of its sections before the fact)."""
    pool = _sections()
    r = random.Random(seed + 1)
    tasks = []
    for i in range(count):
        r.shuffle(pool)
        subject, number = r.choice(NEEDLE_SUBJECTS), str(r.randrange(1000, 10000))
        doc = [s.text for s in _document(pool, tokenizer, context_tokens[i % len(context_tokens)])]
        at = round(NEEDLE_DEPTHS[i % len(NEEDLE_DEPTHS)] * len(doc))
        doc.insert(at, f"The {subject} code is {number}.")
        tasks.append(DataTask(
            "needle", "Below is a long text. Answer the question after it with the number only.",
            "\n\n".join(doc), f"Question: what is the {subject} code?", number, 12))
    return tasks


def sharegpt_tasks(pairs: Sequence[tuple[str, str]], tokenizer, count: int, max_tokens: int = 64,
                   max_prompt_tokens: int = 4096) -> list[DataTask]:
    """The `count` longest first-turn prompts of ShareGPT that fit max_prompt_tokens, longest first. The
    question (for question-aware methods) is the prompt's last paragraph: where a long prompt states its ask."""
    prompts = sorted({p for p, _ in pairs}, key=len, reverse=True)
    tasks = []
    for p in prompts:
        if len(tasks) == count:
            break
        if len(tokenizer.encode(p, add_special_tokens=False)) > max_prompt_tokens:
            continue
        ask = [q for q in re.split(r"\n\s*\n", p.strip()) if q.strip()][-1]
        tasks.append(DataTask("sharegpt", "", p, "", None, max_tokens, ask=ask))
    return tasks


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def word_f1(answer: str, reference: str) -> float:
    """Word-level F1 of answer against reference (SQuAD's measure); 1.0 when both are empty."""
    a, b = Counter(_words(answer)), Counter(_words(reference))
    if not a and not b:
        return 1.0
    common = sum((a & b).values())
    if not common:
        return 0.0
    precision, recall = common / sum(a.values()), common / sum(b.values())
    return 2 * precision * recall / (precision + recall)


def grade(task: DataTask, answer: str, reference: str) -> float:
    """1.0 or 0.0 for a task with a known answer (the answer holds it as a word); else word F1 against
    `reference`, the answer to the uncompressed prompt."""
    if task.answer is None:
        return word_f1(answer, reference)
    return float(re.search(rf"(?<!\w){re.escape(task.answer)}(?!\w)", answer) is not None)


@dataclass(frozen=True)
class NeedlePrompt:
    """A needle-in-a-haystack prompt as token ids: instruction, a context of exactly context_tokens tokens with
    the needle at `position` in it, then the question."""

    token_ids: list[int]
    context_start: int  # where the context begins in token_ids
    context_tokens: int
    position: int  # the needle's first token, counted from the context's start
    needle_tokens: int
    answer: str
    depth_asked: float  # needle_prompt's depth; `depth` is where the needle landed

    @property
    def depth(self) -> float:
        """The share of the haystack before the needle, from 0 (first) to 1 (last)."""
        room = self.context_tokens - self.needle_tokens
        return self.position / room if room else 0.0

    def found(self, answer: str) -> bool:
        """Whether an answer holds the number, as a word (grade's rule)."""
        return re.search(rf"(?<!\w){self.answer}(?!\w)", answer) is not None


def haystack_ids(tokenizer, tokens: int, seed: int = 0) -> list[int]:
    """Exactly `tokens` token ids of DOC_MODULES' documentation, sections in a seeded order, the pool reshuffled
    and repeated where one pass is too short (about 30k tokens)."""
    pool, r, ids = _sections(), random.Random(seed), []
    while len(ids) < tokens:
        r.shuffle(pool)
        for s in pool:
            ids += tokenizer.encode(s.text + "\n\n", add_special_tokens=False)
            if len(ids) >= tokens:
                break
    return ids[:tokens]


def needle_prompt(tokenizer, context_tokens: int, depth: float, seed: int = 0) -> NeedlePrompt:
    """A fact ("The <subject> code is <number>.") planted at `depth` (0 to 1) of a haystack_ids context of
    exactly context_tokens tokens, the question after the context and the answer's start after the question.

    Parts are encoded apart and joined as ids, so the counts are exact and every engine gets the same ids. The
    haystack depends on (seed, context_tokens) alone, so one context's depths differ only in where the needle
    is. Between the ends the needle moves back to the start of a line (at most 64 tokens) so that it reads as
    a line of its own; depth reports where it landed."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    r = random.Random(f"{seed}/{context_tokens}/{depth}")
    subject, number = r.choice(NEEDLE_SUBJECTS), str(r.randrange(1000, 10000))

    def encode(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    needle = encode(f"\nThe {subject} code is {number}.\n")
    if context_tokens <= len(needle):
        raise ValueError(f"a context of {context_tokens} tokens cannot hold the needle ({len(needle)} tokens)")
    hay = haystack_ids(tokenizer, context_tokens - len(needle), seed=seed + context_tokens)
    at = round(depth * len(hay))
    if 0 < at < len(hay):
        starts = [i for i in range(at, max(0, at - 64), -1) if tokenizer.decode(hay[i - 1:i]).endswith("\n")]
        at = starts[0] if starts else at
    head = tokenizer.encode("", add_special_tokens=True)  # a BOS where the model's tokenizer adds one
    instruction = encode("Below is a long text with one fact hidden in it. Read it, then answer the question "
                         "after it.\n\n")
    question = encode(f"\n\nQuestion: what is the {subject} code?\nAnswer: The {subject} code is")
    start = len(head) + len(instruction)
    return NeedlePrompt(head + instruction + hay[:at] + needle + hay[at:] + question, start, context_tokens, at,
                        len(needle), number, depth)
