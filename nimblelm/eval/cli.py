"""`nimblelm eval ppl`: argparse wiring (add_eval_subparser) and run(args)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nimblelm.errors import InvalidRequestError
from nimblelm.eval.quant_table import SETTINGS


def add_eval_subparser(subparsers) -> argparse.ArgumentParser:
    ev = subparsers.add_parser("eval", help="quality checks (perplexity)",
                               description="Quality checks to run beside every technique that may change outputs.")
    ev.set_defaults(func=run)
    sub = ev.add_subparsers(dest="eval_command", metavar="{ppl,quantization}")
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
    p.add_argument("--kv-cache-dtype", default="auto", help="nimblelm backend: auto (as --dtype), float16, int8, int4 or int2")
    p.add_argument("--threads", "-t", type=int, default=None)
    p.add_argument("--output", "-o", default=None, help="write results.json (with every window's NLL) here")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object on stdout (progress and notes stay on stderr)")
    p.add_argument("--no-progress", action="store_true")

    q = sub.add_parser("quantization", help="perplexity, greedy agreement, size and speed of each quantization",
                       description="One model, every quantization setting loaded as a user would load it: perplexity "
                                   "and its change against fp32, greedy agreement with fp32 on held-out HumanEval "
                                   "prompts, weight bytes and batch-1 decode tokens/s. Writes results.json and "
                                   "report.md to --output.")
    q.add_argument("--model", "-m", default="smollm2-135m", help="alias, .gguf file or Hugging Face folder")
    q.add_argument("--settings", default=",".join(SETTINGS),
                   help=f"comma-separated, from {', '.join(SETTINGS)} (fp32, the reference, always runs)")
    q.add_argument("--group-size", type=int, default=128,
                   help="4-bit group of RTN/GPTQ/AWQ; lowered to one that divides every layer's input")
    q.add_argument("--calib-samples", type=int, default=64)
    q.add_argument("--calib-seq-len", type=int, default=512)
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=True, help="GPTQ's column order")
    q.add_argument("--text-set", choices=("pydoc", "sharegpt", "humaneval"), default="pydoc")
    q.add_argument("--window", type=int, default=512)
    q.add_argument("--max-tokens", type=int, default=8192, help="perplexity tokens")
    q.add_argument("--greedy-prompts", type=int, default=8)
    q.add_argument("--greedy-tokens", type=int, default=128)
    q.add_argument("--repeat", "-r", type=int, default=3, help="decode timings per setting")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--threads", "-t", type=int, default=None)
    q.add_argument("--output", "-o", default="bench-out/quantization-quality")
    q.add_argument("--no-plots", action="store_true")
    q.add_argument("--no-progress", action="store_true")
    return ev


def run(args) -> int:
    if args.eval_command == "quantization":
        return run_quantization(args)
    from nimblelm.bench.machine import default_threads, machine_info
    from nimblelm.eval.ppl import make_scorer, perplexity

    if args.window < 2 or args.max_tokens < 2:
        raise InvalidRequestError("--window and --max-tokens must be >= 2")
    if args.stride is not None and args.stride < 1:
        raise InvalidRequestError(f"--stride must be >= 1, got {args.stride}")
    if args.dtype not in ("float32", "bfloat16", "float16"):
        raise InvalidRequestError(f"--dtype must be one of float32, bfloat16, float16, got {args.dtype!r}")
    threads = args.threads or default_threads()
    import torch

    torch.set_num_threads(threads)
    scorer = make_scorer(args.backend, args.model, args.dtype, threads, args.window, args.kv_cache_dtype)
    res = perplexity(args.model, backend=scorer.name, text_set=args.text_set, seed=args.seed, window=args.window,
                     stride=args.stride, max_tokens=args.max_tokens, dtype=args.dtype, threads=threads,
                     scorer=scorer, tokenizer=scorer.tokenizer, progress=not args.no_progress,
                     kv_cache_dtype=args.kv_cache_dtype)
    res.extra["quantization"] = linear_formats(scorer)
    if args.json:
        # The result without its per-window NLLs (results.json of --output keeps them), perplexity first.
        fields = {k: v for k, v in res.as_dict().items() if k not in ("ppl", "window_nll", "extra")}
        print(json.dumps({"perplexity": res.ppl, **fields, **res.extra, "threads": threads}))
    else:
        print(f"perplexity {res.ppl:.4f} (mean NLL {res.nll:.5f} nats) — {res.model}, {res.backend}, {args.dtype}, "
              f"quantization {res.extra['quantization']}, KV {args.kv_cache_dtype}, "
              f"text set {res.text_set} (seed {res.seed}, sha256 {res.text_sha256[:12]}), {res.scored_tokens} tokens "
              f"scored in {res.num_windows} windows of {res.window} (stride {res.stride}), {res.elapsed_s:.1f} s")
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps({"kind": "ppl", "result": res.as_dict(),
                                                      "machine": machine_info(threads)}, indent=2) + "\n")
        print(f"wrote {out / 'results.json'}", file=sys.stderr)
    return 0


def linear_formats(scorer) -> str:
    """How the scored model's linear layers store their weights: none (float), int8, int4 or w8a8 (a
    quantized folder), "+"-joined where layers differ. The transformers oracle multiplies float weights."""
    from nimblelm.eval.ppl import NimbleLMScorer
    from nimblelm.layers.linear import Linear

    if not isinstance(scorer, NimbleLMScorer):
        return "none"
    return "+".join(sorted({m.method.name for m in scorer.runner.model.modules() if isinstance(m, Linear)}))


def run_quantization(args) -> int:
    from nimblelm.bench.machine import default_threads, machine_info
    from nimblelm.bench.report import write_report
    from nimblelm.eval.quant_table import parse_settings, quant_quality_markdown, run_quant_quality

    if args.window < 2 or args.max_tokens < 2:
        raise InvalidRequestError("--window and --max-tokens must be >= 2")
    settings = parse_settings(args.settings)
    threads = args.threads or default_threads()
    import torch

    torch.set_num_threads(threads)
    config = {k: getattr(args, k) for k in ("model", "group_size", "calib_samples", "calib_seq_len", "act_order",
                                             "text_set", "window", "max_tokens", "greedy_prompts", "greedy_tokens",
                                             "repeat", "seed")}
    config["settings"] = [s.name for s in settings]
    config["dtype"] = "float32"
    machine = machine_info(threads)
    out = run_quant_quality(args.model, settings, group_size=args.group_size, calib_samples=args.calib_samples,
                            calib_seq_len=args.calib_seq_len, act_order=args.act_order, seed=args.seed,
                            text_set=args.text_set, window=args.window, max_tokens=args.max_tokens,
                            greedy_prompts=args.greedy_prompts, greedy_tokens=args.greedy_tokens,
                            repeat=args.repeat, threads=threads, progress=not args.no_progress)
    report = {"kind": "quantization-quality", "command": " ".join(["nimblelm", *sys.argv[1:]]), "config": config,
              "machine": machine, **out}
    _, md = write_report(report, args.output, plots=not args.no_plots)
    print(quant_quality_markdown(report))
    print(f"wrote {md}", file=sys.stderr)
    return 0
