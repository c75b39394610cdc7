"""Medusa heads (Cai et al. 2024, Medusa-1): extra heads on the target's last hidden state, head i guessing the
token i + 1 places after the one that hidden state chose; each head's top-1 is a draft, a chain of k.

A head is a residual block, h + SiLU(W h + b), then the target's own final norm and output layer, frozen:
only the blocks are trained (medusa_train.py, `nimblelm spec train --method medusa`). The output layer may be
cut to the V tokens the target's answers use most (FR-Spec, Zhao et al. 2025): the heads then read V rows of
the 49k-row output matrix instead of all of them, for drafts that can only be among those V.

A heads file is safetensors: "resblock.weight" [heads, hidden, hidden], "resblock.bias" [heads, hidden],
"norm.weight" (the target's final norm, which identifies the target) and, for a cut vocabulary, "vocab_ids"
(the draft vocabulary's token ids); its metadata key METADATA_KEY holds a JSON object: the target, the
tokenizer's digest, the training cost and the heads' held-out accuracies.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from nimblelm.errors import InvalidRequestError
from nimblelm.layers.linear import Linear
from nimblelm.speculative.seen import Seen
from nimblelm.speculative.tree import DraftTree

METADATA_KEY = "nimblelm"
SUFFIX = ".medusa.safetensors"
# The target's final norm weights, relative to their size, may differ by this much from the file's and still
# be the same model: a bfloat16 checkpoint run in float32, or the same model quantized (norms stay in float).
NORM_TOLERANCE = 1e-2


@dataclass(frozen=True)
class HeadsKind:
    """What tells one trained method's files apart: the methods whose drafters `nimblelm spec train` writes
    (medusa; eagle.py's EAGLE) share the cache folder, the checks against the target and the errors."""

    method: str
    suffix: str
    what: str  # in messages: "Medusa heads"
    tensor: str  # one tensor every such file holds

    def hint(self) -> str:
        return (f"train them with `nimblelm spec train --method {self.method} --model MODEL` (MODEL as you gave "
                f"it here)")


MEDUSA = HeadsKind("medusa", SUFFIX, "Medusa heads", "resblock.weight")


def heads_dir() -> Path:
    from nimblelm.models.registry import cache_dir

    return cache_dir() / "spec_heads"


def default_path(model: str, kind: HeadsKind = MEDUSA) -> Path:
    """Where `nimblelm spec train --method medusa` (or kind's method) writes by default: one file per model (a
    file's stem for a .gguf, a folder's name, an alias as it is), as datastore.default_path names datastores."""
    name = Path(model).stem if model.endswith(".gguf") else Path(model).name
    return heads_dir() / f"{name}{kind.suffix}"


def residual_blocks(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """h [rows, hidden] through each head's block: [heads, rows, hidden]."""
    return h + F.silu(torch.baddbmm(bias[:, None, :], h.expand(len(weight), *h.shape), weight.transpose(1, 2)))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return F.rms_norm(x, weight.shape, weight, eps)


def output_rows(lm_head: Linear, vocab_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The output layer's weight rows of vocab_ids, float32 [len(vocab_ids), hidden]: read back from its
    storage where its format can, else the layer applied to the identity (exact: one-hot products)."""
    if lm_head.method.has_rows:
        return lm_head.method.rows(lm_head, vocab_ids).float().contiguous()
    with torch.inference_mode():
        weight = lm_head(torch.eye(lm_head.in_features, dtype=dtype, device=vocab_ids.device)).float()
    return weight[:, vocab_ids].T.contiguous()


class DraftOutput:
    """The output layer drafts are read from: the target's own, in its own storage format, or its rows of a cut
    draft vocabulary as a float32 layer of their own. Over tensor-parallel ranks each rank holds the rows of its
    vocabulary slice, and the logits are gathered (so every rank of the output stage drafts, in step)."""

    def __init__(self, model, vocab_ids: torch.Tensor | None, dtype: torch.dtype):
        self.tp = model.tp
        slices = [model.vocab] if self.tp is None else self.tp.vocab_slices(model.config.vocab_size)
        if vocab_ids is None:
            self.ids, self.layer, self.dtype = None, model.lm_head, dtype
            self.sizes = [len(v) for v in slices]
            return
        # Sorted, so that each rank's rows are one run of them and the gathered logits come in this order.
        self.ids = vocab_ids.to(model.norm.weight.device).sort().values
        self.sizes = [int(((self.ids >= v.start) & (self.ids < v.stop)).sum()) for v in slices]
        held = model.vocab
        local = self.ids[(self.ids >= held.start) & (self.ids < held.stop)] - held.start
        self.dtype, self.layer = torch.float32, None
        if len(local):  # a rank may hold none of a small draft vocabulary
            self.layer = Linear(model.config.hidden_size, len(local))
            self.layer.weight = torch.nn.Parameter(output_rows(model.lm_head, local, dtype), requires_grad=False)
            self.layer.prepare()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [rows, draft vocabulary] of x [rows, hidden]."""
        x = x.to(self.dtype)
        logits = self.layer(x) if self.layer is not None else x.new_zeros(len(x), 0)
        return logits if self.tp is None else self.tp.gather_columns(logits, self.sizes)

    def token_ids(self, index: torch.Tensor) -> torch.Tensor:
        """The tokens at indices of the logits' last dimension."""
        return index if self.ids is None else self.ids[index]


def read(path: str | os.PathLike, kind: HeadsKind = MEDUSA) -> tuple[dict[str, torch.Tensor], dict]:
    """A heads file's tensors and metadata; one clear error for a missing or foreign file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InvalidRequestError(f"speculative_config: {kind.what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[METADATA_KEY])
        tensors = load_file(str(path))
        if meta.get("method") != kind.method or kind.tensor not in tensors:
            raise ValueError(f"no {kind.what} in it")
    except (OSError, KeyError, ValueError, SafetensorError) as e:
        raise InvalidRequestError(f"speculative_config: {path} is not a heads file of `nimblelm spec train --method "
                                  f"{kind.method}` ({e})") from None
    return tensors, meta


def _fits(meta: dict, tensors: dict[str, torch.Tensor], config, norm_weight: torch.Tensor) -> str | None:
    """Why heads do not fit the target (None when they do)."""
    if meta["vocab_size"] != config.vocab_size:
        return (f"were trained on {meta['model']} (tokenizer of {meta['vocab_size']} tokens), the target's "
                f"vocabulary has {config.vocab_size}")
    if meta["hidden_size"] != config.hidden_size or meta["num_layers"] != config.num_layers:
        return (f"were trained on {meta['model']} ({meta['num_layers']} layers of {meta['hidden_size']}), the "
                f"target has {config.num_layers} of {config.hidden_size}")
    stored, own = tensors["norm.weight"].float(), norm_weight.detach().float().cpu()
    if (stored - own).norm() > NORM_TOLERANCE * own.norm():
        return f"were trained on {meta['model']}, another model with the target's shapes"
    return None


def open_for_target(path: str | None, config, norm_weight: torch.Tensor,
                    kind: HeadsKind = MEDUSA) -> tuple[dict[str, torch.Tensor], dict]:
    """The heads at path, or (None) the newest in the cache that fit the target, checked against it.

    The proposer is told the target's config and weights, not its name, so the default is found by them: the
    vocabulary, hidden size, layers and final norm weights the heads were trained with."""
    if path is not None:
        tensors, meta = read(path, kind)
        why = _fits(meta, tensors, config, norm_weight)
        if why is not None:
            raise InvalidRequestError(f"speculative_config: the {kind.what} {path} {why}: {kind.hint()}")
        return tensors, meta
    found = []
    for candidate in heads_dir().glob(f"*{kind.suffix}"):
        try:
            tensors, meta = read(candidate, kind)
        except InvalidRequestError:
            continue
        if _fits(meta, tensors, config, norm_weight) is None:
            found.append((candidate.stat().st_mtime, tensors, meta))
    if not found:
        raise InvalidRequestError(f"speculative_config: method {kind.method} found no {kind.what} trained for this "
                                  f"model in {heads_dir()}: {kind.hint()}, or give 'model' (a heads file)")
    _, tensors, meta = max(found, key=lambda f: f[0])
    return tensors, meta


class MedusaProposer:
    """Drafts from the heads, for every speculating sequence at once, on the hidden state of its last kept row:
    a chain of heads 1..k's top-1, or with a token tree (rank paths, vLLM's speculative_token_tree) each node's
    token the head of its depth's candidate of its rank. Heads read the hidden state only, so a depth's
    candidates are the same under every parent."""

    observes = True
    # One batched pass drafts every depth at once, a few percent of a step (SmolLM2-135M: 2.1 ms): the draft
    # budget prices rows only.
    pass_seconds = 0.0

    def __init__(self, path: str | None, num_speculative_tokens: int, runner,
                 token_tree: list[list[int]] | None = None):
        model = runner.model
        tensors, self.meta = open_for_target(path, runner.config, model.norm.weight)
        num_heads = len(tensors["resblock.weight"])
        if num_speculative_tokens > num_heads:
            raise InvalidRequestError(
                f"speculative_config: num_speculative_tokens={num_speculative_tokens}, but the Medusa heads "
                f"{path or 'found for the target'} guess {num_heads} tokens: ask for at most {num_heads}, or train "
                f"more with --num-heads")
        self.k = num_speculative_tokens
        self.tree = None if token_tree is None else _primary_first([tuple(p) for p in token_tree])
        device = runner.device
        self.weight = tensors["resblock.weight"][: self.k].float().to(device)
        self.bias = tensors["resblock.bias"][: self.k].float().to(device)
        self.norm_weight = model.norm.weight.detach().float()
        self.eps = runner.config.rms_norm_eps
        self.output = DraftOutput(model, tensors.get("vocab_ids"), runner.dtype)
        self.hidden: dict[int, torch.Tensor] = {}  # per sequence, the hidden state of its last kept row

    def observe(self, seen: dict[int, Seen]) -> None:
        for req_id, s in seen.items():
            self.hidden[req_id] = s.hidden[-1]

    @torch.inference_mode()
    def propose_all(self, requests: dict[int, tuple[list[int], int, int]]) -> dict[int, list[int] | DraftTree]:
        """Per sequence (its tokens, prompt length, room for drafts), up to min(k, room) drafts deep: a chain,
        or the tree (the model runner cuts it to the room)."""
        if not requests:
            return {}
        rooms = [room for _, _, room in requests.values()]
        k = self.k if self.tree is not None else min(self.k, max(rooms))
        hidden = torch.stack([self.hidden[req_id] for req_id in requests]).float()
        blocks = residual_blocks(hidden, self.weight[:k], self.bias[:k])
        normed = rms_norm(blocks, self.norm_weight, self.eps).reshape(-1, hidden.shape[1])
        logits = self.output(normed).view(k, len(rooms), -1)
        if self.tree is None:
            best = self.output.token_ids(logits.argmax(-1))
            return {req_id: row[:room] for req_id, row, room in zip(requests, best.T.tolist(), rooms) if room > 0}
        ranks = 1 + max(r for path in self.tree for r in path)
        top = self.output.token_ids(logits.topk(ranks, dim=-1).indices).tolist()  # [depth, sequences, ranks]
        out = {}
        for i, req_id in enumerate(requests):
            index = {(): -1}
            tokens, parents = [], []
            for path in self.tree:
                index[path] = len(tokens)
                tokens.append(top[len(path) - 1][i][path[-1]])
                parents.append(index[path[:-1]])
            out[req_id] = DraftTree(tokens, parents)
        return out

    def forget(self, req_ids: list[int]) -> None:
        for req_id in req_ids:
            self.hidden.pop(req_id, None)


def _primary_first(paths: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """A tree's rank paths with the top-1 chain first (the model runner keeps a tree's first nodes when
    there is room for only some), then the rest by depth, in the order given."""
    chain = sorted((p for p in paths if not any(p)), key=len)
    return chain + sorted((p for p in paths if any(p)), key=len)
