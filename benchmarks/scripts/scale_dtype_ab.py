"""Quantized layers' scales in float16 against float32 in one process: batch-1 decode, the two engines alternated.

Builds two LLMs of the same model and `--quantization` (int8 or int4): one as nimblelm keeps the layers (float16
scales and minimums where they are float16 values, int8.scale_storage), one with every scale widened to float32
as before; their weights are the same values, so their tokens are too. Then `--passes` times, each engine (the
order reversed from one pass to the next, so both see the same machine state) decodes `--tokens` greedy tokens
after a 16-token prompt. Prints each pass's decode tok/s (from the first token to the last) and their ratio;
pass 0 warms up and is left out of the means.

Usage: python benchmarks/scripts/scale_dtype_ab.py [--model smollm2-135m] [--quantization int4]
       [--passes 8] [--tokens 128] [--threads 2]
"""

import argparse
import statistics
from unittest import mock

import torch

from nimblelm import LLM, SamplingParams
from nimblelm.bench.machine import cpu_features, cpu_model
from nimblelm.quantization import int4, int8


def widened(*values: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return tuple(v.float() for v in values)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--quantization", default="int4")
    p.add_argument("--passes", type=int, default=8)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    def build() -> LLM:
        return LLM(args.model, quantization=args.quantization, max_num_seqs=1, num_threads=args.threads)

    llms = {"float16": build()}
    with mock.patch.object(int8, "scale_storage", widened), mock.patch.object(int4, "scale_storage", widened):
        llms["float32"] = build()
    kinds = list(llms)
    print(f"{cpu_model()} ({' '.join(cpu_features())}), {args.threads} threads; {args.model}, {args.quantization}")
    for kind, llm in llms.items():
        print(f"{kind} scales: {llm.weights_nbytes / 2**20:.1f} MiB of weights")
    prompt = {"prompt_token_ids": list(range(1000, 1016))}
    params = SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True)
    rates: dict[str, list[float]] = {kind: [] for kind in kinds}
    tokens = {}
    for i in range(args.passes):
        for kind in kinds if i % 2 == 0 else kinds[::-1]:
            out = llms[kind].generate([prompt], params, use_tqdm=False)[0]
            rates[kind].append((args.tokens - 1) / (out.metrics.finished_time - out.metrics.first_token_time))
            tokens[kind] = out.outputs[0].token_ids
    print(f"same tokens: {tokens['float16'] == tokens['float32']}")
    print("| pass | " + " | ".join(f"{kind} scales, decode tok/s" for kind in kinds) + " | float16 / float32 |")
    print("| ---: |" + " ---: |" * (len(kinds) + 1))
    for i in range(args.passes):
        print(f"| {i}{' (warm-up)' if i == 0 else ''} | " + " | ".join(f"{rates[kind][i]:.1f}" for kind in kinds)
              + f" | {rates['float16'][i] / rates['float32'][i]:.3f} |")
    means = {kind: statistics.mean(v[1:]) for kind, v in rates.items()}
    print("| mean | " + " | ".join(f"{means[kind]:.1f}" for kind in kinds)
          + f" | {means['float16'] / means['float32']:.3f} |")


if __name__ == "__main__":
    main()
