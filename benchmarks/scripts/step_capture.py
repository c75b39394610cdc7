"""Decode steps replayed from their traces against the same steps run layer by layer from Python.

For each model and quantization, the milliseconds of one decode step at batch sizes 1, 8 and 32
(context ~150 tokens), captured (the default) and with enforce_eager=True, in one process: each step's time
is (generate 129 tokens - generate 1 token) / 128, the median of `reps` runs, alternating the two engines.
Usage: python benchmarks/scripts/step_capture.py [reps] [model[:quantization] ...]
"""

import statistics
import sys
import time

from nimblelm import LLM, SamplingParams
from nimblelm.bench.machine import machine_info

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 3
runs = sys.argv[2:] or ["smollm2-135m", "smollm2-135m:int8", "smollm2-135m:int4", "gemma3-270m:gguf"]
BATCHES = (1, 8, 32)
PROMPT = list(range(1000, 1150))


def seconds(llm: LLM, batch: int, tokens: int) -> float:
    params = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    t0 = time.perf_counter()
    llm.generate([PROMPT] * batch, params, use_tqdm=False)
    return time.perf_counter() - t0


for run in runs:
    model, _, quantization = run.partition(":")
    engines = {eager: LLM(model, quantization=quantization or None, max_model_len=512, enable_prefix_caching=False,
                          enforce_eager=eager) for eager in (False, True)}
    if run == runs[0]:  # the engines have set torch's threads
        info = machine_info()
        print(f"{info['cpu_model']} ({' '.join(info['cpu_features'])}), {info['threads']} threads, commit {info['nimblelm_commit']}, "
              f"load {info['load_average_at_start']}")
        print("| model | batch | captured ms/step | eager ms/step | eager / captured |")
        print("| --- | ---: | ---: | ---: | ---: |")
    for batch in BATCHES:
        steps = {False: [], True: []}
        for eager, llm in engines.items():
            seconds(llm, batch, 129)  # warm: the trace of this batch size, the allocator
        for _ in range(reps):
            for eager, llm in engines.items():
                steps[eager].append((seconds(llm, batch, 129) - seconds(llm, batch, 1)) / 128)
        captured, eager = (1e3 * statistics.median(steps[e]) for e in (False, True))
        print(f"| {run} | {batch} | {captured:.2f} | {eager:.2f} | {eager / captured:.2f}x |", flush=True)
