"""Runs inside vLLM's own venv (never imported by nimblelm): loads vllm.LLM once, then answers JSON lines.

stdin: one JSON command per line; stdout: one JSON answer per line, prefixed with '@@' so vLLM's own
log lines are told apart. Commands:
  {"op": "generate", "prompts": [[ids...]...], "max_tokens": [n...]} -> {"elapsed_s", "output_tokens"}
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

    llm = LLM(model=cfg["model"], dtype=cfg["dtype"], max_model_len=cfg["max_model_len"],
              max_num_seqs=cfg["max_num_seqs"], seed=cfg.get("seed", 0), enforce_eager=cfg.get("enforce_eager", False))
    print("@@" + json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd.get("op") == "quit":
            break
        prompts = [TokensPrompt(prompt_token_ids=list(p)) for p in cmd["prompts"]]
        params = [SamplingParams(max_tokens=int(n), temperature=0.0, ignore_eos=True) for n in cmd["max_tokens"]]
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - t0
        print("@@" + json.dumps({"elapsed_s": elapsed,
                                 "output_tokens": [len(o.outputs[0].token_ids) for o in outs]}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
