"""Runs inside vLLM's own venv (never imported by nimblelm): loads vllm.LLM once, then answers JSON lines.

stdin: one JSON command per line; stdout: one JSON answer per line, prefixed with '@@' so vLLM's own
log lines are told apart. Commands:
  {"op": "generate", "prompts": [[ids...]...], "max_tokens": [n...]} -> {"elapsed_s", "output_tokens",
                                                                          "prefix_cache": [queries, hits]}
  {"op": "quit"}
Every request runs greedy with ignore_eos, so it generates exactly max_tokens tokens.
"""

import json
import sys
import time


def main() -> int:
    cfg = json.loads(sys.argv[1])
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # log stats on: get_metrics() then holds its prefix-cache counters (prompt tokens looked up, found cached)
    llm = LLM(model=cfg["model"], dtype=cfg["dtype"], max_model_len=cfg["max_model_len"],
              max_num_seqs=cfg["max_num_seqs"], seed=cfg.get("seed", 0), enforce_eager=cfg.get("enforce_eager", False),
              enable_prefix_caching=True, disable_log_stats=False)

    def cache_counters() -> list[int]:
        totals = {"vllm:prefix_cache_queries": 0, "vllm:prefix_cache_hits": 0}
        for m in llm.get_metrics():
            if m.name in totals:
                totals[m.name] += int(m.value)
        return list(totals.values())

    print("@@" + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            break
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in cmd["prompts"]]
        params = [SamplingParams(max_tokens=int(n), temperature=0.0, ignore_eos=True) for n in cmd["max_tokens"]]
        before = cache_counters()
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        after = cache_counters()
        print("@@" + json.dumps({"elapsed_s": elapsed, "output_tokens": [len(o.outputs[0].token_ids) for o in outs],
                                 "prefix_cache": [a - b for a, b in zip(after, before)]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
