"""Calibration: what the inputs of every linear layer look like on real text.

Samples are windows of `seq_len` tokens cut from one stream: the packaged ShareGPT conversations
(first prompt and first answer of each), in a seeded shuffle, tokenized with the model's tokenizer
and joined by blank lines. Each window runs through the engine's own model in one prefill (the
perplexity scorer's forward), and a forward pre-hook on every Linear folds that layer's inputs into
running statistics, so no activation is kept beyond a small seeded subsample of rows.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch
from tqdm import tqdm

from nimblelm.errors import InvalidRequestError
from nimblelm.layers.linear import Linear

CALIBRATION_SETS = ("sharegpt",)


def sharegpt_texts(seed: int) -> list[str]:
    from nimblelm.bench import datasets

    pairs = datasets.sharegpt_pairs(datasets.load_sharegpt(datasets.sharegpt_path()))
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
    scorer, samples: list[list[int]], seed: int, max_rows: int = 512, progress: bool = True,
    names: list[str] | None = None,
) -> dict[str, InputStats]:
    """Run every sample through `scorer` (a nimblelm.eval.ppl.NimbleLMScorer) and return, for every
    Linear of its model (or those `names` lists) by module name, the statistics of its inputs (about
    max_rows rows kept)."""
    model = scorer.runner.model
    linears = {n: m for n, m in model.named_modules() if isinstance(m, Linear) and (names is None or n in names)}
    widest = max(m.in_features for m in linears.values())
    total = sum(len(s) for s in samples)
    if total < widest:
        # Fewer tokens than inputs leave x^T x singular: GPTQ would rest on dampening alone.
        raise InvalidRequestError(
            f"calibration set too small: {total} tokens for layers with {widest} inputs; use more samples"
        )
    rows = -(-max_rows // len(samples))
    stats = {name: InputStats(rows, torch.Generator().manual_seed(seed)) for name in linears}
    hooks = [m.register_forward_pre_hook(lambda _m, args, s=stats[name]: s.add(args[0])) for name, m in linears.items()]
    try:
        for ids in tqdm(samples, desc="calibrating", unit="sample", disable=not progress):
            scorer(ids)
    finally:
        for hook in hooks:
            hook.remove()
    return stats
