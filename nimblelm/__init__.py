"""nimblelm: an efficient LLM inference engine.

The public names load lazily, so that torch-free parts (scheduler, block manager, registry) and
quick CLI commands do not pay for importing torch and transformers.
"""

import importlib

_EXPORTS = {
    "LLM": "nimblelm.llm",
    "SamplingParams": "nimblelm.sampling_params",
    "EngineConfig": "nimblelm.config",
    "RequestOutput": "nimblelm.outputs",
    "CompletionOutput": "nimblelm.outputs",
    "Logprob": "nimblelm.outputs",
    "NimbleLMError": "nimblelm.errors",
    "InvalidRequestError": "nimblelm.errors",
    "ModelFormatError": "nimblelm.errors",
    "ModelNotFoundError": "nimblelm.errors",
    "UnsupportedModelError": "nimblelm.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'nimblelm' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
