"""KV cache dtypes against each other in one process: ShareGPT batches on one engine per cache, alternated.

Builds one LLM per `--kv-cache-dtype` (same model, weights dtype and threads), then for each of `--passes`
batches of `--num-prompts` ShareGPT requests (each the next requests of sample_sharegpt's seeded order, EOS
ignored, outputs capped at `--max-output-len`) runs every engine on the same batch, the order reversed from one
batch to the next, so both see the same machine state. Prints each pass's output tok/s per cache and their
ratio; pass 0 warms up and is left out of the means.

Usage: python benchmarks/scripts/kv_cache_ab.py [--model smollm2-135m] [--dtype bfloat16]
       [--kv-cache-dtypes float16,bfloat16] [--passes 6] [--num-prompts 32] [--threads 2]
"""

import argparse
import statistics
import time

import torch

from nimblelm import LLM, SamplingParams
from nimblelm.bench.datasets import sample_sharegpt
from nimblelm.bench.machine import cpu_features, cpu_model
from nimblelm.corpora import load_sharegpt, sharegpt_pairs, sharegpt_path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--kv-cache-dtypes", default="float16,bfloat16")
    p.add_argument("--passes", type=int, default=6)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-output-len", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    kinds = args.kv_cache_dtypes.split(",")
    llms = {kv: LLM(args.model, dtype=args.dtype, kv_cache_dtype=kv, max_num_seqs=args.num_prompts,
                    num_threads=args.threads) for kv in kinds}
    print(f"{cpu_model()} ({' '.join(cpu_features())}), {args.threads} threads; {args.model}")
    for kv, llm in llms.items():
        print(f"{kv}: {llm.llm_engine.precision}")
    n = args.num_prompts
    pairs = sharegpt_pairs(load_sharegpt(sharegpt_path()))
    requests = sample_sharegpt(pairs, llms[kinds[0]].get_tokenizer(), n * args.passes, max_output_len=args.max_output_len)
    rates: dict[str, list[float]] = {kv: [] for kv in kinds}
    for i in range(args.passes):
        batch = requests[i * n : (i + 1) * n]
        prompts = [{"prompt_token_ids": list(r.prompt_token_ids)} for r in batch]
        params = [SamplingParams(temperature=0, max_tokens=r.output_len, ignore_eos=True) for r in batch]
        for kv in kinds if i % 2 == 0 else kinds[::-1]:
            start = time.perf_counter()
            llms[kv].generate(prompts, params, use_tqdm=False)
            rates[kv].append(sum(r.output_len for r in batch) / (time.perf_counter() - start))
    print("| pass | " + " | ".join(f"{kv} output tok/s" for kv in kinds) + f" | {kinds[-1]} / {kinds[0]} |")
    print("| ---: |" + " ---: |" * (len(kinds) + 1))
    for i in range(args.passes):
        print(f"| {i}{' (warm-up)' if i == 0 else ''} | " + " | ".join(f"{rates[kv][i]:.1f}" for kv in kinds)
              + f" | {rates[kinds[-1]][i] / rates[kinds[0]][i]:.3f} |")
    means = {kv: statistics.mean(v[1:]) for kv, v in rates.items()}
    print("| mean | " + " | ".join(f"{means[kv]:.1f}" for kv in kinds)
          + f" | {means[kinds[-1]] / means[kinds[0]]:.3f} |")


if __name__ == "__main__":
    main()
