"""SpeculativeConfig: which proposer drafts tokens and how many, shaped like vLLM's `speculative_config`."""

from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from nimblelm.errors import InvalidRequestError

METHODS = ("ngram", "draft_model", "suffix", "layer_skip", "medusa", "eagle", "lookahead")
# The methods that may propose token trees (speculative/tree.py).
TREE_METHODS = ("medusa", "eagle")
# (prompt_lookup_min, prompt_lookup_max) of the methods that look suffixes up, when not given. Suffix's are
# measured (SmolLM2-135M's greedy answers to 24 ShareGPT questions, 8M-token datastore, k = 4): a minimum of
# 1 proposes 10% more drafts for 2% more tokens per step, 3 loses 9% of them; maxima 8 and 16 draft the same.
LOOKUP_DEFAULTS = {"ngram": (1, 3), "suffix": (2, 16)}
# lookahead: the pooled n-grams verified with the window in a step, at most.
LOOKAHEAD_CANDIDATES = 2
# A step verifies a sequence's drafts and the token before them as decode rows; the model runner takes up to
# 16 such rows per sequence (MAX_DECODE_QUERY).
MAX_SPECULATIVE_TOKENS = 15


@dataclass(frozen=True)
class SpeculativeConfig:
    method: str
    num_speculative_tokens: int
    # ngram (prompt lookup) and suffix: the longest and shortest suffix of the tokens so far looked up earlier
    # in them (and for suffix in the datastore); None: the method's LOOKUP_DEFAULTS.
    prompt_lookup_max: int | None = None
    prompt_lookup_min: int | None = None
    # draft_model: the drafter (an alias, folder or .gguf with the target's tokenizer) and its own
    # quantization (None: unquantized, in the target's compute dtype). medusa (eagle): a heads file of `nimblelm
    # spec train --method medusa` (eagle) (None: the newest in the cache trained on the target).
    model: str | None = None
    quantization: str | None = None
    # suffix: a file of `nimblelm spec build-datastore` (None: the ShareGPT one built for the target's tokenizer).
    datastore: str | None = None
    # layer_skip: the target's layers (0-based) its drafting pass skips (None: those `nimblelm spec
    # search-layers` saved beside the model).
    skip_layers: list[int] | None = None
    # medusa: a token tree (vLLM's speculative_token_tree, Medusa's "choices"): each node as the path of
    # candidate ranks that reaches it, e.g. [[0], [1], [0, 0]] for the top two of the first head and the top
    # one of the second after the first's best. Its depth is num_speculative_tokens; None: a chain. eagle: one
    # whose nodes off the primary chain are leaves, zeros and then one rank ([0, 1]: the second-best second draft).
    speculative_token_tree: list[list[int]] | None = None

    def __post_init__(self):
        lo, hi = LOOKUP_DEFAULTS.get(self.method, (None, None))
        if self.prompt_lookup_min is None:
            object.__setattr__(self, "prompt_lookup_min", lo)
        if self.prompt_lookup_max is None:
            object.__setattr__(self, "prompt_lookup_max", hi)

    @classmethod
    def from_dict(cls, options: dict[str, Any] | SpeculativeConfig) -> SpeculativeConfig:
        """A config from vLLM-style options, or one clear error naming what is wrong."""
        if isinstance(options, SpeculativeConfig):
            return options
        if not isinstance(options, dict):
            raise InvalidRequestError(f"speculative_config must be a dict, got {type(options).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InvalidRequestError(f"speculative_config: unknown option(s) {', '.join(unknown)}")
        if "method" not in options or "num_speculative_tokens" not in options:
            raise InvalidRequestError("speculative_config needs 'method' and 'num_speculative_tokens'")
        config = cls(**options)
        config._validate()
        return config

    def _validate(self) -> None:
        def bad(msg: str) -> InvalidRequestError:
            return InvalidRequestError(f"speculative_config: {msg}")

        if self.method not in METHODS:
            raise bad(f"method {self.method!r} is not one of {', '.join(METHODS)}")
        k = self.num_speculative_tokens
        if not isinstance(k, int) or not 1 <= k <= MAX_SPECULATIVE_TOKENS:
            raise bad(f"num_speculative_tokens must be an integer in [1, {MAX_SPECULATIVE_TOKENS}], got {k!r}")
        trained = self.method in ("medusa", "eagle")
        if (self.method == "draft_model") != (self.model is not None) and not trained:
            raise bad("'model' names the drafter of method draft_model (or medusa's heads, eagle's layer), and only "
                      "of them")
        if trained and self.model is not None and not Path(self.model).expanduser().is_file():
            raise bad(f"{'Medusa heads' if self.method == 'medusa' else 'EAGLE draft layer'} not found: {self.model}")
        if self.quantization is not None and self.method != "draft_model":
            raise bad("'quantization' applies to a draft model only")
        if self.datastore is not None and self.method != "suffix":
            raise bad("'datastore' applies to method suffix only")
        if self.datastore is not None and not Path(self.datastore).expanduser().is_file():
            raise bad(f"datastore not found: {self.datastore}")
        if self.skip_layers is not None:
            if self.method != "layer_skip":
                raise bad("'skip_layers' applies to method layer_skip only")
            if not (isinstance(self.skip_layers, list) and self.skip_layers
                    and all(isinstance(i, int) and i >= 0 for i in self.skip_layers)):
                raise bad(f"'skip_layers' must be a non-empty list of layer indices, got {self.skip_layers!r}")
        if self.speculative_token_tree is not None:
            self._validate_tree(bad)
        lo, hi = self.prompt_lookup_min, self.prompt_lookup_max
        if self.method not in LOOKUP_DEFAULTS:
            if lo is not None or hi is not None:
                raise bad(f"'prompt_lookup_min' and 'prompt_lookup_max' apply to {' and '.join(LOOKUP_DEFAULTS)} only")
        elif not (isinstance(lo, int) and isinstance(hi, int) and 1 <= lo <= hi):
            raise bad(f"need integers 1 <= prompt_lookup_min <= prompt_lookup_max, got {lo!r} and {hi!r}")

    def _validate_tree(self, bad) -> None:
        tree = self.speculative_token_tree
        if self.method not in TREE_METHODS:
            raise bad(f"'speculative_token_tree' applies to {' and '.join(TREE_METHODS)} only")
        paths = [tuple(p) for p in tree] if isinstance(tree, list) and all(isinstance(p, (list, tuple)) for p in tree) else None
        if not paths or not all(p and all(isinstance(r, int) and r >= 0 for r in p) for p in paths):
            raise bad(f"'speculative_token_tree' must be a non-empty list of rank paths such as [[0], [1], [0, 0]], "
                      f"got {tree!r}")
        if len(set(paths)) != len(paths) or any(p[:-1] and p[:-1] not in set(paths) for p in paths):
            raise bad("'speculative_token_tree' must list each node once, and every node's parent path too")
        if self.method == "eagle" and any(any(p[:-1]) for p in paths):
            raise bad("eagle's trees branch off the primary chain only: each path is zeros and then one rank, "
                      "e.g. [[0], [1], [0, 0], [0, 1]]")
        if len(paths) > MAX_SPECULATIVE_TOKENS:
            raise bad(f"'speculative_token_tree' has {len(paths)} nodes; a step verifies at most {MAX_SPECULATIVE_TOKENS}")
        depth = max(map(len, paths))
        if depth != self.num_speculative_tokens:
            raise bad(f"'speculative_token_tree' is {depth} deep: set num_speculative_tokens to {depth}")

    @property
    def proposes_trees(self) -> bool:
        return self.speculative_token_tree is not None or self.method == "lookahead"

    @property
    def max_draft_nodes(self) -> int:
        """The most draft tokens a sequence verifies in a step: the tree's nodes, or the chain's length."""
        if self.method == "lookahead":  # its window and LOOKAHEAD_CANDIDATES n-grams, k tokens each
            return min(MAX_SPECULATIVE_TOKENS, (1 + LOOKAHEAD_CANDIDATES) * self.num_speculative_tokens)
        tree = self.speculative_token_tree
        return self.num_speculative_tokens if tree is None else len(tree)
