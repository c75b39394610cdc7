"""`nimblelm eval ppl`: argparse wiring (add_eval_subparser) and run(args)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nimblelm.errors import InvalidRequestError


def add_eval_subparser(subparsers) -> argparse.ArgumentParser:
    ev = subparsers.add_parser("eval", help="quality checks (perplexity)",
                               description="Quality checks to run beside every technique that may change outputs.")
    ev.set_defaults(func=run)
    sub = ev.add_subparsers(dest="eval_command", metavar="{ppl}")
    sub.required = True
    p = sub.add_parser("ppl", help="perplexity on a fixed, seeded text set",
                       description="Perplexity: text tokenized without BOS, the first --max-tokens tokens in "
                                   "windows of --window every --stride, every next-token prediction scored.")
    p.add_argument("--model", "-m", default="smollm2-135m", help="alias, .gguf file or Hugging Face folder")
    p.add_argument("--backend", choices=("nimblelm", "transformers"), default="nimblelm",
                   help="nimblelm (the engine's model and kernels) or transformers (the oracle)")
    p.add_argument("--text-set", choices=("pydoc", "sharegpt", "humaneval"), default="pydoc")
    p.add_argument("--seed", type=int, default=0, help="order of the sharegpt/humaneval text (pydoc: unused)")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--stride", type=int, default=None, help="default: the window (no overlap)")
    p.add_argument("--max-tokens", type=int, default=32768)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--kv-cache-dtype", default="auto", help="nimblelm backend: auto (as --dtype) or int8")
    p.add_argument("--threads", "-t", type=int, default=None)
    p.add_argument("--output", "-o", default=None, help="write results.json (with every window's NLL) here")
    p.add_argument("--no-progress", action="store_true")
    return ev


def run(args) -> int:
    from nimblelm.bench.machine import default_threads, machine_info
    from nimblelm.eval.ppl import perplexity

    if args.window < 2 or args.max_tokens < 2:
        raise InvalidRequestError("--window and --max-tokens must be >= 2")
    if args.stride is not None and args.stride < 1:
        raise InvalidRequestError(f"--stride must be >= 1, got {args.stride}")
    if args.dtype not in ("float32", "bfloat16", "float16"):
        raise InvalidRequestError(f"--dtype must be one of float32, bfloat16, float16, got {args.dtype!r}")
    threads = args.threads or default_threads()
    import torch

    torch.set_num_threads(threads)
    res = perplexity(args.model, backend=args.backend, text_set=args.text_set, seed=args.seed, window=args.window,
                     stride=args.stride, max_tokens=args.max_tokens, dtype=args.dtype, threads=threads,
                     progress=not args.no_progress, kv_cache_dtype=args.kv_cache_dtype)
    print(f"perplexity {res.ppl:.4f} (mean NLL {res.nll:.5f} nats) — {res.model}, {res.backend}, {args.dtype}, "
          f"KV {args.kv_cache_dtype}, "
          f"text set {res.text_set} (seed {res.seed}, sha256 {res.text_sha256[:12]}), {res.scored_tokens} tokens "
          f"scored in {res.num_windows} windows of {res.window} (stride {res.stride}), {res.elapsed_s:.1f} s")
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"kind": "ppl", "result": res.as_dict(),
                                                      "machine": machine_info(threads)}, indent=2) + "\n")
        print(f"wrote {out / 'results.json'}", file=sys.stderr)
    return 0
