"""Self-speculation by layer skipping (Draft & Verify, Zhang et al. 2023): the target drafts with a subset
of its own layers, and verifies the drafts with all of them. No second model, no training: a short search
on calibration text chooses the layers, and its result is saved beside the model.

The drafts read the target's own KV cache: the kept layers attend over the K/V that the full model wrote
for every verified token, which is what those layers see when the whole model runs. Their own K/V, of
tokens not yet verified, go to scratch blocks past the engine's (ModelRunner.allocate_kv reserves them):
a sequence's table for drafting is its blocks before the first draft position, then scratch blocks, the
first a copy of the sequence's partly filled block. The sequence's blocks are never written, so nothing
needs rolling back, and the verification step writes every layer's K/V of the kept drafts where they belong.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from nimblelm.errors import InvalidRequestError
from nimblelm.layers.attention import AttentionMetadata
from nimblelm.layers.kivi import LowBitPlan
from nimblelm.speculative.budget import PassTime

# Sequences drafted in one pass; the scratch blocks reserved hold this many sequences' drafts at once.
DRAFT_CHUNK = 32
FILENAME = "layer_skip.json"
# Layers scored again in each round of the search after the first.
RESCORED = 8


def scratch_blocks(num_speculative_tokens: int, block_size: int, num_kv_groups: int) -> int:
    """KV blocks a runner reserves for drafting: per sequence and KV group, those its k - 1 written draft
    positions and the token before them can span, starting anywhere in a block."""
    per_seq = (block_size - 1 + num_speculative_tokens - 1) // block_size + 1
    return DRAFT_CHUNK * num_kv_groups * per_seq


class LayerSkipProposer:
    observes = False

    def __init__(self, runner, skip_layers: list[int], num_speculative_tokens: int, first_scratch: int):
        """runner: the target's ModelRunner, whose KV blocks from first_scratch on are this proposer's."""
        num_layers = runner.config.num_layers
        skipped = set(skip_layers)
        if not skipped < set(range(num_layers)):
            raise InvalidRequestError(f"speculative_config: skip_layers {sorted(skip_layers)} must be some, not all, "
                                      f"of the target's layers 0..{num_layers - 1}")
        self.runner = runner
        self.k = num_speculative_tokens
        self.layers = [i for i in range(runner.config.num_layers) if i not in skipped]
        self.first_scratch = first_scratch
        self.per_seq = (runner.block_size - 1 + self.k - 1) // runner.block_size + 1
        self._pass_time = PassTime()

    @property
    def pass_seconds(self) -> float:
        return self._pass_time.seconds

    def forget(self, req_ids: list[int]) -> None:
        """Nothing is kept per sequence."""

    @torch.inference_mode()
    def propose_all(self, requests: dict[int, tuple[list[int], int, int]]) -> dict[int, list[int]]:
        """Per sequence (its tokens, prompt length, room for drafts), up to min(k, room) greedy drafts."""
        drafts: dict[int, list[int]] = {}
        items = [(req_id, tokens, room) for req_id, (tokens, _, room) in requests.items() if room > 0]
        for at in range(0, len(items), DRAFT_CHUNK):
            drafts.update(self._propose_chunk(items[at : at + DRAFT_CHUNK]))
        return drafts

    def _propose_chunk(self, items: list[tuple[int, list[int], int]]) -> dict[int, list[int]]:
        runner, bs = self.runner, self.runner.block_size
        num_groups = len(runner.kv_groups)
        tables = [[] for _ in range(num_groups)]  # per group, per sequence: its drafting block table
        starts = [[] for _ in range(num_groups)]  # per group, per sequence: the KV entry of its newest token
        for n, (req_id, tokens, _) in enumerate(items):
            state = runner.seqs[req_id]
            for g in range(num_groups):
                entry = len(tokens) - 1 - state.kv_offsets[g]
                own, block = state.block_ids[g], entry // bs
                scratch = [self.first_scratch + (n * num_groups + g) * self.per_seq + i for i in range(self.per_seq)]
                if block < len(own):  # the block holds verified tokens before the newest one
                    self._copy_block(g, own[block], scratch[0])
                tables[g].append(own[:block] + scratch)
                starts[g].append(entry)
        out = {req_id: [] for req_id, _, _ in items}
        last = {req_id: tokens[-1] for req_id, tokens, _ in items}
        device = runner.device
        for step in range(self.k):
            rows = [n for n, (req_id, _, room) in enumerate(items) if len(out[req_id]) < min(self.k, room)]
            if not rows:
                break
            positions = [len(items[n][1]) - 1 + step for n in rows]
            group_metas = []
            for g in range(num_groups):
                entries = [starts[g][n] + step for n in rows]
                row_tables = [tables[g][n] for n in rows]
                width = max(map(len, row_tables))
                block_tables = torch.tensor([t + [0] * (width - len(t)) for t in row_tables], device=device)
                slots = torch.tensor([t[e // bs] * bs + e % bs for t, e in zip(row_tables, entries)], device=device)
                contexts = torch.tensor([e + 1 for e in entries], device=device)
                window = runner.kv_groups[g].window
                mask = None if runner.kernels else AttentionMetadata.decode_mask_for(contexts, width * bs, window)
                lowbit = None
                if runner.kv_bits is not None:  # each row writes the sequence's ring, as the verifying row will
                    spans = [(i, e, 1, t, runner._residual_slot(items[n][0], g), None)
                             for i, (n, e, t) in enumerate(zip(rows, entries, row_tables))]
                    lowbit = LowBitPlan.build(spans, len(rows), bs, runner.residual_length, runner.ring_length, device)
                group_metas.append(AttentionMetadata.decodes(slots, block_tables, contexts, window, mask,
                                                             lowbit=lowbit))
            ids = torch.tensor([last[items[n][0]] for n in rows], device=device)
            metas = [group_metas[g] for g in runner.group_of_layer]
            t0 = time.perf_counter()
            hidden = runner.model(ids, torch.tensor(positions, device=device), runner.kv_caches, metas, self.layers)
            chosen = runner.model.compute_logits(hidden).argmax(-1).tolist()
            self._pass_time.add(time.perf_counter() - t0)
            for n, token in zip(rows, chosen):
                req_id = items[n][0]
                out[req_id].append(token)
                last[req_id] = token
        return {req_id: d for req_id, d in out.items() if d}

    def _copy_block(self, group: int, src: int, dst: int) -> None:
        """Block src of the group's kept layers into block dst, K/V (and int8 scales)."""
        for layer in self.layers:
            if self.runner.group_of_layer[layer] == group:
                cache = self.runner.kv_caches[layer]
                cache.values[:, dst] = cache.values[:, src]
                if cache.scales is not None:
                    cache.scales[:, dst] = cache.scales[:, src]


def saved_path(model: str) -> Path:
    """Where the search's result lives: in the model's folder, or beside its .gguf file."""
    from nimblelm.models.registry import resolve

    path = resolve(model, progress=False)
    return path / FILENAME if path.is_dir() else path.with_name(f"{path.name}.{FILENAME}")


def saved_skip_layers(model: str) -> list[int]:
    """The layers the saved search chose to skip, or one clear error saying how to search."""
    path = saved_path(model)
    if not path.is_file():
        raise InvalidRequestError(
            f"speculative_config: method layer_skip needs 'skip_layers' or a layer search saved for this model "
            f"(none at {path}): run `nimblelm spec search-layers --model {model}`")
    found = json.loads(path.read_text())
    if not found["skip_layers"]:
        raise InvalidRequestError(
            f"speculative_config: the layer search saved at {path} found no layers whose skipping pays on this "
            f"model (every subset it tried modeled a speedup of {found['modeled_speedup']} or less)")
    return found["skip_layers"]


def expected_tokens(agreement: float, k: int) -> float:
    """Tokens a verification step emits when each of k drafts is kept with probability `agreement` (the
    first rejected one ends the run) plus the target's own token."""
    return sum(agreement**j for j in range(k + 1))


def search(model: str, *, num_speculative_tokens: int = 4, corpus: str = "sharegpt", tokens: int = 512,
           window: int = 256, threads: int | None = None, output: str | None = None,
           progress: bool = True) -> tuple[Path, dict]:
    """Choose the layers to skip and save them (default: saved_path(model)).

    Calibration: windows of the corpus (as build-datastore reads it: ShareGPT's replies by default). Each
    round takes out the two layers whose absence changes the fewest greedy next-token choices of the full
    model (teacher forced: every position a draft's first token). Every subset on this path is scored by
    the speedup it models, tokens per step over the step's cost, expected_tokens(agreement, k) / (1 + k * c),
    with c the drafting pass's share of the weights a full step reads. The best is saved, with the path, so
    that a user sees what was traded."""
    from nimblelm import LLM
    from nimblelm.speculative.datastore import corpus_documents

    if tokens <= 0:
        raise InvalidRequestError(f"search-layers: --tokens must be > 0, got {tokens}")
    window = min(window, tokens)
    started = time.perf_counter()
    llm = LLM(model=model, max_model_len=window, max_num_seqs=1, num_threads=threads, enforce_eager=True)
    runner = llm.llm_engine.runner
    net = runner.model
    ids: list[int] = []
    for text in corpus_documents(corpus):
        ids += llm.get_tokenizer().encode(text, add_special_tokens=False)
        if len(ids) >= tokens:
            break
    ids = ids[:tokens]
    windows = [ids[i : i + window] for i in range(0, len(ids), window)]
    if not windows:
        raise InvalidRequestError(f"search-layers: the corpus {corpus} has no text")
    cfg = net.config
    num_layers = cfg.num_layers
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    layer_weights = cfg.hidden_size * (2 * q + 2 * kv) + 3 * cfg.hidden_size * cfg.intermediate_size
    head_weights = cfg.hidden_size * cfg.vocab_size

    def cost(kept: int) -> float:
        return (kept * layer_weights + head_weights) / (num_layers * layer_weights + head_weights)

    with torch.inference_mode():
        inputs = []  # per window: metadata, rope tables, embedded tokens
        for w in windows:
            positions = torch.arange(len(w), device=runner.device)
            metas = net.whole_prompt_metadata(len(w), runner.block_size, runner.device)
            inputs.append((metas, net.rotary(positions), net.embed(torch.tensor(w, device=runner.device))))

        def run(kept: list[int], states=None, start: int = 0) -> tuple[list, list[torch.Tensor]]:
            """Each window through the kept layers from index `start` of the model on: (the state entering
            every kept layer from start, per window; the greedy tokens)."""
            entering, choices = [], []
            for n, (metas, rope, x) in enumerate(inputs):
                x, residual = (x, None) if states is None else states[n]
                seen = []
                # The layers' norms add into x and residual in place: what is kept is copied first.
                x, residual = x.clone(), None if residual is None else residual.clone()
                for i in (i for i in kept if i >= start):
                    seen.append((i, x.clone(), None if residual is None else residual.clone()))
                    x, residual = net.layers[i](x, residual, rope, runner.kv_caches[i], metas[i])
                hidden = x if residual is None else x + residual
                entering.append(seen)
                choices.append(net.compute_logits(hidden).argmax(-1))
            return entering, choices

        kept = list(range(num_layers))
        entering, reference = run(kept)
        total = sum(len(c) for c in reference)

        def agreement(choices) -> float:
            return sum((a == b).sum().item() for a, b in zip(choices, reference)) / total

        k = num_speculative_tokens
        path = [{"kept": num_layers, "agreement": 1.0, "modeled_speedup": (k + 1) / (1 + k)}]
        rounds = tqdm(total=num_layers - 1, desc="searching layers", unit="layer", disable=not progress)
        best = (path[0]["modeled_speedup"], [])
        ranking = list(kept)  # the layers by how little taking them out cost when last scored, least first
        while len(kept) > 1:
            # Scores change little from round to round: the first round scores every layer, later ones
            # only the RESCORED best of the last ranking.
            candidates = ranking if len(ranking) == num_layers else ranking[:RESCORED]
            scores = {}
            for i in candidates:
                states = [next((x, r) for j, x, r in seen if j == i) for seen in entering]
                scores[i] = agreement(run([j for j in kept if j != i], states, i)[1])
            ranking = sorted(candidates, key=scores.get, reverse=True) + ranking[len(candidates):]
            for i in ranking[: min(2, len(kept) - 1)]:
                kept.remove(i)
                rounds.update()
            ranking = [i for i in ranking if i in kept]
            entering, choices = run(kept)
            a = agreement(choices)
            speedup = expected_tokens(a, k) / (1 + k * cost(len(kept)))
            path.append({"kept": len(kept), "skip_layers": [i for i in range(num_layers) if i not in kept],
                         "agreement": round(a, 4), "modeled_speedup": round(speedup, 3)})
            if speedup > best[0]:
                best = (speedup, path[-1]["skip_layers"])
            if a < 0.2:  # past use: every later subset drafts worse still
                break
        rounds.close()
    found = {"num_layers": num_layers, "skip_layers": best[1], "modeled_speedup": round(best[0], 3),
             "num_speculative_tokens": k, "corpus": corpus, "calibration_tokens": total, "search_seconds": round(time.perf_counter() - started, 1),
             "threads": llm.llm_engine.num_threads, "path": path}
    out = Path(output) if output else saved_path(model)
    out.write_text(json.dumps(found, indent=1))
    return out, found
