"""`nimblelm spec train --method medusa`: Medusa-1 heads by self-distillation (medusa.py has the heads).

1. The target answers ShareGPT first questions in its chat template, greedily, batched in nimblelm's own
   engine. The questions come from the far end of the seeded order the benchmarks take theirs from the front
   of (bench/datasets.py, seed 0), past BENCH_RESERVED of them, and none is the text of one of those.
2. One prefill pass per prompt + answer in a scratch KV cache gives the target's last hidden state (before
   the final norm) at every position: the features.
3. The labels are the target's own answer tokens: the hidden state at position t chose token t + 1, and
   head i (from 0) learns token t + i + 2. Rows run from the prompt's last position (the one the engine
   hands the proposer after a prefill) on; a head has no label past the answer's end.
4. Only the heads' residual blocks learn (AdamW, cross-entropy weighted LOSS_DECAY^i for head i, as Medusa
   does), from zero weights, where each head starts as the target's own next-token guess.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tqdm import tqdm

from nimblelm.errors import InvalidRequestError
from nimblelm.speculative.config import MAX_SPECULATIVE_TOKENS
from nimblelm.speculative.medusa import METADATA_KEY, default_path, output_rows, residual_blocks, rms_norm

DEFAULT_NUM_HEADS = 4
# SmolLM2-135M with these on 2 threads: 21 minutes (generating 11, hidden states 7.5, training 2.3).
DEFAULT_PROMPTS = 512
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_EPOCHS = 3
# SmolLM2-135M, 8 chat requests at batch 1: a cut vocabulary kept as many drafts as the whole one and drafted
# in 2.1 ms per step against 9.5 (its 49k-row output matrix is a fifth of a decode step's weight bytes).
DEFAULT_VOCAB = 8192
# The benchmarks' chat workloads take ShareGPT questions from the front of BENCH_SEED's order (a few hundred
# at most); training never takes one of the first BENCH_RESERVED, nor one with the text of one of them.
BENCH_SEED = 0
BENCH_RESERVED = 4096
MAX_PROMPT_TOKENS = 512  # longer questions (pasted documents) teach the heads little per token of prefill
HELD_OUT = 0.1  # of the answers: the accuracies in the metadata are measured on them
LOSS_DECAY = 0.8
LEARNING_RATE = 3e-3  # on 86 SmolLM2 answers, 3e-3 beat 1e-3 in held-out accuracy (1e-2 no further)
BATCH_ROWS = 256


def training_questions(pairs: list[tuple[str, str]]) -> Iterator[str]:
    """Distinct first questions from the end of the benchmarks' seeded order back, none of them among (or the
    text of one of) its first BENCH_RESERVED."""
    order = list(range(len(pairs)))
    random.Random(BENCH_SEED).shuffle(order)  # as bench/datasets.py's _filtered_pairs orders them
    reserved = {pairs[i][0] for i in order[:BENCH_RESERVED]}
    seen = set()
    for i in reversed(order[BENCH_RESERVED:]):
        question = pairs[i][0]
        if question.strip() and question not in reserved and question not in seen:
            seen.add(question)
            yield question


def chat_prompts(questions: Iterator[str], tokenizer, num: int, longest: int) -> list[list[int]]:
    """The first num questions whose chat prompt (the model's template, generation prompt on) has at most
    longest tokens, as token ids."""
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidRequestError("spec train: the model's tokenizer has no chat template to put questions in")
    prompts = []
    for question in questions:
        text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                             add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]  # the template wrote the special tokens
        if len(ids) <= longest:
            prompts.append(ids)
            if len(prompts) == num:
                return prompts
    raise InvalidRequestError(f"--prompts: ShareGPT has {len(prompts)} questions of up to {longest} "
                              f"tokens outside the benchmarks' first {BENCH_RESERVED}, fewer than the {num} asked for")


def label_rows(token_ids: list[int], prompt_len: int, num_heads: int) -> tuple[list[int], list[list[int]]]:
    """The positions whose hidden states train the heads, and per position each head's label (-1: none):
    head i at position t learns token t + i + 2, for positions from the prompt's last one on that give head 0
    an answer token to learn."""
    positions = list(range(prompt_len - 1, len(token_ids) - 2))
    labels = [[token_ids[t + i + 2] if t + i + 2 < len(token_ids) else -1 for i in range(num_heads)]
              for t in positions]
    return positions, labels


def scratch_kv(runner, num_tokens: int) -> list:
    """A KV cache of the runner's model for one text of up to num_tokens, apart from the engine's own."""
    from nimblelm.layers.attention import KVCache

    cfg, bs = runner.config, runner.block_size
    shape = (2, -(-num_tokens // bs), bs, cfg.num_kv_heads, cfg.head_dim)
    return [KVCache(torch.zeros(shape, dtype=runner.dtype, device=runner.device)) for _ in range(cfg.num_layers)]


def hidden_states(runner, token_ids: list[int], kv: list) -> torch.Tensor:
    """The target's last hidden state (before its final norm) at every position of one text, in one prefill
    into the scratch KV cache kv."""
    device = runner.device
    metas = runner.model.whole_prompt_metadata(len(token_ids), runner.block_size, device)
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    with torch.inference_mode():
        return runner.model(ids, torch.arange(len(token_ids), device=device), kv, metas)


@dataclass
class Dataset:
    features: torch.Tensor  # [rows, hidden] float32
    labels: torch.Tensor  # [rows, heads] int64 token ids, -1 where a head has no label


def _features(llm, texts: list[tuple[list[int], list[int]]], num_heads: int, progress: bool, desc: str) -> Dataset:
    runner = llm.llm_engine.runner
    kv = scratch_kv(runner, max(len(p) + len(a) for p, a in texts))
    features, labels = [], []
    for prompt, answer in tqdm(texts, desc=desc, unit="text", disable=not progress):
        positions, rows = label_rows(prompt + answer, len(prompt), num_heads)
        if positions:
            features.append(hidden_states(runner, prompt + answer, kv)[positions].float().cpu())
            labels += rows
    if not features:
        raise InvalidRequestError("the target's answers are too short to train heads on: raise --max-new-tokens")
    return Dataset(torch.cat(features), torch.tensor(labels, dtype=torch.long))


def draft_vocabulary(answers: list[list[int]], size: int, vocab_size: int) -> torch.Tensor | None:
    """The size most frequent tokens of the answers (by count, then id), sorted by id; None for the whole
    vocabulary (size 0, or at least every token)."""
    if size == 0 or size >= vocab_size:
        return None
    counts = torch.bincount(torch.tensor([t for a in answers for t in a], dtype=torch.long), minlength=vocab_size)
    seen = int((counts > 0).sum())
    top = torch.argsort(-counts, stable=True)[: min(size, seen)]
    return torch.sort(top).values


class _Heads(torch.nn.Module):
    def __init__(self, num_heads: int, hidden: int, norm_weight: torch.Tensor, eps: float, out: torch.Tensor):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(num_heads, hidden, hidden))
        self.bias = torch.nn.Parameter(torch.zeros(num_heads, hidden))
        self.register_buffer("norm_weight", norm_weight)
        self.register_buffer("out", out)
        self.eps = eps

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Logits [heads, rows, draft vocabulary]."""
        return F.linear(rms_norm(residual_blocks(h, self.weight, self.bias), self.norm_weight, self.eps), self.out)


def _in_vocab(labels: torch.Tensor, vocab_ids: torch.Tensor | None, vocab_size: int) -> torch.Tensor:
    """Labels as indices into the draft vocabulary; -1 where there is none or the token is outside it."""
    if vocab_ids is None:
        return labels
    index = torch.full((vocab_size + 1,), -1, dtype=torch.long)  # slot vocab_size: label -1 stays -1
    index[vocab_ids] = torch.arange(len(vocab_ids))
    return index[torch.where(labels < 0, vocab_size, labels)]


def _accuracies(heads: _Heads, data: Dataset, vocab_ids: torch.Tensor | None) -> list[float]:
    """Per head, the share of its labelled held-out rows where its top-1 is the label (a label outside the
    draft vocabulary is a miss)."""
    hits = torch.zeros(len(heads.weight))
    total = (data.labels >= 0).sum(0).clamp(min=1)
    with torch.no_grad():
        for start in range(0, len(data.features), BATCH_ROWS):
            best = heads(data.features[start : start + BATCH_ROWS]).argmax(-1).T
            if vocab_ids is not None:
                best = vocab_ids[best]
            labels = data.labels[start : start + BATCH_ROWS]
            hits += ((best == labels) & (labels >= 0)).sum(0)
    return (hits / total).tolist()


def _train(heads: _Heads, data: Dataset, targets: torch.Tensor, epochs: int, progress: bool) -> float:
    """Fit the residual blocks; the mean loss of the last epoch."""
    weights = torch.tensor([LOSS_DECAY**i for i in range(len(heads.weight))])
    steps_per_epoch = math.ceil(len(data.features) / BATCH_ROWS)
    optimizer = torch.optim.AdamW([heads.weight, heads.bias], lr=LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LEARNING_RATE, total_steps=epochs * steps_per_epoch,
                                                   pct_start=0.05)
    generator = torch.Generator().manual_seed(0)
    with tqdm(total=epochs * steps_per_epoch, desc="training", unit="batch", disable=not progress) as bar:
        for _ in range(epochs):
            total, order = 0.0, torch.randperm(len(data.features), generator=generator)
            for start in range(0, len(order), BATCH_ROWS):
                rows = order[start : start + BATCH_ROWS]
                logits, labels = heads(data.features[rows]), targets[rows].T  # [heads, rows, V], [heads, rows]
                per_head = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-1,
                                           reduction="none").view(labels.shape)
                counts = (labels >= 0).sum(1).clamp(min=1)
                loss = (weights * per_head.sum(1) / counts).sum()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                total += loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}")
    return total / steps_per_epoch


def distill(llm, pairs: list[tuple[str, str]], num_prompts: int, max_new_tokens: int,
            progress: bool) -> list[tuple[list[int], list[int]]]:
    """(prompt, answer) token ids: the target's greedy answers to num_prompts training questions, batched."""
    from nimblelm import SamplingParams

    max_model_len = llm.llm_engine.config.max_model_len
    longest = min(MAX_PROMPT_TOKENS, max_model_len - max_new_tokens)
    if longest < 1:
        raise InvalidRequestError(f"--max-new-tokens {max_new_tokens} leaves no room for a prompt in the model's "
                                  f"{max_model_len} positions")
    prompts = chat_prompts(training_questions(pairs), llm.tokenizer, num_prompts, longest)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=max_new_tokens), use_tqdm=progress)
    return [(p, list(o.outputs[0].token_ids)) for p, o in zip(prompts, outs)]


def train_medusa(model: str, *, num_heads: int = DEFAULT_NUM_HEADS, num_prompts: int = DEFAULT_PROMPTS,
                 max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, epochs: int = DEFAULT_EPOCHS,
                 vocab_size: int = DEFAULT_VOCAB, threads: int | None = None, output: str | os.PathLike | None = None,
                 dataset_path: str | None = None, progress: bool = True) -> tuple[Path, dict]:
    """Distill, train and write Medusa heads for model; returns the file and its metadata."""
    from nimblelm import LLM, corpora
    from nimblelm.platform import physical_cores
    from nimblelm.speculative.datastore import tokenizer_digest

    if not 1 <= num_heads <= MAX_SPECULATIVE_TOKENS:
        raise InvalidRequestError(f"--num-heads must be in [1, {MAX_SPECULATIVE_TOKENS}], got {num_heads}")
    if num_prompts < 2:
        raise InvalidRequestError(f"--prompts must be at least 2 (one answer is held out), got {num_prompts}")
    if max_new_tokens < 2 or epochs < 1 or vocab_size < 0:
        raise InvalidRequestError("--max-new-tokens must be >= 2, --epochs >= 1 and --vocab-size >= 0 (0: all)")
    threads = threads or physical_cores()
    pairs = corpora.sharegpt_pairs(corpora.load_sharegpt(corpora.sharegpt_path(dataset_path)))
    start = time.perf_counter()
    llm = LLM(model, num_threads=threads)
    tokenizer, cfg = llm.tokenizer, llm.model_config
    texts = distill(llm, pairs, num_prompts, max_new_tokens, progress)
    generated = time.perf_counter()

    held = max(1, round(HELD_OUT * len(texts)))
    train_texts, test_texts = texts[held:], texts[:held]
    train = _features(llm, train_texts, num_heads, progress, "features")
    test = _features(llm, test_texts, num_heads, progress, "held-out features")
    featured = time.perf_counter()

    torch.set_num_threads(threads)
    runner = llm.llm_engine.runner
    vocab_ids = draft_vocabulary([a for _, a in train_texts], vocab_size, cfg.vocab_size)
    everything = torch.arange(cfg.vocab_size, device=runner.device)
    out = output_rows(runner.model.lm_head, everything if vocab_ids is None else vocab_ids.to(runner.device),
                      runner.dtype).cpu()
    norm_weight = runner.model.norm.weight.detach().float().cpu()
    digest, eps = tokenizer_digest(tokenizer), cfg.rms_norm_eps
    del llm, runner
    heads = _Heads(num_heads, cfg.hidden_size, norm_weight, eps, out)
    loss = _train(heads, train, _in_vocab(train.labels, vocab_ids, cfg.vocab_size), epochs, progress)
    accuracies = _accuracies(heads, test, vocab_ids)
    trained = time.perf_counter()

    wall = trained - start
    meta = {
        "method": "medusa", "model": model, "architecture": cfg.architecture, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "tokenizer_digest": digest,
        "num_heads": num_heads, "draft_vocab_size": cfg.vocab_size if vocab_ids is None else len(vocab_ids),
        "vocab_map": "the whole vocabulary" if vocab_ids is None else "tensor vocab_ids: the token id of each row",
        "prompts": len(train_texts), "held_out_prompts": len(test_texts), "max_new_tokens": max_new_tokens,
        "epochs": epochs, "train_tokens": len(train.features), "held_out_tokens": len(test.features),
        "final_loss": round(loss, 4), "held_out_accuracy": [round(a, 4) for a in accuracies],
        "cost": {"threads": threads, "generate_s": round(generated - start, 2),
                 "features_s": round(featured - generated, 2), "train_s": round(trained - featured, 2),
                 "wall_s": round(wall, 2), "cpu_hours": round(threads * wall / 3600, 4)},
    }
    path = Path(output).expanduser() if output is not None else default_path(model)
    write_heads(path, heads, vocab_ids, meta)
    return path, meta


def write_heads(path: Path, heads: _Heads, vocab_ids: torch.Tensor | None, meta: dict) -> None:
    tensors = {"resblock.weight": heads.weight.detach().contiguous(), "resblock.bias": heads.bias.detach().contiguous(),
               "norm.weight": heads.norm_weight}
    write_file(path, tensors, vocab_ids, meta)


def write_file(path: Path, tensors: dict[str, torch.Tensor], vocab_ids: torch.Tensor | None, meta: dict) -> None:
    """A trained drafter's tensors (and the draft vocabulary's ids) with its metadata, written whole."""
    if vocab_ids is not None:
        tensors = {**tensors, "vocab_ids": vocab_ids}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    os.replace(tmp, path)  # never a half-written file under the name the proposer looks for
