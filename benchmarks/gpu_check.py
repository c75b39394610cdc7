"""The engine on a CUDA GPU: greedy parity with transformers, then decode speed.

Run on a machine with a GPU:  python benchmarks/gpu_check.py MODEL --out DIR
MODEL is an alias, a GGUF file or a Hugging Face folder. Parity uses the test suite's oracle
(tests/test_real_models.py) on the GPU: transformers built from the same dequantized weights, fp32,
the 20 most likely first tokens within 2e-3 in log-probability and 48 greedy tokens identical.
Speed: tg128 (decode tokens/s after a 1-token prompt) for nimblelm and transformers, fp32 and bf16.
Writes DIR/gpu_check.json and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from nimblelm import LLM, SamplingParams
from nimblelm.bench.backends import hf_model_from
from nimblelm.models.loader import load_model

QUESTIONS = [
    "What is the capital of France? Answer in one word.",
    "Write a Python function that returns the n-th Fibonacci number.",
    "Explain in two sentences why the sky is blue.",
    "List five tips for writing clear documentation.",
]
NEW_TOKENS = 48
TOP = 20
GEN = 128
DEVICE = "cuda"


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def free_memory() -> None:
    if DEVICE == "cuda":
        torch.cuda.empty_cache()


def parity(model: str, loaded) -> dict:
    llm = LLM(model, device=DEVICE, dtype="float32", max_model_len=1024)
    prompts = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, logprobs=TOP)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    del llm
    ref = hf_model_from(loaded.config, loaded.weights).to(DEVICE)
    result = {"greedy_identical": [], "top20_same_set": [], "max_abs_logprob_diff": 0.0}
    with torch.no_grad():
        for prompt, out in zip(prompts, outputs):
            ids = torch.tensor([prompt["prompt_token_ids"]], device=DEVICE)
            expect = ref.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)[0, ids.shape[1]:].tolist()
            result["greedy_identical"].append(out.outputs[0].token_ids == expect)
            ref_lp = ref(ids).logits[0, -1].float().log_softmax(-1)
            ours = out.outputs[0].logprobs[0]
            diff = max(abs(lp.logprob - ref_lp[t].item()) for t, lp in ours.items())
            result["max_abs_logprob_diff"] = max(result["max_abs_logprob_diff"], diff)
            result["top20_same_set"].append(set(ours) == set(ref_lp.topk(TOP).indices.tolist()))
    result["first_answer"] = outputs[0].outputs[0].text
    result["passed"] = (all(result["greedy_identical"]) and all(result["top20_same_set"])
                        and result["max_abs_logprob_diff"] < 2e-3)
    del ref
    free_memory()
    return result


def nimblelm_tg(model: str, dtype: str, batch: int) -> float:
    llm = LLM(model, device=DEVICE, dtype=dtype, max_model_len=GEN + 16, max_num_seqs=batch)
    prompts = [[100 + i] for i in range(batch)]
    params = SamplingParams(temperature=0, max_tokens=GEN, ignore_eos=True)
    llm.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    outs = llm.generate(prompts, params, use_tqdm=False)
    t = max(o.metrics.finished_time for o in outs) - min(o.metrics.first_token_time for o in outs)
    del llm
    free_memory()
    return batch * (GEN - 1) / t


def transformers_tg(loaded, dtype: str, batch: int) -> float:
    model = hf_model_from(loaded.config, loaded.weights, dtype).to(DEVICE)
    ids = torch.tensor([[100 + i] for i in range(batch)], device=DEVICE)
    kwargs = {"attention_mask": torch.ones_like(ids), "do_sample": False, "min_new_tokens": GEN,
              "max_new_tokens": GEN, "pad_token_id": 0}
    with torch.no_grad():
        model.generate(ids, **{**kwargs, "min_new_tokens": 8, "max_new_tokens": 8})
        sync()
        t0 = time.perf_counter()
        model.generate(ids, **kwargs)
        sync()
        t = time.perf_counter() - t0
    del model
    free_memory()
    return batch * GEN / t  # includes the first token: a slight advantage to transformers


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--out", default=".")
    ap.add_argument("--device", default="cuda", help="cuda (default); cpu only to try the script")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    loaded = load_model(args.model, progress=False)
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else platform.processor()
    git = ["git", "rev-parse", "--short", "HEAD"]
    commit = subprocess.run(git, check=False, capture_output=True, text=True).stdout.strip()
    report = {"gpu": gpu, "torch": torch.__version__, "python": platform.python_version(), "commit": commit,
              "model": loaded.name, "parity": parity(args.model, loaded), "tg128": []}
    print(json.dumps(report["parity"], indent=1), flush=True)
    for dtype in ("float32", "bfloat16"):
        for batch in (1, 32):
            row = {"dtype": dtype, "batch": batch,
                   "nimblelm": nimblelm_tg(args.model, dtype, batch),
                   "transformers": transformers_tg(loaded, dtype, batch)}
            report["tg128"].append(row)
            print(row, flush=True)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=1))
    print(f"\n{gpu}, torch {torch.__version__}, commit {commit}, {loaded.name}")
    print("| dtype | batch | nimblelm tok/s | transformers tok/s | ratio |\n|---|---|---|---|---|")
    for r in report["tg128"]:
        print(f"| {r['dtype']} | {r['batch']} | {r['nimblelm']:.1f} | {r['transformers']:.1f} | "
              f"{r['nimblelm'] / r['transformers']:.2f}x |")


if __name__ == "__main__":
    main()
