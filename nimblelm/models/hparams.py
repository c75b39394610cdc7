"""Reading a model's hyper-parameters: typed fields of config.json or GGUF metadata, the checks that
they make a model, and what an architecture implies that its files leave out.

Every value the loader takes from a file goes through `Fields`, so a missing key, a value of the wrong
type or a size that is not positive is one ModelFormatError naming the file and the key, never a
KeyError or TypeError from deep inside the model.
"""

from __future__ import annotations

from typing import Any

from nimblelm.errors import ModelFormatError

REQUIRED = object()  # the default of a key the file must have


class Fields:
    """The key/value pairs of one file, or of one object inside it (`prefix` says where)."""

    def __init__(self, raw: Any, source: str, prefix: str = ""):
        if not isinstance(raw, dict):
            where = f"{prefix.rstrip('.')} " if prefix else ""
            raise ModelFormatError(f"{source}: {where}must be a JSON object, got {type(raw).__name__}")
        self.raw, self.source, self.prefix = raw, source, prefix

    def error(self, message: str) -> ModelFormatError:
        return ModelFormatError(f"{self.source}: {message}")

    def name(self, key: str) -> str:
        return self.prefix + key

    def has(self, key: str) -> bool:
        # A null counts as absent: Hugging Face configs write e.g. "sliding_window": null for "none".
        return self.raw.get(key) is not None

    def integer(self, key: str, default=REQUIRED, minimum: int = 1):
        """An integer >= minimum: sizes and counts are positive unless the caller says otherwise."""
        if not self.has(key):
            return self._absent(key, default)
        value = self.raw[key]
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"{self.name(key)} must be an integer, got {value!r}")
        if value < minimum:
            bound = "positive" if minimum == 1 else f"at least {minimum}"
            raise self.error(f"{self.name(key)} must be {bound}, got {value}")
        return value

    def number(self, key: str, default=REQUIRED):
        """A positive number (rope bases, epsilons, scales) as a float."""
        if not self.has(key):
            return self._absent(key, default)
        value = self.raw[key]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.error(f"{self.name(key)} must be a number, got {value!r}")
        if not value > 0:
            raise self.error(f"{self.name(key)} must be positive, got {value}")
        return float(value)

    def boolean(self, key: str, default=REQUIRED):
        return self._typed(key, default, bool, "true or false")

    def string(self, key: str, default=REQUIRED):
        return self._typed(key, default, str, "a string")

    def array(self, key: str, default=REQUIRED):
        return self._typed(key, default, list, "a list")

    def section(self, key: str) -> Fields:
        """A nested object; empty when absent."""
        return Fields(self._typed(key, {}, dict, "an object"), self.source, f"{self.name(key)}.")

    def token_ids(self, key: str) -> list[int]:
        """One token id or a list of them; [] when absent."""
        value = self.raw.get(key)
        values = [] if value is None else value if isinstance(value, list) else [value]
        if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
            raise self.error(f"{self.name(key)} must be a token id or a list of them, got {value!r}")
        return values

    def _typed(self, key: str, default, kind: type, description: str):
        if not self.has(key):
            return self._absent(key, default)
        value = self.raw[key]
        if not isinstance(value, kind):
            raise self.error(f"{self.name(key)} must be {description}, got {value!r}")
        return value

    def _absent(self, key: str, default):
        if default is REQUIRED:
            raise self.error(f"lacks {self.name(key)}")
        return default


def check_attention(fields: Fields, heads: tuple[str, int], kv_heads: tuple[str, int], head_dim: tuple[str, int]):
    """(key, value) of the head counts and size: whole groups of query heads per KV head, and an even head
    size (rope rotates pairs of channels)."""
    (heads_key, num_heads), (kv_key, num_kv_heads), (dim_key, dim) = heads, kv_heads, head_dim
    if num_heads % num_kv_heads:
        raise fields.error(f"{heads_key} ({num_heads}) is not a multiple of {kv_key} ({num_kv_heads})")
    if dim % 2:
        raise fields.error(f"{dim_key} ({dim}) must be even")


# Gemma 3's layer against Llama's (ModelConfig's options), the same whichever file the model comes from.
GEMMA3 = {
    "hidden_act": "gelu_pytorch_tanh",
    "qk_norm": True,
    "sandwich_norms": True,
    "norm_weight_offset": 1.0,
    "scale_embeddings": True,
}
LAYER_TYPES = ("full_attention", "sliding_attention")


def sliding_pattern(num_layers: int, pattern: int) -> tuple[str, ...]:
    """Gemma 3's layer types when a file does not list them: every `pattern`-th layer global, the others
    sliding (transformers' rule; the reference configs use 6)."""
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers))
