"""Hugging Face transformers on the packaged GGUF files, the reference of the real-model tests.

transformers builds a gguf.GGUFReader for a file's config, again for its weights, and again for its tokenizer;
parsing the metadata of a 150k-token vocabulary takes about 12 s each time on a 2-core machine. Within
`one_reader()` every read of a file shares the first reader (transformers only reads it: the same values).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import gguf
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer


@contextmanager
def one_reader():
    original, readers = gguf.GGUFReader, {}

    def shared(path, *args, **kwargs):
        key = str(path)
        if key not in readers:
            readers[key] = original(path, *args, **kwargs)
        return readers[key]

    gguf.GGUFReader = shared
    try:
        yield
    finally:
        gguf.GGUFReader = original


def model_from_gguf(path: Path):
    """transformers' float32 model of a GGUF file, in eval mode."""
    with one_reader():
        return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def model_and_tokenizer_from_gguf(path: Path):
    with one_reader():
        return model_from_gguf(path), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
