"""The datastore of retrieval drafts (method "suffix"): a corpus's token ids and their suffix array.

`nimblelm spec build-datastore` tokenizes a corpus with the target's tokenizer and writes one .npz: the
token ids of every document, each followed by SEPARATOR (so no match spans two documents), the suffix array
(the start of every suffix, in lexicographic order), and the tokenizer's identity (vocabulary size and a
digest of its vocabulary) that the proposer checks against the target's.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from nimblelm.errors import InvalidRequestError

SEPARATOR = -1  # below every token id: sorts first and never equals a token
SHAREGPT = "sharegpt"
DEFAULT_CORPUS = SHAREGPT
# ShareGPT's first 8M tokens of replies (of about 25M): 26 s to build for SmolLM2 on an idle 2-core machine
# (tokenizing 8 s, the suffix array 18 s), 64 MB on disk.
DEFAULT_MAX_TOKENS = 8_000_000
_BATCH = 256  # documents tokenized at once


@dataclass
class Datastore:
    tokens: np.ndarray  # int32 token ids, SEPARATOR after each document
    suffix_array: np.ndarray  # int32 (int64 past 2**31 tokens): suffix starts in lexicographic order
    vocab_size: int
    tokenizer_digest: str
    model: str  # the model whose tokenizer built it
    corpus: str


def datastore_dir() -> Path:
    from nimblelm.models.registry import cache_dir

    return cache_dir() / "datastores"


def default_path(model: str, corpus: str = DEFAULT_CORPUS) -> Path:
    """Where build-datastore writes by default: one file per model and corpus (a file's stem for a path)."""
    model_name = Path(model).stem if model.endswith(".gguf") else Path(model).name
    corpus_name = corpus if corpus == SHAREGPT else Path(corpus).stem
    return datastore_dir() / f"{model_name}.{corpus_name}.npz"


def suffix_array(tokens: np.ndarray) -> np.ndarray:
    """Suffix starts in lexicographic order of the suffixes (a shorter one first where it is a prefix).

    Prefix doubling: after the round with step k every suffix is ranked by its first 2k tokens, from the
    pair (rank of its first k, rank of the k after them); rounds go on until all ranks differ, so a corpus
    whose longest repeat is L tokens takes about log2(L) sorts."""
    n = len(tokens)
    rank = np.unique(tokens, return_inverse=True)[1].astype(np.int64)
    order = np.argsort(rank, kind="stable")
    k = 1
    while n and rank.max() < n - 1:
        following = np.zeros(n, dtype=np.int64)  # 0: the suffix ends before k more tokens
        following[: n - k] = rank[k:] + 1
        key = rank * (n + 1) + following
        order = np.argsort(key)
        sorted_key = key[order]
        rank[order] = np.concatenate(([0], np.cumsum(sorted_key[1:] != sorted_key[:-1])))
        k *= 2
    return order.astype(np.int32 if n < 2**31 else np.int64)


def tokenizer_digest(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    return hashlib.sha256(json.dumps(vocab).encode()).hexdigest()[:16]


def corpus_documents(corpus: str) -> Iterator[str]:
    """The texts of a corpus: "sharegpt", or a .txt (documents separated by blank lines), .jsonl (a document
    per line) or .json (an array of documents) file, where a document is a string, an object with a "text"
    string, or a ShareGPT record."""
    from nimblelm import corpora

    if corpus == SHAREGPT:
        for record in corpora.iter_json_array(corpora.sharegpt_path()):
            yield from _texts(record)
        return
    path = Path(corpus).expanduser()
    if not path.is_file():
        raise InvalidRequestError(f"corpus file not found: {path}")
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8", errors="replace")
        yield from (block.strip("\n") for block in text.split("\n\n") if block.strip())
    elif path.suffix == ".jsonl":
        with open(path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield from _texts(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise InvalidRequestError(f"{path}:{number}: not valid JSON ({e})") from None
    elif path.suffix == ".json":
        try:
            for element in corpora.iter_json_array(path):
                yield from _texts(element)
        except ValueError as e:
            raise InvalidRequestError(str(e)) from None
    else:
        raise InvalidRequestError(f"corpus {path}: expected a .txt, .jsonl or .json file, or 'sharegpt'")


def _texts(element) -> Iterator[str]:
    from nimblelm.corpora import MODEL_ROLES

    if isinstance(element, str):
        yield element
    elif isinstance(element, dict) and isinstance(element.get("text"), str):
        yield element["text"]
    elif isinstance(element, dict):
        # Of a ShareGPT conversation, the model's turns only: drafts stand in for the model's own words,
        # and the user's turns (often pasted code, logs or articles) would fill the store with text that the
        # prompt itself already offers to the own-sequence lookup.
        for turn in element.get("conversations") or []:
            if (isinstance(turn, dict) and str(turn.get("from", "")).lower() in MODEL_ROLES
                    and isinstance(turn.get("value"), str)):
                yield turn["value"]


def build(model: str, corpus: str = DEFAULT_CORPUS, max_tokens: int = DEFAULT_MAX_TOKENS,
          output: str | os.PathLike | None = None, progress: bool = True) -> tuple[Path, dict[str, float]]:
    """Tokenize up to max_tokens of the corpus's distinct documents with the model's tokenizer and write the
    datastore; returns its path and what it took (tokens, documents, seconds tokenizing and sorting, bytes)."""
    from nimblelm.models.loader import load_model

    if max_tokens < 1:
        raise InvalidRequestError(f"--max-tokens must be positive, got {max_tokens}")
    documents = corpus_documents(corpus)
    first = next(documents, None)  # a missing or empty corpus fails before the model loads
    if first is None:
        raise InvalidRequestError(f"corpus {corpus} has no text")
    loaded = load_model(model, progress=progress)
    tokenizer, vocab_size = loaded.tokenizer, loaded.config.vocab_size
    del loaded

    start = time.perf_counter()
    pieces, total, seen = [], 0, set()
    with tqdm(total=max_tokens, unit="tok", unit_scale=True, desc="tokenizing", disable=not progress) as bar:
        for batch in _batches(itertools.chain([first], documents)):
            fresh = []
            for text in batch:  # repeated documents (ShareGPT has many) would only skew the counts
                if hash(text) not in seen:
                    seen.add(hash(text))
                    fresh.append(text)
            for ids in tokenizer(fresh, add_special_tokens=False)["input_ids"]:
                ids = ids[: max_tokens - total]
                pieces.append(np.array(ids + [SEPARATOR], dtype=np.int32))
                total += len(ids)
                bar.update(len(ids))
                if total >= max_tokens:
                    break
            if total >= max_tokens:
                break
    if total == 0:
        raise InvalidRequestError(f"corpus {corpus} has no text")
    tokens = np.concatenate(pieces)
    tokenized = time.perf_counter()
    order = suffix_array(tokens)
    sorted_at = time.perf_counter()

    path = Path(output).expanduser() if output is not None else default_path(model, corpus)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:  # a file object: np.savez would add ".npz" to a name
        np.savez(f, tokens=tokens, suffix_array=order, vocab_size=vocab_size,
                 tokenizer_digest=tokenizer_digest(tokenizer), model=model, corpus=corpus)
    os.replace(tmp, path)  # never a half-written datastore under the name the proposer looks for
    return path, {"tokens": total, "documents": len(pieces), "tokenize_s": tokenized - start,
                  "sort_s": sorted_at - tokenized, "bytes": path.stat().st_size}


def _batches(texts: Iterator[str]) -> Iterator[list[str]]:
    while batch := list(itertools.islice(texts, _BATCH)):
        yield batch


def load(path: str | os.PathLike, arrays: bool = True) -> Datastore:
    """A datastore file; with arrays=False only its identity (the arrays left empty)."""
    try:
        with np.load(path) as z:
            empty = np.empty(0, dtype=np.int32)
            return Datastore(z["tokens"] if arrays else empty, z["suffix_array"] if arrays else empty,
                             int(z["vocab_size"]), str(z["tokenizer_digest"]), str(z["model"]), str(z["corpus"]))
    except FileNotFoundError:
        raise InvalidRequestError(f"speculative_config: datastore not found: {path}") from None
    except (OSError, KeyError, ValueError) as e:
        raise InvalidRequestError(
            f"speculative_config: {path} is not a datastore of `nimblelm spec build-datastore` ({e})") from None


def open_for_target(path: str | None, vocab_size: int) -> Datastore:
    """The datastore at path, or the default one (None), checked against the target's vocabulary.

    The proposer is told the target's vocabulary, not its name, so the default is found by it: the ShareGPT
    datastore whose tokenizer has that many tokens (the newest where several were built with one tokenizer,
    as Qwen2.5 models of every size share theirs)."""
    if path is None:
        path = _default_for(vocab_size)
    store = load(path)
    if store.vocab_size != vocab_size:
        raise InvalidRequestError(
            f"speculative_config: the datastore {path} was built with {store.model}'s tokenizer "
            f"({store.vocab_size} tokens), the target's vocabulary has {vocab_size}: build one with its tokenizer")
    return store


def _default_for(vocab_size: int) -> Path:
    found = [p for p in datastore_dir().glob(f"*.{SHAREGPT}.npz") if load(p, arrays=False).vocab_size == vocab_size]
    if not found:
        raise InvalidRequestError(
            f"speculative_config: method suffix found no ShareGPT datastore for this model's vocabulary "
            f"({vocab_size} tokens) in {datastore_dir()}: build one with `nimblelm spec build-datastore --model "
            f"MODEL` (MODEL as you gave it here), or give 'datastore'")
    tokenizers = {load(p, arrays=False).tokenizer_digest for p in found}
    if len(tokenizers) > 1:
        names = ", ".join(sorted(p.name for p in found))
        raise InvalidRequestError(
            f"speculative_config: several datastores in {datastore_dir()} fit a vocabulary of {vocab_size} "
            f"tokens but come from different tokenizers ({names}): give 'datastore'")
    return max(found, key=lambda p: p.stat().st_mtime)
