"""What a low-bit KV cache would lose with its full-precision residual apart from the keys' token group, before
building it: perplexity (the `eval quantization` protocol: pydoc, the first 8192 tokens in windows of 512) of
transformers on the loader's weights, its attention reading K/V by a KIVI rule in one pass.

A setting bits/group/extra: keys quantized per channel over groups of `group` tokens, values per token over 32
channels (float16 scales and minimums, asymmetric, as layers/kivi.py stores them); each query reads its own
group and the `extra` groups before it at full precision, earlier ones quantized. extra=0 is the rule the cache
implements today (its KV block is both the key group and the residual: tests/test_kv_lowbit.py's oracle);
KIVI's paper keeps groups of 32 and a residual of up to 128 tokens (extra 3-4). bits 0: plain attention.

Usage: python benchmarks/scripts/kivi_residual.py [--model smollm2-135m] [--settings 0/0/0,2/16/0,2/32/4]
"""

import argparse
import time

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from nimblelm.bench.backends import hf_model_from
from nimblelm.eval.ppl import perplexity
from nimblelm.models.loader import load_model


def fake_quantize(x: torch.Tensor, dim: int, bits: int) -> torch.Tensor:
    lo, hi = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale, low = ((hi - lo) / (2**bits - 1)).half().float(), lo.half().float()
    inv = torch.where(scale > 0, 1 / scale, 0.0)
    return torch.round((x - low) * inv).clamp(0, 2**bits - 1) * scale + low


def rule(bits: int, group: int, extra: int):
    def attention(module, q, k, v, attention_mask, scaling=None, dropout=0.0, sliding_window=None, **kwargs):
        n, d = k.shape[2:]
        whole = n // group * group
        kq = k.clone()
        kq[:, :, :whole] = fake_quantize(k[:, :, :whole].unflatten(2, (-1, group)), 3, bits).flatten(2, 3)
        vq = fake_quantize(v.unflatten(-1, (-1, 32 if d % 32 == 0 else 16)), -1, bits).flatten(-2)
        pos = torch.arange(n)
        visible = pos[None, :] <= pos[:, None]
        if sliding_window is not None:
            visible &= pos[None, :] > pos[:, None] - sliding_window
        full = pos[None, :] // group >= pos[:, None] // group - extra
        mask = torch.cat([visible & ~full, visible & full], 1)
        o = F.scaled_dot_product_attention(q, torch.cat([kq, k], 2), torch.cat([vq, v], 2), attn_mask=mask,
                                           scale=scaling, enable_gqa=True)
        return o.transpose(1, 2).contiguous(), None

    return attention


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--settings", default="0/0/0,4/16/0,2/16/0,2/32/0,2/32/2,2/32/4")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    lm = load_model(args.model)
    model = hf_model_from(lm.config, lm.weights)
    print(f"{args.model}: perplexity, pydoc, the first 8192 tokens in windows of 512")
    print("| bits | key group | full-precision groups before a query's own | full-precision tokens a query reads | "
          "perplexity | change | seconds |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    base = None
    for setting in args.settings.split(","):
        bits, group, extra = (int(x) for x in setting.split("/"))
        if bits:
            name = f"kivi_{bits}_{group}_{extra}"
            AttentionInterface.register(name, rule(bits, group, extra))
            model.set_attn_implementation(name)
        else:
            model.set_attn_implementation("sdpa")

        def score(ids):
            with torch.inference_mode():
                logits = model(torch.tensor([list(ids)])).logits[0]
            return F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item(), len(ids) - 1

        start = time.perf_counter()
        ppl = perplexity(args.model, scorer=score, tokenizer=lm.tokenizer, max_tokens=8192).ppl
        base = base or ppl
        span = "all" if not bits else f"{extra * group + 1}-{(extra + 1) * group}"
        print(f"| {bits or 'float32'} | {group if bits else '-'} | {extra if bits else '-'} | {span} | {ppl:.4f} | "
              f"{100 * (ppl / base - 1):+.2f}% | {time.perf_counter() - start:.0f} |", flush=True)


if __name__ == "__main__":
    main()
