"""The data level: prompt compression (`compression.py`, scored by `scorer.py`) and Skeleton-of-Thought
(`skeleton.py`)."""

from nimblelm.prompting.compression import CompressedPrompt, PromptCompression, compress

__all__ = ["CompressedPrompt", "PromptCompression", "compress"]
