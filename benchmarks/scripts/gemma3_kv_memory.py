"""KV cache memory of Gemma 3 at a 4k-token context: sliding layers keep only their window's blocks.

Runs one 4,096-token prompt and 16 generated tokens through gemma3-270m and prints the KV blocks in use
while it decodes and at the peak (during the prompt's chunks), against the bytes a cache that keeps every
layer's K/V whole would hold. Usage: python benchmarks/scripts/gemma3_kv_memory.py [max_num_batched_tokens]
"""

import sys

from nimblelm import LLM, SamplingParams

PROMPT, OUTPUT = 4096, 16
budget = int(sys.argv[1]) if len(sys.argv) > 1 else None
llm = LLM("gemma3-270m", max_model_len=PROMPT + 64, max_num_seqs=1, max_num_batched_tokens=budget)
engine = llm.llm_engine
kv, runner = engine.kv_cache_manager, engine.runner
block_bytes = runner.kv_bytes_per_block()
print("KV groups (window, layers):", [(g.window, g.layers) for g in runner.kv_groups], f"{block_bytes} bytes a block")

engine.add_request("r", list(range(1000, 1000 + PROMPT)), SamplingParams(max_tokens=OUTPUT, ignore_eos=True))
used = []
while engine.has_unfinished_requests():
    engine.step()
    used.append(kv.num_blocks - kv.num_free_blocks)
decoding = used[-2]  # the last step frees the finished request's blocks
whole = engine.model_config.num_layers * kv.blocks_for(PROMPT + OUTPUT) * block_bytes // len(runner.kv_groups[0].layers)
mib = 2**20
print(f"max_num_batched_tokens={engine.config.max_num_batched_tokens}: decoding {decoding * block_bytes / mib:.1f} MiB, "
      f"peak {max(used) * block_bytes / mib:.1f} MiB; every layer whole: {whole / mib:.1f} MiB")
