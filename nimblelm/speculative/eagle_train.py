"""`nimblelm spec train --method eagle`: an EAGLE-1 draft layer by self-distillation (eagle.py has the layer).

1. The data are Medusa's (medusa_train.py): the target's greedy answers to ShareGPT questions the benchmarks
   do not ask, in its chat template, and its features (last hidden state through the final norm) at every
   position of prompt + answer, one prefill each.
2. Each text is one teacher-forced sequence for the draft layer: row p reads (f_p, x_{p+1}) at position p + 1
   and predicts f_{p+1} (smooth L1) and, through the target's frozen output layer (cut to the draft
   vocabulary, as Medusa's), the token x_{p+2} (cross-entropy, weighted W_CLS), as the paper's loss.
   Every row is in the draft layer's context (the prompt's too, as observe shows it); the loss counts the
   rows whose token is an answer token. Unlike the paper, no noise is added to the input features.
3. Only fc and the decoder layer learn (AdamW, one-cycle), from a random start (normal, std INIT_STD). They
   are trained in float64 on the CPU: the layer is models/decoder.py's own, whose float32 CPU path is the C++
   kernels (no gradients); in float64 it takes torch's ops throughout. The file stores float32.
4. The held-out accuracy is that of the first draft: the draft layer's top-1 after the true features, on the
   answers held out.

The settings were chosen on SmolLM2-135M's answers to 80 questions (72 trained on, 3 epochs unless said):
held-out accuracy 17.7% at learning rate 1e-3 against 12.2% at 3e-3; 27.6% with 10 epochs (3e-3: 25.4%);
token loss weight 0.1 (the paper's) 27.6% against 1.0's 24.4% (10 epochs).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from nimblelm.errors import InvalidRequestError
from nimblelm.layers.attention import AttentionMetadata
from nimblelm.layers.linear import Linear
from nimblelm.speculative.eagle import EAGLE, DraftNet, new_kv
from nimblelm.speculative.medusa import default_path, output_rows, rms_norm
from nimblelm.speculative.medusa_train import (
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_PROMPTS,
    DEFAULT_VOCAB,
    HELD_OUT,
    _in_vocab,
    distill,
    draft_vocabulary,
    hidden_states,
    scratch_kv,
    write_file,
)

DEFAULT_EPOCHS = 10
W_CLS = 0.1  # the paper's weight of the token loss beside the feature loss
LEARNING_RATE = 1e-3
INIT_STD = 0.02
GRAD_CLIP = 0.5
BATCH_ROWS = 1024  # texts are batched whole, up to about this many rows
BLOCK = 16  # the training K/V's block size
TRAIN_DTYPE = torch.float64

__all__ = ["DEFAULT_EPOCHS", "DEFAULT_MAX_NEW_TOKENS", "DEFAULT_PROMPTS", "DEFAULT_VOCAB", "train_eagle"]


@dataclass
class Text:
    """One prompt + answer as draft-layer rows p = 0 .. n - 2."""

    embedded: torch.Tensor  # [rows, H] embed(x_{p+1})
    features: torch.Tensor  # [n, H] f_0 .. f_{n-1}: row p reads f_p and predicts f_{p+1}
    labels: torch.Tensor  # [rows] x_{p+2} (-1 for the last row)
    counted: torch.Tensor  # [rows] bool: x_{p+2} is an answer token (the last row's, past the end: f_{n-1})


def text_rows(token_ids: list[int], prompt_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row p (0 .. n - 2): the token it learns (x_{p+2}, -1 past the end), and whether it counts in the
    loss: from the row whose token is the answer's first on (p >= prompt_len - 2)."""
    n = len(token_ids)
    labels = torch.tensor(token_ids[2:] + [-1], dtype=torch.long)
    counted = torch.arange(n - 1) >= prompt_len - 2
    return labels, counted


def _texts(llm, texts: list[tuple[list[int], list[int]]], progress: bool, desc: str) -> list[Text]:
    runner = llm.llm_engine.runner
    kv = scratch_kv(runner, max(len(p) + len(a) for p, a in texts))
    out = []
    for prompt, answer in tqdm(texts, desc=desc, unit="text", disable=not progress):
        tokens = prompt + answer
        if len(answer) < 2:
            continue
        hidden = hidden_states(runner, tokens, kv).float()
        features = rms_norm(hidden, runner.model.norm.weight.float(), runner.config.rms_norm_eps).cpu()
        with torch.inference_mode():
            embedded = runner.model.embed(torch.tensor(tokens[1:], device=runner.device)).float().cpu()
        labels, counted = text_rows(tokens, len(prompt))
        out.append(Text(embedded, features, labels, counted))
    if not out:
        raise InvalidRequestError("the target's answers are too short to train on: raise --max-new-tokens")
    return out


def _batches(texts: list[Text], order: list[int]) -> list[list[Text]]:
    batches, batch, rows = [], [], 0
    for i in order:
        batch.append(texts[i])
        rows += len(texts[i].labels)
        if rows >= BATCH_ROWS:
            batches.append(batch)
            batch, rows = [], 0
    return batches + ([batch] if batch else [])


def forward(net: DraftNet, rotary, cfg, batch: list[Text]) -> torch.Tensor:
    """The draft layer's predicted features [rows, H] (float32) of the batch's texts, each its own causal
    sequence in a fresh K/V."""
    lens = [len(t.labels) for t in batch]
    blocks = [-(-n // BLOCK) for n in lens]
    kv = new_kv(sum(blocks), BLOCK, cfg, TRAIN_DTYPE, "cpu")
    firsts = [sum(blocks[:i]) for i in range(len(batch))]
    slots = torch.cat([torch.arange(f * BLOCK, f * BLOCK + n) for f, n in zip(firsts, lens)])
    meta = AttentionMetadata(
        slot_mapping=slots, num_decodes=0, decode_block_tables=torch.zeros((0, 0), dtype=torch.long),
        decode_context_lens=torch.zeros(0, dtype=torch.long), decode_mask=None, prefill_query_lens=lens,
        prefill_context_lens=lens, prefill_block_tables=[torch.arange(f, f + b) for f, b in zip(firsts, blocks)],
        prefill_masks=[None] * len(batch))
    positions = torch.cat([torch.arange(1, n + 1) for n in lens])
    embedded = torch.cat([t.embedded for t in batch]).to(TRAIN_DTYPE)
    features = torch.cat([t.features[:-1] for t in batch]).to(TRAIN_DTYPE)
    return net(embedded, features, rotary(positions), kv, meta).float()


class _Head(torch.nn.Module):
    """The target's frozen output rows (of the draft vocabulary)."""

    def __init__(self, out: torch.Tensor):
        super().__init__()
        self.register_buffer("out", out)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(features, self.out)


def _targets(batch: list[Text], vocab_ids, vocab_size) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    counted = torch.cat([t.counted for t in batch])
    features = torch.cat([t.features[1:] for t in batch])
    labels = _in_vocab(torch.cat([t.labels for t in batch]), vocab_ids, vocab_size)
    return counted, features, labels


def _train(net: DraftNet, head: _Head, rotary, cfg, texts: list[Text], vocab_ids, epochs: int,
           progress: bool) -> float:
    """Fit fc and the layer; the mean loss of the last epoch."""
    generator = torch.Generator().manual_seed(0)
    # Texts are batched whole, so each epoch's order makes its own number of batches.
    epoch_batches = [_batches(texts, torch.randperm(len(texts), generator=generator).tolist()) for _ in range(epochs)]
    steps = sum(map(len, epoch_batches))
    params = [p for p in net.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, LEARNING_RATE, total_steps=steps, pct_start=0.05)
    total = 0.0
    with tqdm(total=steps, desc="training", unit="batch", disable=not progress) as bar:
        for batches in epoch_batches:
            total = 0.0
            for batch in batches:
                counted, target, labels = _targets(batch, vocab_ids, cfg.vocab_size)
                predicted = forward(net, rotary, cfg, batch)[counted]
                regression = F.smooth_l1_loss(predicted, target[counted])
                tokens = F.cross_entropy(head(predicted), labels[counted], ignore_index=-1)
                loss = regression + W_CLS * tokens
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
                optimizer.step()
                schedule.step()
                total += loss.item()
                bar.update(1)
                bar.set_postfix(loss=f"{loss.item():.3f}", feature=f"{regression.item():.3f}",
                                token=f"{tokens.item():.3f}")
    return total / len(epoch_batches[-1])


def _accuracy(net: DraftNet, head: _Head, rotary, cfg, texts: list[Text], vocab_ids) -> float:
    """The share of held-out answer tokens that the first draft (after the true features) guesses."""
    hits = total = 0
    with torch.no_grad():
        for batch in _batches(texts, list(range(len(texts)))):
            counted, _, labels = _targets(batch, None, cfg.vocab_size)
            best = head(forward(net, rotary, cfg, batch)).argmax(-1)
            if vocab_ids is not None:
                best = vocab_ids[best]
            rows = counted & (labels >= 0)
            hits += int((best[rows] == labels[rows]).sum())
            total += int(rows.sum())
    return hits / max(total, 1)


def _init(net: DraftNet) -> None:
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * INIT_STD)
                if module.bias is not None:
                    module.bias.zero_()


def train_eagle(model: str, *, num_prompts: int = DEFAULT_PROMPTS, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
                epochs: int = DEFAULT_EPOCHS, vocab_size: int = DEFAULT_VOCAB, threads: int | None = None,
                output: str | os.PathLike | None = None, dataset_path: str | None = None,
                progress: bool = True) -> tuple[Path, dict]:
    """Distill, train and write an EAGLE draft layer for model; returns the file and its metadata."""
    from nimblelm import LLM, corpora
    from nimblelm.platform import physical_cores
    from nimblelm.speculative.datastore import tokenizer_digest

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
    train = _texts(llm, train_texts, progress, "features")
    test = _texts(llm, test_texts, progress, "held-out features")
    featured = time.perf_counter()

    torch.set_num_threads(threads)
    runner = llm.llm_engine.runner
    rotary = runner.model.rotary.cpu()
    vocab_ids = draft_vocabulary([a for _, a in train_texts], vocab_size, cfg.vocab_size)
    everything = torch.arange(cfg.vocab_size, device=runner.device)
    out = output_rows(runner.model.lm_head, everything if vocab_ids is None else vocab_ids.to(runner.device),
                      runner.dtype).cpu()
    norm_weight = runner.model.norm.weight.detach().float().cpu()
    digest = tokenizer_digest(tokenizer)
    del llm, runner
    head = _Head(out)
    net = DraftNet(cfg)
    _init(net)
    net = net.to(TRAIN_DTYPE)
    loss = _train(net, head, rotary, cfg, train, vocab_ids, epochs, progress)
    accuracy = _accuracy(net, head, rotary, cfg, test, vocab_ids)
    trained = time.perf_counter()

    wall = trained - start
    meta = {
        "method": "eagle", "model": model, "architecture": cfg.architecture, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "num_layers": cfg.num_layers, "tokenizer_digest": digest,
        "draft_vocab_size": cfg.vocab_size if vocab_ids is None else len(vocab_ids),
        "vocab_map": "the whole vocabulary" if vocab_ids is None else "tensor vocab_ids: the token id of each row",
        "prompts": len(train_texts), "held_out_prompts": len(test_texts), "max_new_tokens": max_new_tokens,
        "epochs": epochs, "train_tokens": int(sum(t.counted.sum() for t in train)),
        "held_out_tokens": int(sum((t.counted & (t.labels >= 0)).sum() for t in test)),
        "final_loss": round(loss, 4), "held_out_accuracy": round(accuracy, 4),
        "cost": {"threads": threads, "generate_s": round(generated - start, 2),
                 "features_s": round(featured - generated, 2), "train_s": round(trained - featured, 2),
                 "wall_s": round(wall, 2), "cpu_hours": round(threads * wall / 3600, 4)},
    }
    path = Path(output).expanduser() if output is not None else default_path(model, EAGLE)
    write(path, net, norm_weight, vocab_ids, meta)
    return path, meta


def write(path: Path, net: DraftNet, norm_weight: torch.Tensor, vocab_ids: torch.Tensor | None, meta: dict) -> None:
    write_file(path, {**net.tensors(), "norm.weight": norm_weight.contiguous()}, vocab_ids, meta)
