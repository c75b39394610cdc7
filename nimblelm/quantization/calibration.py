"""Calibration: what the inputs of every linear layer look like on real text.

Samples are windows of `seq_len` tokens cut from one stream: the packaged ShareGPT conversations
(first prompt and first answer of each), in a seeded shuffle, tokenized with the model's tokenizer
and joined by blank lines. The windows run through the engine's own model one decoder layer at a time:
every window's hidden state goes through layer i (a prefill with the paged KV cache, as the
perplexity scorer runs it) before any goes through layer i + 1. A forward pre-hook on each Linear of the
layer folds its inputs into running statistics, so no activation is kept beyond the hidden states and a
small seeded subsample of rows.

Going layer by layer makes each layer's statistics final before the next layer starts, so the largest
of them, x^T x (K² floats per layer: 321 MB for a down_proj of Qwen2.5-Coder-1.5B, 9.8 GB over the
model), can leave memory as soon as its layer is done: when all of them would take over a quarter of
the machine's memory they move to unlinked temporary files, mapped back privately: file pages, which
the kernel reads in when GPTQ needs them and may drop under memory pressure.
"""

from __future__ import annotations

import os
import random
import tempfile
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from nimblelm import corpora
from nimblelm.errors import InvalidRequestError
from nimblelm.layers.linear import Linear
from nimblelm.platform import memory_total_bytes

CALIBRATION_SETS = ("sharegpt",)


def sharegpt_texts(seed: int) -> list[str]:
    pairs = corpora.sharegpt_pairs(corpora.load_sharegpt(corpora.sharegpt_path()))
    texts = [f"{prompt}\n\n{answer}" for prompt, answer in pairs]
    random.Random(seed).shuffle(texts)
    return texts


def calibration_samples(
    tokenizer, num_samples: int, seq_len: int, seed: int, texts: list[str] | None = None
) -> list[list[int]]:
    """`num_samples` windows of `seq_len` token ids from `texts` (default: the seeded ShareGPT stream)."""
    if num_samples < 1 or seq_len < 2:
        raise InvalidRequestError(f"calibration needs at least 1 sample of 2 tokens, got {num_samples} of {seq_len}")
    texts = sharegpt_texts(seed) if texts is None else texts
    needed = num_samples * seq_len
    stream: list[int] = []
    for text in texts:
        stream += tokenizer.encode(text + "\n\n", add_special_tokens=False)
        if len(stream) >= needed:
            return [stream[i * seq_len:(i + 1) * seq_len] for i in range(num_samples)]
    raise InvalidRequestError(
        f"calibration set too small: {len(stream)} tokens, fewer than {num_samples} samples of {seq_len}"
    )


@dataclass
class InputStats:
    """Running statistics of one linear layer's inputs x [tokens, K]."""

    rows_per_call: int
    generator: torch.Generator
    count: int = 0
    xtx: torch.Tensor | None = None  # sum of x^T x (GPTQ's Hessian is 2 xtx / count)
    abs_sum: torch.Tensor | None = None  # per input channel: sum of |x| (AWQ)
    abs_max: torch.Tensor | None = None  # per input channel: max |x| (SmoothQuant)
    rows: list[torch.Tensor] = field(default_factory=list)  # a seeded subsample, to measure output error

    def add(self, x: torch.Tensor) -> None:
        x = x.detach().float().reshape(-1, x.shape[-1])
        if self.xtx is None:
            k = x.shape[1]
            self.xtx, self.abs_sum, self.abs_max = torch.zeros(k, k), torch.zeros(k), torch.zeros(k)
        self.count += x.shape[0]
        self.xtx.addmm_(x.t(), x)
        self.abs_sum += x.abs().sum(0)
        torch.maximum(self.abs_max, x.abs().amax(0), out=self.abs_max)
        keep = torch.randperm(x.shape[0], generator=self.generator)[: self.rows_per_call]
        self.rows.append(x[keep].clone())

    def spill(self) -> None:
        """Move x^T x to an unlinked temporary file, mapped back (file pages, not process memory)."""
        k = self.xtx.shape[0]
        with tempfile.NamedTemporaryFile(prefix="nimblelm-xtx-", delete=False) as f:
            self.xtx.numpy().tofile(f)
        try:
            self.xtx = torch.from_file(f.name, shared=False, size=k * k).view(k, k)
        finally:
            os.unlink(f.name)  # the mapping keeps the data until the tensor goes

    @property
    def hessian(self) -> torch.Tensor:
        return 2 * self.xtx / self.count

    def take_hessian(self) -> torch.Tensor:
        """The Hessian, releasing x^T x: the largest statistic by far (K² floats, 321 MB for a 1.5B model's
        down_proj), which only GPTQ reads; the other methods' statistics stay."""
        h = self.hessian
        self.xtx = None
        return h

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / self.count

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)


def capture_inputs(
    runner, samples: list[list[int]], seed: int, max_rows: int = 512, progress: bool = True,
    names: list[str] | None = None, memory_bytes: int | None = None,
) -> dict[str, InputStats]:
    """Run every sample through the model of `runner` (the engine's ModelRunner, with no request in
    flight: each sample's blocks are taken from the start of its KV cache) layer by layer and return,
    for every Linear of its model (or those `names` lists) by module name, the statistics of its inputs
    (about max_rows rows kept). x^T x goes to files when all of it would take over a quarter of
    `memory_bytes` (default: this machine's memory)."""
    model = runner.model
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear) and (names is None or n in names)}
    widest = max(m.in_features for m in linears.values())
    total = sum(len(s) for s in samples)
    if total < widest:
        # Fewer tokens than inputs leave x^T x singular: GPTQ would rest on dampening alone.
        raise InvalidRequestError(
            f"calibration set too small: {total} tokens for layers with {widest} inputs; use more samples"
        )
    longest = max(len(s) for s in samples)
    if -(-longest // runner.block_size) > runner.num_blocks:
        raise InvalidRequestError(f"a calibration sample of {longest} tokens does not fit in the engine's KV cache")
    rows = -(-max_rows // len(samples))
    stats = {name: InputStats(rows, torch.Generator().manual_seed(seed)) for name in linears}
    xtx_bytes = 4 * sum(m.in_features ** 2 for m in linears.values())
    spill = xtx_bytes > ((memory_total_bytes() or 0) if memory_bytes is None else memory_bytes) / 4

    def observing(prefix: str):
        """Pre-hooks on the selected Linears whose names start with `prefix`."""
        return [m.register_forward_pre_hook(lambda _m, args, s=stats[n]: s.add(args[0]))
                for n, m in linears.items() if n.startswith(prefix)]

    def done(prefix: str) -> None:
        """The statistics of the Linears under `prefix` are final."""
        for name, s in stats.items():
            if spill and name.startswith(prefix) and s.xtx is not None:
                s.spill()

    with torch.inference_mode():
        windows = []  # per sample: per-layer attention metadata, rotary tables and (hidden, residual)
        for ids in samples:
            positions = torch.arange(len(ids), device=runner.device)
            metas = model.whole_prompt_metadata(len(ids), runner.block_size, runner.device)
            hidden = model.embed_tokens(torch.tensor(ids, dtype=torch.long, device=runner.device))
            windows.append((metas, model.rotary(positions), (hidden, None)))
        for i, layer in enumerate(tqdm(model.layers, desc="calibrating", unit="layer", disable=not progress)):
            hooks = observing(f"layers.{i}.")
            try:
                windows = [(metas, rope, layer(*state, rope, runner.kv_caches[i], metas[i]))
                           for metas, rope, state in windows]
            finally:
                for hook in hooks:
                    hook.remove()
            done(f"layers.{i}.")
        if "lm_head" in stats:
            for _, _, (hidden, residual) in windows:
                stats["lm_head"].add(model.norm(hidden + residual))
            done("lm_head")
    return stats
