"""`nimblelm bench latency | throughput | serve | survey | roofline | setup`: argparse wiring and run(args)."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import tempfile
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from nimblelm.errors import InvalidRequestError, NimbleLMError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_BACKENDS = "nimblelm,transformers,llama.cpp"
DEFAULT_QUANT_METHODS = ("int4", "int8", "w8a8")  # survey quantization: W4A16, W8A16, W8A8
SPEC_WORKLOADS = ("humaneval", "chat", "mt", "edit")  # survey speculative
DATA_WORKLOADS = ("qa", "needle", "sharegpt", "sot")  # survey data
# Flags whose meaning and default differ between survey experiments: argparse leaves them None, run() fills in.
SURVEY_DEFAULTS = {"model": DEFAULT_MODEL, "gen_len": 128, "ratios": "2,3,5,10", "context_tokens": "1000,2000"}
# data: --gen-len bounds the Skeleton-of-Thought answers, whose plain decoding must run to its end to compare
DATA_DEFAULTS = {**SURVEY_DEFAULTS, "gen_len": 1024}
# survey longctx: shrunk from issue 24's grid so that the whole default run on qwen2.5-coder-0.5b fits 45 minutes
# on 2 cores (an estimate from timed pieces: kvpress's slower prefill is most of it)
LONGCTX_DEFAULTS = {"model": "qwen2.5-coder-0.5b", "gen_len": 64, "ratios": "0.1,0.5", "context_tokens": "1024,4096",
                    "num_prompts": 8}


def parse_int_list(text: str, flag: str) -> list[int]:
    values = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            values.append(int(part))
        except ValueError:
            raise InvalidRequestError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values:
        raise InvalidRequestError(f"{flag}: no value given")
    return values


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", default=DEFAULT_MODEL,
                   help=f"alias, .gguf file or Hugging Face folder (default {DEFAULT_MODEL})")
    p.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    p.add_argument("--backends", default=DEFAULT_BACKENDS,
                   help=f"comma list of nimblelm, transformers, llama.cpp, vllm (default {DEFAULT_BACKENDS}); "
                        "a peer that is not installed is skipped with a one-line reason")
    p.add_argument("--threads", "-t", type=int, default=None,
                   help="threads for every backend (default: the physical cores other processes leave free, "
                        "sampled for a second at the start)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length given to every backend (default: what the workload needs)")
    p.add_argument("--max-num-seqs", type=int, default=64,
                   help="nimblelm's max_num_seqs; also the concurrency of every backend's throughput run")
    p.add_argument("--quantization", default="none",
                   help="nimblelm's linear weights: none (default), int8 or int4, quantized at load, or gguf, a "
                        ".gguf's own (the name goes to LLM(quantization=...)); peers without matching integer "
                        "kernels are skipped")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="nimblelm's KV cache: auto (the model's dtype, default; bfloat16 for --dtype bfloat16), "
                        "float32, float16, bfloat16, int8, int4 or int2; llama.cpp gets q8_0 K/V for int8, its "
                        "default f16 otherwise")
    p.add_argument("--llamacpp-gguf", default="auto", choices=("auto", "f32", "f16", "q8_0", "q4_0", "q4_1", "source"),
                   help="GGUF given to llama.cpp, written from the same weights: auto = nimblelm's precision "
                        "(int8 -> q8_0, int4 -> q4_0, none -> f32 for float32, f16 otherwise); "
                        "source = the packaged GGUF as is")
    p.add_argument("--output", "-o", default=None,
                   help="folder for results.json (raw figures, config, machine) and report.md")
    p.add_argument("--format", choices=("md", "json"), default="md", help="what to print (default md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-plots", action="store_true", help="with --output: no PNG plots")
    p.add_argument("--no-measure", action="store_true",
                   help="skip the ~1 s bandwidth and matmul-peak measurement recorded with every run")


DATASETS = ("sharegpt", "random", "prefix", "humaneval", "shared-prefix", "sharegpt-multiturn")


def _workload_args(p: argparse.ArgumentParser, default_dataset: str = "sharegpt") -> None:
    p.add_argument("--dataset", choices=DATASETS, default=default_dataset,
                   help="sharegpt (the packaged V3 file, usual filter), random token ids, prefix (a shared "
                        "random prefix + random suffix), humaneval prompts, shared-prefix (ShareGPT questions "
                        "behind one shared system prompt of ShareGPT text, chat template), sharegpt-multiturn "
                        "(ShareGPT conversations replayed turn by turn, chat template; --num-prompts "
                        "conversations, each turn sent after the one before it finished)")
    p.add_argument("--dataset-path", default=None,
                   help="ShareGPT JSON / HumanEval jsonl(.gz) file (default: fetched once into the nimblelm cache)")
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--max-output-len", type=int, default=128,
                   help="sharegpt, humaneval, shared-prefix, sharegpt-multiturn: cap on each request's output "
                        "length (default 128)")
    p.add_argument("--input-len", type=int, default=128, help="random, prefix: prompt (suffix) length (default 128)")
    p.add_argument("--output-len", type=int, default=128, help="random, prefix: output length (default 128)")
    p.add_argument("--prefix-len", type=int, default=None,
                   help="prefix, shared-prefix: shared prefix length in tokens (default 256 for prefix, 1000 for "
                        "shared-prefix)")
    p.add_argument("--max-turns", type=int, default=8,
                   help="sharegpt-multiturn: turns replayed per conversation at most (default 8)")
    p.add_argument("--random-range-ratio", type=float, default=0.0,
                   help="random, prefix: lengths uniform in [len*(1-r), len*(1+r)] (default 0)")


def add_bench_subparser(subparsers) -> argparse.ArgumentParser:
    """Add `bench` (with latency, throughput, setup) to an argparse subparsers object."""
    from nimblelm.cli import json_object

    bench = subparsers.add_parser("bench", help="benchmark nimblelm against its peers",
                                  description="Benchmark nimblelm against transformers and llama.cpp "
                                              "on the same weights, in the same run.")
    bench.set_defaults(func=run)
    sub = bench.add_subparsers(dest="bench_command", metavar="{latency,throughput,serve,survey,roofline,scale,setup}")
    sub.required = True

    lat = sub.add_parser("latency", help="llama-bench style pp/tg tests",
                         description="Prompt processing (pp) and token generation (tg) tok/s, llama-bench style.")
    lat.add_argument("-p", "--n-prompt", default="512", help="prompt lengths, comma list (default 512)")
    lat.add_argument("-n", "--n-gen", default="128", help="generated lengths, comma list (default 128)")
    lat.add_argument("-b", "--batch-size", default="1", help="sequences per test, comma list (default 1)")
    lat.add_argument("-pg", "--prompt-gen", default=None, action="append",
                     help="P,N: a P-token prompt then N generated tokens, end-to-end generated tok/s (repeatable)")
    lat.add_argument("-r", "--repeat", type=int, default=5, help="timed repetitions per test (default 5)")
    _common(lat)

    thr = sub.add_parser("throughput", help="offline throughput of N requests",
                         description="Total and output tok/s of N requests submitted at once.")
    _workload_args(thr)
    thr.add_argument("-r", "--repeat", type=int, default=1, help="timed passes (default 1)")
    thr.add_argument("--hf-batch-size", type=int, default=None,
                     help="transformers: requests per static generate batch (default: the concurrency)")
    _common(thr)

    srv = sub.add_parser("serve", help="serving benchmark against OpenAI-compatible servers",
                         description="Requests sent at Poisson/gamma arrival times to each backend's OpenAI server "
                                     "(started and stopped by the harness on 127.0.0.1), or to --base-url; "
                                     "TTFT, TPOT, ITL, E2E percentiles, throughput and goodput.")
    _workload_args(srv)
    srv.add_argument("--request-rate", default="inf",
                     help="requests per second, comma list; inf sends all at once (default inf)")
    srv.add_argument("--burstiness", type=float, default=1.0,
                     help="gamma shape of the inter-arrival gaps: 1 = Poisson, < 1 burstier (default 1)")
    srv.add_argument("--max-concurrency", type=int, default=None,
                     help="at most this many requests in flight (default: unbounded)")
    srv.add_argument("--slo", default=None, help="goodput bounds, e.g. ttft:2,tpot:0.2,e2e:60 (seconds, or 200ms)")
    srv.add_argument("--base-url", default=None,
                     help="an already running OpenAI-compatible server (backend 'openai'), e.g. http://127.0.0.1:8000")
    srv.add_argument("--served-model-name", default=None, help="with --base-url: the model name to send")
    srv.add_argument("--prompt-format", choices=("ids", "text"), default="ids",
                     help="send prompts as token ids (default) or as decoded text")
    srv.add_argument("--nimblelm-source", default=None,
                     help="run `nimblelm serve` from this checkout (PYTHONPATH), e.g. one where issue #3 landed")
    srv.add_argument("-r", "--repeat", type=int, default=1, help="passes over every rate (default 1)")
    _common(srv)
    srv.set_defaults(backends="nimblelm,llama.cpp,vllm")

    sur = sub.add_parser("survey", help="the survey's comparative experiments on this machine",
                         description="Rerun one of the survey's experiments: `engines` is its Table 6, "
                                     "`quantization` its Table 4 (prefill, decode and end-to-end speedup of "
                                     "each --methods over the unquantized model, per --batch-sizes × "
                                     "--input-lens, each generating --output-len tokens; nimblelm only), "
                                     "`speculative` its Table 5 (speedup and tokens per step of each speculative "
                                     "--methods over plain decoding at batch 1 on --workloads, beside "
                                     "transformers' assisted generation and llama.cpp's speculative modes, then "
                                     "nimblelm at --batch-sizes), `data` the data level: prompt compression "
                                     "by each --methods at each --ratios beside the llmlingua package, the "
                                     "answering --model's accuracy and latency on --workloads. `longctx`: the "
                                     "engine's KV cache policies (--methods) on long contexts beside kvpress "
                                     "(issue 24): needle accuracy, perplexity, speed and served throughput; its "
                                     "--model defaults to qwen2.5-coder-0.5b.")
    sur.add_argument("experiment", choices=("engines", "quantization", "speculative", "data", "longctx"))
    sur.add_argument("--models", default=None, help="comma list of models (default: --model)")
    sur.add_argument("--prompt-len", type=int, default=1024, help="(a) prompt tokens (default 1024)")
    sur.add_argument("--gen-len", type=int, default=None,
                     help="(a) generated tokens; speculative: each request's max_tokens (default 128); longctx: "
                          "tokens each speed and serve request generates (default 64); data: each SoT answer's "
                          "max_tokens (default 1024)")
    sur.add_argument("-r", "--repeat", type=int, default=3, help="(a) timed repetitions (default 3)")
    sur.add_argument("--tpot-slo", type=float, default=0.2,
                     help="(b) p99 TPOT bound in seconds for the sustained rate (default 0.2)")
    sur.add_argument("--rate-fractions", default="0.5,0.8",
                     help="(b) offered rates as fractions of the maximum req/s (default 0.5,0.8)")
    sur.add_argument("--nimblelm-source", default=None,
                     help="run `nimblelm serve` from this checkout (PYTHONPATH), e.g. one where issue #3 landed")
    sur.add_argument("--methods", default=None,
                     help="quantization: methods against the unquantized model (default int4,int8,w8a8 = "
                          "W4A16, W8A16, W8A8); one the engine cannot load is skipped with its reason. "
                          "speculative: speculative_config methods against plain decoding (default ngram, and "
                          "draft_model with --draft-model; medusa uses the heads `nimblelm spec train` cached, "
                          "medusa_tree the same heads on a token tree; lookahead needs nothing). "
                          "data: nimblelm's prompt compression methods (default selective_context,llmlingua,"
                          "longllmlingua). longctx: KV cache policies (default streaming,snapkv; any the engine "
                          "knows), and full-float16, full-int8, full-int4, full-int2: the full cache stored so")
    sur.add_argument("--batch-sizes", default=None,
                     help="quantization: comma list (default 1,2,4,8,16); speculative: requests at once under "
                          "load (default 1,8,32)")
    sur.add_argument("--request-rates", default="0.5,2",
                     help="speculative: ShareGPT chat requests arriving at these Poisson rates (req/s, comma list; "
                          "2 x --num-prompts requests per rate; default 0.5,2), or none")
    sur.add_argument("--draft-model", default=None, help="speculative: the drafter of method draft_model")
    sur.add_argument("--draft-quantization", default=None, help="speculative: the drafter's quantization")
    sur.add_argument("--num-speculative-tokens", type=int, default=4,
                     help="speculative: draft tokens per step at most, for every method (default 4)")
    sur.add_argument("--prompt-lookup-max", type=int, default=3,
                     help="speculative: the ngram method's longest n-gram (default 3)")
    sur.add_argument("--workloads", default=None,
                     help="speculative: comma list of humaneval (code completion), chat (ShareGPT questions), "
                          "mt (held-out two-turn chats in MT-bench's style, the second turn after the model's own "
                          "greedy answer), edit (add type hints to a HumanEval function: the answer repeats the "
                          "prompt); default all. data: comma list of qa (which function a quoted sentence of "
                          "Python's documentation describes), needle (a number planted in such a document), "
                          "sharegpt (ShareGPT's longest prompts), sot (Skeleton-of-Thought against plain decoding "
                          "on held-out questions, judged by --judge); default all. longctx: comma list of needle, "
                          "ppl, speed, serve; default all")
    sur.add_argument("--judge", default=None,
                     help="data: the model judging SoT's answers against plain decoding's (default: the largest "
                          "packaged model)")
    sur.add_argument("--ratios", default=None,
                     help="data: target compression ratios (context tokens before / after; default 2,3,5,10). "
                          "longctx: needle's kept fractions of the prompt's KV entries (default 0.1,0.5, the "
                          "issue's 0.1,0.2,0.5 shrunk to fit 45 minutes)")
    sur.add_argument("--lingua-methods", default="llmlingua,longllmlingua",
                     help="data: the llmlingua package's methods run beside (default llmlingua,longllmlingua; "
                          "none to skip the peer)")
    sur.add_argument("--reorder", default=None, choices=("original", "sort"),
                     help="data: the order of the paragraphs nimblelm's llmlingua and longllmlingua keep (default: "
                          "each method's own, longllmlingua sort, llmlingua original)")
    sur.add_argument("--scorer", default=None,
                     help="data: the small LM every compressor scores with (default: the smallest packaged model)")
    sur.add_argument("--context-tokens", default=None,
                     help="data: qa and needle documents of these many answerer tokens, in turn (default 1000,2000). "
                          "longctx: needle's context lengths in tokens (default 1024,4096, the issue's "
                          "1024,2048,4096,8192 shrunk to fit 45 minutes)")
    sur.add_argument("--depths", default="0,50,100",
                     help="longctx: needle depths, percent of the context before the fact (default 0,50,100, the "
                          "issue's 0,25,50,75,100 shrunk to fit 45 minutes)")
    sur.add_argument("--kv-policy", type=json_object, default=None,
                     help="speculative: a KV cache policy as JSON (as `generate --kv-policy`) for every nimblelm engine, "
                          "plain decoding's too; the peers, which have none, are skipped")
    sur.add_argument("--kvpress-methods", default=None,
                     help="longctx: kvpress's presses beside nimblelm's on needle (default: those of --methods "
                          "kvpress has; none skips the peer, its full cache too)")
    sur.add_argument("--ppl-tokens", type=int, default=4096,
                     help="longctx ppl: tokens of the text scored (default 4096)")
    sur.add_argument("--ppl-budgets", default="256,512,1024",
                     help="longctx ppl: KV entries kept, comma list (default 256,512,1024)")
    sur.add_argument("--chunk", type=int, default=128,
                     help="longctx ppl: prompt tokens per step, compacted after each (default 128)")
    sur.add_argument("--speed-contexts", default="1024,2048,4096,8192",
                     help="longctx speed: context lengths, those beyond the model's limit dropped (default "
                          "1024,2048,4096,8192: the issue's 16384 left out to fit 45 minutes)")
    sur.add_argument("--budget", type=int, default=2048, help="longctx speed: KV entries kept (default 2048)")
    sur.add_argument("--speed-batch", type=int, default=1,
                     help="longctx speed: requests of each context submitted at once, distinct texts (default 1)")
    sur.add_argument("--serve-context", type=int, default=2048,
                     help="longctx serve: tokens of each of --num-prompts requests (default 8) sent at once "
                          "(default 2048, the issue's 4096 halved to fit 45 minutes)")
    sur.add_argument("--serve-budget", type=int, default=512,
                     help="longctx serve: KV entries each request keeps (default 512)")
    sur.add_argument("--humaneval-path", default=None,
                     help="speculative: HumanEval jsonl(.gz) file (default: fetched once into the nimblelm cache); "
                          "--dataset-path is the ShareGPT file")
    sur.add_argument("--input-lens", default="128,256,512,1024,2048",
                     help="quantization: prompt lengths, comma list (default 128,256,512,1024,2048); "
                          "--output-len (default 128) is the generated length of every cell")
    sur.add_argument("--resume", action="store_true",
                     help="quantization: continue the report in --output, measuring only the cells it lacks "
                          "(same settings and machine). With --output, results.json is rewritten after every "
                          "cell, so an interrupted run loses at most one cell")
    _workload_args(sur)
    _common(sur)
    # --num-prompts None: 32 requests for engines, 8 per workload for speculative (each runs alone there)
    sur.set_defaults(backends="nimblelm,transformers,llama.cpp,vllm", max_num_seqs=32, num_prompts=None, model=None)

    roof = sub.add_parser("roofline", help="memory bandwidth, matmul peak, and the decode/prefill limits they imply",
                          description="Measure this machine's read bandwidth and matmul GFLOP/s per dtype, and "
                                      "show the decode tokens/s limit for --model.")
    roof.add_argument("--dtypes", default="float32,bfloat16,float16", help="matmul dtypes (comma list)")
    roof.add_argument("--sizes-mib", default="16,64,256,1024", help="bandwidth working sets in MiB (comma list)")
    roof.add_argument("--budget", type=float, default=1.0, help="seconds per matmul measurement (default 1)")
    _common(roof)

    scale = sub.add_parser("scale", help="one process against tensor-parallel ranks and data-parallel replicas",
                           description="The same workload on one process (1 thread, and --size threads), on "
                                       "--size tensor-parallel ranks and on --size replicas of 1 thread each: "
                                       "output tok/s of a batch, batch-1 decode tok/s, all-reduce time per step.")
    _workload_args(scale)
    scale.add_argument("--model", "-m", default=DEFAULT_MODEL, help=f"default {DEFAULT_MODEL}")
    scale.add_argument("--dtype", default="float32", help="float32 (default), float16 or bfloat16")
    scale.add_argument("--size", type=int, default=2, help="ranks (tp) and replicas (dp) (default 2)")
    scale.add_argument("--configurations", default="single,single-all,tp,dp",
                       help="comma list of single (1 thread), single-all (--size threads), tp, dp")
    scale.add_argument("--alone-len", type=int, default=128, help="tokens the lone request decodes (default 128)")
    scale.add_argument("--seed", type=int, default=0)
    scale.add_argument("--max-model-len", type=int, default=None)
    scale.add_argument("--output", "-o", default=None, help="folder for results.json and report.md")
    scale.add_argument("--format", choices=("md", "json"), default="md", help="what to print (default md)")

    setup = sub.add_parser("setup", help="build an optional peer (llama.cpp)",
                           description="Fetch and build a peer into the nimblelm cache.")
    setup.add_argument("peer", choices=("llama.cpp",))
    setup.add_argument("--force", action="store_true", help="download and rebuild even if present")
    return bench


def _command_line() -> str:
    argv = sys.argv[1:]
    if argv[:1] == ["bench"]:
        return "nimblelm " + shlex.join(argv)
    return "nimblelm bench " + shlex.join(argv)


def _prepare(args):
    import torch

    from nimblelm.bench.backends import DTYPES, BenchContext, parse_backends
    from nimblelm.bench.machine import default_threads, machine_info

    if args.dtype not in DTYPES:
        raise InvalidRequestError(f"--dtype must be one of {', '.join(DTYPES)}, got {args.dtype!r}")
    backends = parse_backends(args.backends)
    threads_note = None
    if args.threads is not None:
        threads = args.threads
    else:
        from nimblelm.bench.machine import auto_threads

        threads, busy = auto_threads()
        threads_note = {"auto": True, "busy_cpus_at_start": round(busy, 2), "physical_cores": default_threads()}
        if threads < default_threads():
            print(f"note: other processes keep {busy:.1f} CPUs busy: using {threads} thread(s) per backend "
                  "(pass --threads to override)", file=sys.stderr)
    if threads < 1:
        raise InvalidRequestError(f"--threads must be >= 1, got {threads}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise InvalidRequestError(f"--max-model-len must be >= 2, got {args.max_model_len}")
    if args.max_num_seqs < 1:
        raise InvalidRequestError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    quantization = check_precision(args, backends)
    torch.set_num_threads(threads)
    ctx = BenchContext(model=args.model, dtype=args.dtype, threads=threads, max_model_len=args.max_model_len or 0,
                       max_num_seqs=args.max_num_seqs, seed=args.seed, quantization=quantization,
                       kv_cache_dtype=args.kv_cache_dtype)
    opts = {"llamacpp_gguf_type": args.llamacpp_gguf, "hf_batch_size": getattr(args, "hf_batch_size", None),
            "nimblelm_source": getattr(args, "nimblelm_source", None)}
    machine = machine_info(threads)
    if threads_note:
        machine["threads_choice"] = threads_note
    if not getattr(args, "no_measure", False):
        from nimblelm.bench.roofline import quick_measure

        # bfloat16 runs multiply in bfloat16 (AMX tiles, oneDNN): their peak is that dtype's
        machine.update(quick_measure(threads, ("float32", "bfloat16") if args.dtype == "bfloat16" else ("float32",)))
    return ctx, backends, opts, machine


def check_precision(args, backends) -> str | None:
    """Validate --quantization / --kv-cache-dtype before anything loads; returns the quantization (None: none).

    Quantization names are the engine's: an unknown one fails here with the engine's own message.
    """
    from nimblelm.bench.backends import KV_CACHE_DTYPES

    if args.kv_cache_dtype not in KV_CACHE_DTYPES:
        raise InvalidRequestError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                                  f"got {args.kv_cache_dtype!r}")
    quantization = None if args.quantization == "none" else args.quantization
    if quantization and "nimblelm" in backends:
        from nimblelm.quantization import linear_method  # the engine's own check of the name

        linear_method(quantization)
    return quantization


def _precision_config(args) -> dict:
    return {"quantization": args.quantization, "kv_cache_dtype": args.kv_cache_dtype,
            "llamacpp_gguf": args.llamacpp_gguf}


def _fit_context(ctx, workloads) -> None:
    """Give every backend the context the longest request of the workloads needs (32 at least: the warm-up)."""
    need = max(r.prompt_len + r.output_len for w in workloads for r in w) + 1
    ctx.max_model_len = max(ctx.max_model_len, need, 32)
    _check_context(ctx)


def _check_context(ctx) -> None:
    limit = ctx.config.max_position_embeddings
    if limit and ctx.max_model_len > limit:
        raise InvalidRequestError(
            f"the workload needs {ctx.max_model_len} positions, more than the model's context length {limit}")


def _emit(report: dict, args) -> None:
    from nimblelm.bench.report import to_json, to_markdown, write_report

    if args.output:
        j, m = write_report(report, args.output, plots=not getattr(args, "no_plots", False))
        print(f"wrote {j} and {m}", file=sys.stderr)
    print(to_json(report) if args.format == "json" else to_markdown(report))


def run_latency_command(args) -> dict:
    from nimblelm.bench.latency import make_tests, run_latency

    p = parse_int_list(args.n_prompt, "-p")
    n = parse_int_list(args.n_gen, "-n")
    b = parse_int_list(args.batch_size, "-b")
    pg = []
    for item in args.prompt_gen or []:
        vals = parse_int_list(item, "-pg")
        if len(vals) != 2:
            raise InvalidRequestError(f"-pg: expected P,N (prompt and generated tokens), got {item!r}")
        pg.append((vals[0], vals[1]))
    tests = make_tests(p, n, b, pg)
    if args.repeat < 1:
        raise InvalidRequestError(f"--repeat must be >= 1, got {args.repeat}")
    if args.warmup < 0:
        raise InvalidRequestError(f"--warmup must be >= 0, got {args.warmup}")
    ctx, backends, opts, machine = _prepare(args)
    ctx.max_model_len = max(ctx.max_model_len, max(p) + 1, max(n) + 1, *(a + c + 1 for a, c in pg))
    _check_context(ctx)
    ctx.max_num_seqs = max(ctx.max_num_seqs, max(b))
    out = run_latency(ctx, backends, tests, repeat=args.repeat, warmup=args.warmup, backend_opts=opts,
                      progress=not args.no_progress, bandwidth_gbs=machine.get("memory_bandwidth_gbs"),
                      peak_gflops=_peak_gflops(machine, args.dtype))
    config = {"model": args.model, "dtype": args.dtype, "backends": backends, "n_prompt": p, "n_gen": n,
              "batch": b, "prompt_gen": pg, "repeat": args.repeat, "warmup": args.warmup, "threads": ctx.threads,
              "seed": args.seed, "max_model_len": ctx.max_model_len, "max_num_seqs": ctx.max_num_seqs,
              **_precision_config(args)}
    return {"kind": "latency", "command": _command_line(), "config": config, "machine": machine, **out}


def _check_workload_args(args) -> None:
    if args.num_prompts <= 0:
        raise InvalidRequestError(f"--num-prompts must be > 0, got {args.num_prompts}")
    if args.dataset not in ("random", "prefix") and args.max_output_len <= 0:
        raise InvalidRequestError(f"--max-output-len must be > 0, got {args.max_output_len}")
    if args.dataset in ("random", "prefix"):
        if args.input_len <= 0 or args.output_len <= 0:
            raise InvalidRequestError("--input-len and --output-len must be > 0")
        if not 0.0 <= args.random_range_ratio < 1.0:
            raise InvalidRequestError(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    if args.dataset == "prefix" and args.prefix_len is not None and args.prefix_len < 0:
        raise InvalidRequestError(f"--prefix-len must be >= 0, got {args.prefix_len}")
    if args.dataset == "shared-prefix" and args.prefix_len is not None and args.prefix_len <= 0:
        raise InvalidRequestError(f"--prefix-len must be > 0, got {args.prefix_len}")
    if args.dataset == "sharegpt-multiturn" and args.max_turns < 2:
        raise InvalidRequestError(f"--max-turns must be >= 2, got {args.max_turns}")


def _prefix_len(args) -> int:
    if args.prefix_len is not None:
        return args.prefix_len
    return 1000 if args.dataset == "shared-prefix" else 256


def build_workload(args, ctx, pass_index: int = 0) -> list:
    """The requests of pass pass_index, none of which an earlier pass sent (so no pass finds its prompts in a
    prefix cache an earlier one filled): of ShareGPT and HumanEval, the next --num-prompts of the one seeded
    order (shared-prefix: behind a system prompt of its own, drawn with seed + pass_index); of random token
    ids, the draw of seed + pass_index."""
    from nimblelm import corpora
    from nimblelm.bench import datasets

    _check_workload_args(args)
    n, k = args.num_prompts, pass_index
    limit = min(2048, args.max_model_len or 2048, ctx.config.max_position_embeddings)
    if args.dataset == "humaneval":
        problems = corpora.load_humaneval(corpora.humaneval_path(args.dataset_path))
        return datasets.humaneval_requests(problems, ctx.tokenizer, n * (k + 1), seed=args.seed,
                                           max_output_len=args.max_output_len, max_total_len=limit)[k * n:]
    if args.dataset == "prefix":
        return datasets.prefix_requests(n, _prefix_len(args), args.input_len, args.output_len,
                                        vocab_size=ctx.config.vocab_size, range_ratio=args.random_range_ratio,
                                        seed=args.seed + k, exclude_ids=ctx.special_ids())
    if args.dataset == "random":
        return datasets.random_requests(n, args.input_len, args.output_len, vocab_size=ctx.config.vocab_size,
                                        range_ratio=args.random_range_ratio, seed=args.seed + k,
                                        exclude_ids=ctx.special_ids())
    records = corpora.load_sharegpt(corpora.sharegpt_path(args.dataset_path))
    if args.dataset == "sharegpt-multiturn":
        reqs = datasets.multiturn_requests(corpora.sharegpt_dialogues(records), ctx.tokenizer, n * (k + 1),
                                           seed=args.seed, max_turns=args.max_turns,
                                           max_output_len=args.max_output_len, max_total_len=limit)
        return [r for r in reqs if r.conversation >= k * n]
    pairs = corpora.sharegpt_pairs(records)
    if args.dataset == "shared-prefix":
        return datasets.shared_prefix_requests(pairs, ctx.tokenizer, n * (k + 1), prefix_len=_prefix_len(args),
                                               seed=args.seed, prefix_seed=args.seed + k,
                                               max_output_len=args.max_output_len, max_total_len=limit)[k * n:]
    return datasets.sample_sharegpt(pairs, ctx.tokenizer, n * (k + 1), seed=args.seed,
                                    max_output_len=args.max_output_len, max_prompt_len=min(1024, limit - 4),
                                    max_total_len=limit)[k * n:]


def _peak_gflops(machine: dict, dtype: str) -> float | None:
    """The measured matmul peak a run's prefill compares with: its dtype's, float32's for runs computing in
    float32 (float32 and quantized weights, which prefill as float32 GEMMs)."""
    peaks = machine.get("matmul_peak_gflops") or {}
    return peaks.get(dtype) or peaks.get("float32")


def run_throughput_command(args) -> dict:
    from nimblelm.bench.throughput import run_throughput

    if args.num_prompts <= 0:
        raise InvalidRequestError(f"--num-prompts must be > 0, got {args.num_prompts}")
    if args.repeat < 1:
        raise InvalidRequestError(f"--repeat must be >= 1, got {args.repeat}")
    if args.warmup < 0:
        raise InvalidRequestError(f"--warmup must be >= 0, got {args.warmup}")
    if args.hf_batch_size is not None and args.hf_batch_size < 1:
        raise InvalidRequestError(f"--hf-batch-size must be >= 1, got {args.hf_batch_size}")
    _check_workload_args(args)
    ctx, backends, opts, machine = _prepare(args)
    workloads = [build_workload(args, ctx, k) for k in range(args.repeat)]
    _fit_context(ctx, workloads)
    out = run_throughput(ctx, backends, workloads, warmup=args.warmup, backend_opts=opts,
                         progress=not args.no_progress,
                         peak_gflops=_peak_gflops(machine, args.dtype))
    config = {"model": args.model, "dtype": args.dtype, "backends": backends, "dataset": args.dataset,
              "num_prompts": args.num_prompts, "seed": args.seed, "repeat": args.repeat, "warmup": args.warmup,
              "threads": ctx.threads, "max_model_len": ctx.max_model_len, "max_num_seqs": ctx.max_num_seqs,
              **_precision_config(args)}
    config.update(_workload_config(args))
    return {"kind": "throughput", "command": _command_line(), "config": config, "machine": machine, **out}


def _workload_config(args) -> dict:
    if args.dataset in ("random", "prefix"):
        out = {"input_len": args.input_len, "output_len": args.output_len,
               "random_range_ratio": args.random_range_ratio}
    else:
        out = {"max_output_len": args.max_output_len}
    if args.dataset in ("prefix", "shared-prefix"):
        out["prefix_len"] = _prefix_len(args)
    if args.dataset == "sharegpt-multiturn":
        out["max_turns"] = args.max_turns
    return out


def run_serve_command(args) -> dict:
    import math

    from nimblelm.bench.arrivals import parse_rates
    from nimblelm.bench.metrics import parse_slo
    from nimblelm.bench.serve import run_serve
    from nimblelm.bench.throughput import workload_summary

    try:
        rates = parse_rates(args.request_rate)
        slo = parse_slo(args.slo)
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None
    if not args.burstiness > 0:
        raise InvalidRequestError(f"--burstiness must be > 0, got {args.burstiness}")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise InvalidRequestError(f"--max-concurrency must be >= 1, got {args.max_concurrency}")
    if args.repeat < 1:
        raise InvalidRequestError(f"--repeat must be >= 1, got {args.repeat}")
    _check_workload_args(args)
    if args.base_url:
        args.backends = "openai"
    names = [b.strip().lower() for b in args.backends.split(",") if b.strip()]
    from nimblelm.bench.serve import SERVE_BACKENDS

    for b in names:
        if b not in SERVE_BACKENDS:
            raise InvalidRequestError(f"unknown backend {b!r}: choose from {', '.join(SERVE_BACKENDS)}")
    if args.dtype not in ("float32", "float16", "bfloat16"):
        raise InvalidRequestError(f"--dtype must be one of float32, float16, bfloat16, got {args.dtype!r}")
    args_backends, args.backends = args.backends, ",".join(b for b in names if b != "openai") or "nimblelm"
    ctx, _, opts, machine = _prepare(args)
    args.backends = args_backends
    all_rates = [r for _ in range(args.repeat) for r in rates]
    workloads = [build_workload(args, ctx, k) for k in range(len(all_rates))]
    _fit_context(ctx, workloads)
    out = run_serve(ctx, names, workloads, all_rates, burstiness=args.burstiness,
                    max_concurrency=args.max_concurrency, slo=slo, base_url=args.base_url,
                    model_name=args.served_model_name, backend_opts=opts,
                    decode=ctx.tokenizer.decode if args.prompt_format == "text" else None,
                    warmup=args.warmup, progress=not args.no_progress)
    config = {"model": args.model, "dtype": args.dtype, "backends": names, "dataset": args.dataset,
              "num_prompts": args.num_prompts, "seed": args.seed, "request_rates": ["inf" if math.isinf(r) else r
                                                                                    for r in rates],
              "burstiness": args.burstiness, "max_concurrency": args.max_concurrency, "slo": slo.as_dict(),
              "repeat": args.repeat, "warmup": args.warmup, "threads": ctx.threads,
              "max_model_len": ctx.max_model_len, "max_num_seqs": ctx.max_num_seqs, "base_url": args.base_url,
              "prompt_format": args.prompt_format, **_precision_config(args), **_workload_config(args)}
    return {"kind": "serve", "command": _command_line(), "config": config, "machine": machine,
            "workload": workload_summary(workloads[0]), **out}


def run_survey_quantization_command(args) -> dict:
    from nimblelm.bench.survey_quant import earlier_report, run_survey_quantization

    batch_sizes = parse_int_list(args.batch_sizes or "1,2,4,8,16", "--batch-sizes")
    input_lens = parse_int_list(args.input_lens, "--input-lens")
    if min(batch_sizes) < 1 or min(input_lens) < 1:
        raise InvalidRequestError("--batch-sizes and --input-lens values must be >= 1")
    if args.output_len < 2:
        raise InvalidRequestError(f"--output-len must be >= 2 (decode is timed after the first token), "
                                  f"got {args.output_len}")
    if args.repeat < 1 or args.warmup < 0:
        raise InvalidRequestError("--repeat must be >= 1 and --warmup >= 0")
    if args.quantization != "none":
        raise InvalidRequestError("survey quantization compares --methods with the unquantized model: "
                                  "drop --quantization")
    methods = list(dict.fromkeys(m.strip() for m in (args.methods or ",".join(DEFAULT_QUANT_METHODS)).split(",")
                                 if m.strip()))
    if not methods or "none" in methods:
        raise InvalidRequestError("--methods: give one or more quantization methods (the unquantized model "
                                  "is always measured as the baseline)")
    if args.resume and not args.output:
        raise InvalidRequestError("--resume continues the report in --output DIR: give --output")
    args.backends = "nimblelm"  # the experiment is about nimblelm's own methods; peers have their own formats
    ctx, _, _, machine = _prepare(args)
    models = [m.strip() for m in (args.models or args.model).split(",") if m.strip()]
    config = {"experiment": args.experiment, "models": models, "dtype": args.dtype, "methods": methods,
              "batch_sizes": batch_sizes, "input_lens": input_lens, "output_len": args.output_len,
              "repeat": args.repeat, "warmup": args.warmup, "threads": ctx.threads, "seed": args.seed,
              "kv_cache_dtype": args.kv_cache_dtype}
    earlier = earlier_report(Path(args.output), config, machine) if args.resume else None
    for key in ("models", "methods", "batch_sizes", "input_lens"):  # the report covers both runs' cells
        merged = list(dict.fromkeys([*(earlier or {}).get("config", {}).get(key, []), *config[key]]))
        config[key] = merged if key in ("models", "methods") else sorted(merged)
    config["model"] = ",".join(config["models"])
    head = {"kind": "survey-quantization", "command": _command_line(), "config": config, "machine": machine}

    def checkpoint(partial: dict) -> None:
        from nimblelm.bench.report import to_json

        f = Path(args.output) / "results.json"
        f.parent.mkdir(parents=True, exist_ok=True)
        tmp = f.with_suffix(".json.tmp")  # replaced whole: an interrupted write leaves the last checkpoint
        tmp.write_text(to_json({**head, **partial}) + "\n")
        os.replace(tmp, f)

    out = run_survey_quantization(models, methods, batch_sizes=batch_sizes, input_lens=input_lens,
                                  output_len=args.output_len, threads=ctx.threads, dtype=args.dtype, seed=args.seed,
                                  kv_cache_dtype=args.kv_cache_dtype, repeat=args.repeat, warmup=args.warmup,
                                  progress=not args.no_progress, earlier=earlier,
                                  run_info={"command": head["command"], "date": machine.get("date"),
                                            "commit": machine.get("nimblelm_commit")},
                                  checkpoint=checkpoint if args.output else None)
    if earlier and len(out["runs"]) == len(earlier["runs"]):  # nothing new: the report stays as it was
        head = {k: earlier[k] for k in head}
    return {**head, **out}


def run_survey_command(args) -> dict:
    from nimblelm.bench.metrics import SLO
    from nimblelm.bench.survey import run_survey_engines

    if args.resume:
        raise InvalidRequestError("--resume continues a survey quantization run; survey engines always runs whole")
    if args.repeat < 1:
        raise InvalidRequestError(f"--repeat must be >= 1, got {args.repeat}")
    if args.prompt_len <= 0 or args.gen_len < 2:
        raise InvalidRequestError("--prompt-len must be > 0 and --gen-len >= 2")
    if args.num_prompts is None:
        args.num_prompts = 32
    if not args.tpot_slo > 0:
        raise InvalidRequestError(f"--tpot-slo must be > 0, got {args.tpot_slo}")
    try:
        fractions = [float(x) for x in args.rate_fractions.split(",") if x.strip()]
    except ValueError:
        raise InvalidRequestError(f"--rate-fractions: expected numbers, got {args.rate_fractions!r}") from None
    if any(not 0 < f < 1 for f in fractions):
        raise InvalidRequestError("--rate-fractions must be in (0, 1)")
    _check_workload_args(args)
    ctx, backends, opts, machine = _prepare(args)
    models = [m.strip() for m in (args.models or args.model).split(",") if m.strip()]

    def workload(c, k):
        return build_workload(args, c, k)

    out = run_survey_engines(models, backends, threads=ctx.threads, dtype=args.dtype, seed=args.seed,
                             max_num_seqs=args.max_num_seqs, workload=workload, prompt_len=args.prompt_len,
                             gen_len=args.gen_len, repeat=args.repeat, warmup=args.warmup, fractions=fractions,
                             slo=SLO(tpot_s=args.tpot_slo), opts=opts, progress=not args.no_progress,
                             bandwidth_gbs=machine.get("memory_bandwidth_gbs"), quantization=ctx.quantization,
                             kv_cache_dtype=ctx.kv_cache_dtype)
    config = {"experiment": args.experiment, "model": ",".join(models), "models": models, "dtype": args.dtype,
              "backends": backends, "prompt_len": args.prompt_len, "gen_len": args.gen_len, "repeat": args.repeat,
              "warmup": args.warmup, "threads": ctx.threads, "seed": args.seed, "dataset": args.dataset,
              "num_prompts": args.num_prompts, "max_num_seqs": args.max_num_seqs, "tpot_slo_s": args.tpot_slo,
              "rate_fractions": fractions, **_precision_config(args), **_workload_config(args)}
    return {"kind": "survey-engines", "command": _command_line(), "config": config, "machine": machine, **out}


def _spec_methods(args) -> dict[str, dict]:
    """speculative_config per --methods name, each checked by the engine's own SpeculativeConfig."""
    from nimblelm.speculative import SpeculativeConfig

    names = list(dict.fromkeys(m.strip() for m in (args.methods or "ngram" + (",draft_model" if args.draft_model
                                                                             else "")).split(",") if m.strip()))
    if not names or "plain" in names:
        raise InvalidRequestError("--methods: give one or more speculative methods (plain decoding is always "
                                  "measured as the baseline)")
    if "draft_model" not in names and (args.draft_model or args.draft_quantization):
        raise InvalidRequestError("--draft-model and --draft-quantization belong to method draft_model: add it to "
                                  "--methods")
    configs = {}
    for name in names:
        config = {"method": name, "num_speculative_tokens": args.num_speculative_tokens}
        if name == "medusa_tree":  # Medusa on a token tree: the chain of top-1s and a few second guesses
            config |= {"method": "medusa", "speculative_token_tree": medusa_tree(args.num_speculative_tokens)}
        if name == "ngram":
            config["prompt_lookup_max"] = args.prompt_lookup_max
        if name == "draft_model":
            if not args.draft_model:
                raise InvalidRequestError("method draft_model needs --draft-model")
            from nimblelm.models.registry import resolve

            resolve(args.draft_model)  # a wrong name fails here, not after the plain runs
            config |= {"model": args.draft_model, "quantization": args.draft_quantization}
        SpeculativeConfig.from_dict(config)
        configs[name] = config
    return configs


def medusa_tree(depth: int) -> list[list[int]]:
    """The bench's Medusa tree, depth deep: every head's top-1 after the heads before's, plus the second and
    third guesses near the root, where the heads guess best."""
    extra = [(1,), (2,), (0, 1), (1, 0), (0, 0, 1), (0, 1, 0), (1, 0, 0)]
    paths = [(0,) * d for d in range(1, depth + 1)] + [p for p in extra if len(p) <= depth]
    return [list(p) for p in paths]


def _greedy_answers(ctx, max_tokens: int, max_model_len: int, prompts: list[list[int]]) -> list[str]:
    """The target's own greedy answers (plain decoding, the run's engine settings) to prompts."""
    from nimblelm import LLM, SamplingParams

    llm = LLM(model=ctx.model, dtype=ctx.dtype, max_model_len=max_model_len, num_threads=ctx.threads,
              quantization=ctx.quantization, kv_cache_dtype=ctx.kv_cache_dtype)
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    return [o.outputs[0].text for o in outs]


def run_survey_speculative_command(args) -> dict:
    import math

    from nimblelm import corpora
    from nimblelm.bench import datasets
    from nimblelm.bench.arrivals import parse_rates
    from nimblelm.bench.backends import BenchContext
    from nimblelm.bench.runner import log
    from nimblelm.bench.survey_spec import run_survey_speculative

    if args.resume:
        raise InvalidRequestError("--resume continues a survey quantization run; survey speculative always runs whole")
    n = 8 if args.num_prompts is None else args.num_prompts
    args.workloads = args.workloads or ",".join(SPEC_WORKLOADS)
    if n < 1 or args.gen_len < 1:
        raise InvalidRequestError("--num-prompts and --gen-len must be >= 1")
    workloads = list(dict.fromkeys(w.strip() for w in args.workloads.split(",") if w.strip()))
    unknown = [w for w in workloads if w not in SPEC_WORKLOADS]
    if not workloads or unknown:
        raise InvalidRequestError(f"--workloads: comma list of {', '.join(SPEC_WORKLOADS)}"
                                  + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    batch_sizes = sorted(set(parse_int_list(args.batch_sizes or "1,8,32", "--batch-sizes")))
    if batch_sizes[0] < 1:
        raise InvalidRequestError("--batch-sizes values must be >= 1")
    try:
        rates = [] if args.request_rates.strip().lower() == "none" else parse_rates(args.request_rates)
    except ValueError as e:
        raise InvalidRequestError(f"--request-rates: {e}") from None
    if any(math.isinf(r) for r in rates):
        raise InvalidRequestError("--request-rates: give finite rates (--batch-sizes sends requests at once)")
    methods = _spec_methods(args)
    kv_policy = args.kv_policy
    if kv_policy is not None:
        from nimblelm.engine.kv_cache.policy import KVPolicy

        KVPolicy.from_dict(kv_policy)  # the engine's own checks, before anything loads
    ctx, backends, _, machine = _prepare(args)
    limit = min(2048, ctx.config.max_position_embeddings)
    tok, seed, gen = ctx.tokenizer, args.seed, args.gen_len
    chat = datasets.chat_requests(corpora.sharegpt_pairs(corpora.load_sharegpt(corpora.sharegpt_path(args.dataset_path))),
                                  tok, n + sum(batch_sizes) + 2 * n * len(rates), seed=seed, max_output_len=gen,
                                  max_total_len=limit)
    problems = (corpora.load_humaneval(corpora.humaneval_path(args.humaneval_path))
                if {"humaneval", "edit"} & set(workloads) else [])
    sets = {"chat": chat[:n],
            "humaneval": lambda: [datasets.BenchRequest(r.prompt_token_ids, gen) for r in datasets.humaneval_requests(
                problems, tok, n, seed=seed, max_total_len=limit - gen)],
            "edit": lambda: datasets.edit_requests(problems, tok, n, seed=seed, max_output_len=gen, max_total_len=limit),
            "mt": lambda: datasets.mt_requests(tok, n, partial(_greedy_answers, ctx, gen, limit), seed=seed, max_output_len=gen)}
    chosen = {w: sets[w]() if callable(sets[w]) else sets[w] for w in workloads}
    load_sets, start = {}, n
    for b in batch_sizes:  # requests no batch-1 run sent: none finds its prompt in the prefix cache
        load_sets[b], start = chat[start:start + b], start + b
    rate_sets = {}
    for rate in rates:
        rate_sets[rate], start = chat[start:start + 2 * n], start + 2 * n
    _fit_context(ctx, [*chosen.values(), *load_sets.values(), *rate_sets.values()])
    draft = None
    if args.draft_model:
        draft = BenchContext(model=args.draft_model, dtype=ctx.dtype, threads=ctx.threads,
                             max_model_len=ctx.max_model_len, seed=ctx.seed, quantization=args.draft_quantization)
    with tempfile.TemporaryDirectory(prefix="nimblelm-spec-") as folder:
        datastore = None
        if "suffix" in methods:  # built here, so that its cost (Table 5's extra cost) is measured in this run
            from nimblelm.speculative import datastore as store

            log(f"suffix: building its ShareGPT datastore for {args.model}")
            path, datastore = store.build(args.model, corpus=args.dataset_path or store.SHAREGPT,
                                          output=Path(folder) / "datastore.npz", progress=not args.no_progress)
            methods["suffix"]["datastore"] = str(path)
        layer_search = None
        if "layer_skip" in methods:  # searched here too: its cost is the method's extra cost
            from nimblelm.speculative import layer_skip

            log(f"layer_skip: searching the layers of {args.model} to skip")
            _, layer_search = layer_skip.search(
                args.model, num_speculative_tokens=args.num_speculative_tokens, threads=ctx.threads,
                corpus=args.dataset_path or "sharegpt", output=Path(folder) / "layer_skip.json",
                progress=not args.no_progress)
            # Where no subset models a gain, the first one tried (the fewest layers skipped) still runs: the
            # row shows what drafting with it costs and how much of it the draft budget keeps.
            tried = [p["skip_layers"] for p in layer_search["path"][1:2]]
            methods["layer_skip"]["skip_layers"] = layer_search["skip_layers"] or tried[0]
        out = run_survey_speculative(ctx, methods, draft=draft, workloads=chosen, load_sets=load_sets,
                                     rate_sets=rate_sets, backends=backends, logger=log, kv_policy=kv_policy)
    if datastore is not None:  # the file was the run's own (tens of MB): the report says what it held
        methods["suffix"]["datastore"] = "built in the run from " + (args.dataset_path or "ShareGPT")
    config = {"experiment": args.experiment, "model": args.model, "dtype": args.dtype, "backends": backends,
              "methods": methods, "draft_model": args.draft_model, "draft_quantization": args.draft_quantization,
              "num_speculative_tokens": args.num_speculative_tokens, "workloads": workloads, "num_prompts": n,
              "gen_len": gen, "batch_sizes": batch_sizes, "request_rates": rates, "threads": ctx.threads, "seed": seed,
              "kv_policy": kv_policy, **_precision_config(args)}
    return {"kind": "survey-speculative", "command": _command_line(), "config": config, "machine": machine,
            "datastore": datastore, "layer_search": layer_search, **out}


def _comma_list(text: str, known: Sequence[str], flag: str, allow_none: bool = False) -> list[str]:
    names = list(dict.fromkeys(w.strip() for w in text.split(",") if w.strip()))
    if allow_none and names == ["none"]:
        return []
    unknown = [w for w in names if w not in known]
    if not names or unknown:
        raise InvalidRequestError(f"{flag}: comma list of {', '.join(known)}"
                                  + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return names


def run_survey_data_command(args) -> dict:
    from nimblelm import LLM, corpora
    from nimblelm.bench import data_tasks, sot_questions
    from nimblelm.bench.lingua_peer import METHODS as LINGUA_METHODS
    from nimblelm.bench.runner import log
    from nimblelm.bench.survey_data import run_survey_data
    from nimblelm.bench.survey_sot import run_survey_sot
    from nimblelm.models.registry import largest_model
    from nimblelm.prompting.compression import METHODS
    from nimblelm.prompting.scorer import SCORER_MODEL, Scorer

    if args.resume:
        raise InvalidRequestError("--resume continues a survey quantization run; survey data always runs whole")
    n = 6 if args.num_prompts is None else args.num_prompts
    if n < 1 or args.gen_len < 1:
        raise InvalidRequestError("--num-prompts and --gen-len must be >= 1")
    workloads = _comma_list(args.workloads or ",".join(DATA_WORKLOADS), DATA_WORKLOADS, "--workloads")
    compressing = [w for w in workloads if w != "sot"]
    methods = _comma_list(args.methods or ",".join(METHODS), METHODS, "--methods", allow_none=True)
    lingua_methods = _comma_list(args.lingua_methods, LINGUA_METHODS, "--lingua-methods", allow_none=True)
    if compressing and not methods and not lingua_methods:
        raise InvalidRequestError("survey data needs a compressor: --methods or --lingua-methods")
    try:
        ratios = sorted({float(r) for r in args.ratios.split(",") if r.strip()})
    except ValueError:
        raise InvalidRequestError(f"--ratios: comma list of numbers, got {args.ratios!r}") from None
    if not ratios or ratios[0] <= 1:
        raise InvalidRequestError("--ratios: compression ratios above 1 (tokens before / after)")
    lengths = parse_int_list(args.context_tokens, "--context-tokens")
    if min(lengths) < 16:
        raise InvalidRequestError("--context-tokens values must be >= 16")
    scorer_name, judge_name = args.scorer or SCORER_MODEL, args.judge or largest_model()
    ctx, _, _, machine = _prepare(argparse.Namespace(**{**vars(args), "backends": "nimblelm"}))
    tok = ctx.tokenizer
    tasks = []
    if "qa" in workloads:
        tasks += data_tasks.doc_qa_tasks(tok, n, lengths, seed=args.seed)
    if "needle" in workloads:
        tasks += data_tasks.needle_tasks(tok, n, lengths, seed=args.seed)
    if "sharegpt" in workloads:
        pairs = corpora.sharegpt_pairs(corpora.load_sharegpt(corpora.sharegpt_path(args.dataset_path)))
        tasks += data_tasks.sharegpt_tasks(pairs, tok, n, max_prompt_tokens=max(lengths))
    if tasks:
        need = max(len(tok.encode(t.prompt(), add_special_tokens=False)) + t.max_tokens for t in tasks) + 64
        ctx.max_model_len = max(ctx.max_model_len, need)
        _check_context(ctx)
    if "sot" in workloads:  # SoT's point prompts and the judge's two answers: up to 2048 positions
        ctx.max_model_len = max(ctx.max_model_len, min(2048, ctx.config.max_position_embeddings))
    log(f"loading the answering model {args.model}")
    answerer = LLM(model=ctx.model, dtype=ctx.dtype, quantization=ctx.quantization, max_model_len=ctx.max_model_len,
                   num_threads=ctx.threads, kv_cache_dtype=ctx.kv_cache_dtype)
    out, skipped, lingua = {"results": [], "records": [], "break_even": [], "errors": {}}, {}, None
    if compressing:
        log(f"loading the scorer {scorer_name}")
        scorer = Scorer(scorer_name, num_threads=ctx.threads)
        if lingua_methods:
            from nimblelm.bench.backends import BackendUnavailable
            from nimblelm.bench.lingua_peer import LinguaCompressor

            try:
                lingua = LinguaCompressor(scorer_name, ctx.threads)
            except BackendUnavailable as e:
                skipped["llmlingua"] = str(e)
                lingua_methods = []
        out = run_survey_data(answerer, scorer, lingua, tasks, methods=methods, lingua_methods=lingua_methods,
                              ratios=ratios, reorder=args.reorder, logger=log, progress=not args.no_progress)
    sot = None
    if "sot" in workloads:
        judge = answerer if judge_name == args.model else LLM(model=judge_name, num_threads=ctx.threads,
                                                              max_model_len=ctx.max_model_len)
        sot = run_survey_sot(answerer, judge, sot_questions.questions(n, seed=args.seed), max_tokens=args.gen_len,
                             logger=log)
    config = {"experiment": args.experiment, "model": args.model, "dtype": args.dtype, "scorer": scorer_name,
              "scorer_precision": scorer.llm.llm_engine.precision if compressing else None,
              "judge": judge_name if sot else None, "methods": methods, "reorder": args.reorder,
              "lingua_methods": lingua_methods,
              "ratios": ratios, "workloads": workloads, "num_prompts": n, "context_tokens": lengths,
              "gen_len": args.gen_len, "threads": ctx.threads, "seed": args.seed,
              "llmlingua_version": lingua.version if lingua else None, **_precision_config(args)}
    return {"kind": "survey-data", "command": _command_line(), "config": config, "machine": machine,
            "skipped": skipped, "sot": sot, **out}


def _fractions(text: str, flag: str) -> list[float]:
    try:
        values = sorted({float(r) for r in text.split(",") if r.strip()})
    except ValueError:
        raise InvalidRequestError(f"{flag}: comma list of numbers, got {text!r}") from None
    if not values or not 0 < values[0] <= values[-1] < 1:
        raise InvalidRequestError(f"{flag}: kept fractions in (0, 1)")
    return values


def run_survey_longctx_command(args) -> dict:
    from nimblelm.bench import kvpress_peer
    from nimblelm.bench.data_tasks import needle_prompt
    from nimblelm.bench.runner import log, one_line
    from nimblelm.bench.survey_longctx import FULL_AT, NEEDLE_TOKENS, WORKLOADS, Grid, run_survey_longctx
    from nimblelm.engine.kv_cache.policy import METHODS, KVPolicy

    if args.resume:
        raise InvalidRequestError("--resume continues a survey quantization run; survey longctx always runs whole")
    workloads = _comma_list(args.workloads or ",".join(WORKLOADS), WORKLOADS, "--workloads")
    methods = _comma_list(args.methods or "streaming,snapkv", (*METHODS, *FULL_AT), "--methods")
    kvpress_methods = _comma_list(args.kvpress_methods or ",".join(m for m in methods if m in kvpress_peer.METHODS)
                                  or "none", kvpress_peer.METHODS, "--kvpress-methods", allow_none=True)
    ratios = _fractions(args.ratios, "--ratios")
    depths = sorted(set(parse_int_list(args.depths, "--depths")))
    if not 0 <= depths[0] <= depths[-1] <= 100:
        raise InvalidRequestError("--depths: percentages from 0 to 100")
    contexts = sorted(set(parse_int_list(args.context_tokens, "--context-tokens")))
    speed_contexts = sorted(set(parse_int_list(args.speed_contexts, "--speed-contexts")))
    budgets = sorted(set(parse_int_list(args.ppl_budgets, "--ppl-budgets")))
    if min(contexts + speed_contexts + [args.ppl_tokens, args.serve_context]) < 64:
        raise InvalidRequestError("--context-tokens, --speed-contexts, --ppl-tokens and --serve-context must be >= 64")
    if min(args.chunk, args.num_prompts, args.speed_batch) < 1 or args.gen_len < 2:
        raise InvalidRequestError("--chunk, --num-prompts and --speed-batch must be >= 1, --gen-len >= 2")
    if budgets[-1] >= args.ppl_tokens:
        raise InvalidRequestError(f"--ppl-budgets must stay below --ppl-tokens ({args.ppl_tokens}): the text must "
                                  "outgrow the budget")
    sizes = {"ppl": budgets, "speed": [args.budget], "serve": [args.serve_budget]}
    policies = [m for m in methods if m not in FULL_AT]
    for method, workload in ((m, w) for m in policies for w in workloads):  # the engine's own checks, before loading
        for budget in sizes.get(workload, []):
            policy = KVPolicy.from_dict({"method": method, "budget": budget, "per_chunk": workload == "ppl"})
            if workload == "ppl" and policy.needs_votes and args.chunk < policy.window_size:
                raise InvalidRequestError(f"--chunk must be >= {method}'s window ({policy.window_size}): a shorter "
                                          "chunk cannot vote, and the text would be compacted once at its end")
    ctx, _, _, machine = _prepare(argparse.Namespace(**{**vars(args), "backends": "nimblelm"}))
    limit = ctx.config.max_position_embeddings
    around = len(needle_prompt(ctx.tokenizer, 64, 0).token_ids) - 64  # the instruction and the question
    if max(max(contexts) + around + NEEDLE_TOKENS, args.ppl_tokens + 1, args.serve_context + args.gen_len) > limit:
        raise InvalidRequestError(f"--context-tokens, --ppl-tokens or --serve-context go beyond {args.model}'s "
                                  f"context length {limit}")
    dropped = [c for c in speed_contexts if c + args.gen_len > limit]
    speed_contexts = [c for c in speed_contexts if c + args.gen_len <= limit]
    if "speed" in workloads and not speed_contexts:
        raise InvalidRequestError(f"--speed-contexts: none fits {args.model}'s context length {limit}")
    grid = Grid(methods=tuple(methods), kvpress_methods=tuple(kvpress_methods), ratios=tuple(ratios),
                contexts=tuple(contexts), depths=tuple(depths), ppl_tokens=args.ppl_tokens,
                ppl_budgets=tuple(budgets), chunk=args.chunk, speed_contexts=tuple(speed_contexts),
                budget=args.budget, speed_batch=args.speed_batch, serve_requests=args.num_prompts, serve_context=args.serve_context,
                serve_budget=args.serve_budget, gen_len=args.gen_len)
    skipped, kvpress = {}, None
    if "needle" in workloads and args.kvpress_methods != "none":
        if args.dtype != "float32" or ctx.quantization or args.kv_cache_dtype != "auto":
            skipped["kvpress"] = "it runs float32 weights and cache: run --dtype float32 without quantization"
        else:
            try:
                kvpress_peer.ensure_env()
                from nimblelm.bench.vllm_peer import ensure_hf_folder

                kvpress = partial(kvpress_peer.generate, ensure_hf_folder(ctx), threads=ctx.threads)
            except Exception as e:  # noqa: BLE001 - the peer missing must not stop nimblelm's rows
                skipped["kvpress"] = one_line(e)
    out = run_survey_longctx(ctx, grid, workloads, kvpress=kvpress, warmup=args.warmup, seed=args.seed, logger=log)
    pins = dict(line.split("==") for line in kvpress_peer.REQUIREMENTS.read_text().splitlines()
                if "==" in line and not line.startswith("#"))
    config = {"experiment": args.experiment, "model": args.model, "dtype": args.dtype, "workloads": workloads,
              "methods": methods, "kvpress_methods": kvpress_methods if kvpress else None,
              "kvpress_version": pins.get("kvpress"), "kvpress_transformers": pins.get("transformers"),
              "ratios": ratios, "context_tokens": contexts, "depths": depths, "ppl_tokens": args.ppl_tokens,
              "ppl_budgets": budgets, "chunk": args.chunk, "speed_contexts": speed_contexts,
              "speed_contexts_dropped": dropped, "budget": args.budget, "speed_batch": args.speed_batch,
              "serve_requests": args.num_prompts,
              "serve_context": args.serve_context, "serve_budget": args.serve_budget, "gen_len": args.gen_len,
              "warmup": args.warmup, "threads": ctx.threads, "seed": args.seed, **_precision_config(args)}
    return {"kind": "survey-longctx", "command": _command_line(), "config": config, "machine": machine,
            "skipped": skipped, **out}


def run_roofline_command(args) -> dict:
    import torch

    from nimblelm.bench.machine import auto_threads, default_threads, machine_info
    from nimblelm.bench.roofline import run_roofline

    note = None
    if args.threads is not None:
        threads = args.threads
    else:
        threads, busy = auto_threads()
        note = {"auto": True, "busy_cpus_at_start": round(busy, 2), "physical_cores": default_threads()}
    if threads < 1:
        raise InvalidRequestError(f"--threads must be >= 1, got {threads}")
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    for d in dtypes:
        if d not in ("float32", "bfloat16", "float16"):
            raise InvalidRequestError(f"--dtypes: {d!r} is not one of float32, bfloat16, float16")
    sizes = parse_int_list(args.sizes_mib, "--sizes-mib")
    if any(s <= 0 for s in sizes):
        raise InvalidRequestError("--sizes-mib values must be > 0")
    if not args.budget > 0:
        raise InvalidRequestError(f"--budget must be > 0, got {args.budget}")
    torch.set_num_threads(threads)
    cfg = None
    if args.model:
        from nimblelm.bench.backends import BenchContext

        cfg = BenchContext(model=args.model).config
    from nimblelm.bench.machine import CpuMonitor

    mon = CpuMonitor()
    roof = run_roofline(cfg, threads, dtypes, sizes, budget_s=args.budget)
    roof["other_activity"] = mon.stop()
    machine = machine_info(threads)
    if note:
        machine["threads_choice"] = note
    return {"kind": "roofline", "command": _command_line(), "results": [],
            "config": {"model": args.model, "dtype": ",".join(dtypes), "threads": threads, "sizes_mib": sizes},
            "machine": machine, "roofline": roof, "backends": {}}


def run_scale_command(args) -> dict:
    from nimblelm.bench.backends import BenchContext
    from nimblelm.bench.datasets import BenchRequest, random_prompt
    from nimblelm.bench.machine import machine_info
    from nimblelm.bench.runner import log
    from nimblelm.bench.scale import run_scale
    from nimblelm.bench.throughput import workload_line, workload_summary

    names = [c.strip() for c in args.configurations.split(",") if c.strip()]
    unknown = set(names) - {"single", "single-all", "tp", "dp"}
    if unknown or not names:
        raise InvalidRequestError(f"--configurations: unknown {', '.join(sorted(unknown)) or '(none given)'}")
    if args.size < 2:
        raise InvalidRequestError(f"--size must be >= 2, got {args.size}")
    if args.alone_len < 2:
        raise InvalidRequestError(f"--alone-len must be >= 2, got {args.alone_len}")
    ctx = BenchContext(model=args.model)
    batch = build_workload(args, ctx)
    alone = BenchRequest(tuple(random_prompt(32, ctx.config.vocab_size, args.seed, ctx.special_ids())), args.alone_len)
    scale = run_scale(args.model, args.dtype, args.size, batch, alone, names, ctx.config.hidden_size,
                      ctx.config.num_layers, log)
    config = {"model": args.model, "dtype": args.dtype, "size": args.size, "dataset": args.dataset, "seed": args.seed,
              "workload": workload_line({"dataset": args.dataset, "seed": args.seed}, workload_summary(batch))
              + f"; the lone request: a 32-token prompt, {args.alone_len} tokens decoded"}
    return {"kind": "scale", "command": _command_line(), "results": [], "config": config,
            "machine": machine_info(1), "scale": scale, "backends": {}}


def run(args) -> int:
    """Run the `bench` subcommand parsed by add_bench_subparser; returns the exit code.

    Invalid options raise nimblelm.errors.InvalidRequestError (one line) for the caller to print.
    """
    cmd = getattr(args, "bench_command", None)
    if cmd == "survey":
        defaults = {"longctx": LONGCTX_DEFAULTS, "data": DATA_DEFAULTS}.get(args.experiment, SURVEY_DEFAULTS)
        for key, value in defaults.items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    if cmd == "setup":
        from nimblelm.bench.llamacpp import setup_llama_cpp

        bins = setup_llama_cpp(force=args.force)
        print(f"llama.cpp tools ready in {bins}")
        return 0
    if cmd == "latency":
        report = run_latency_command(args)
    elif cmd == "throughput":
        report = run_throughput_command(args)
    elif cmd == "serve":
        report = run_serve_command(args)
    elif cmd == "survey" and args.experiment == "quantization":
        report = run_survey_quantization_command(args)
    elif cmd == "survey" and args.experiment == "speculative":
        report = run_survey_speculative_command(args)
    elif cmd == "survey" and args.experiment == "data":
        report = run_survey_data_command(args)
    elif cmd == "survey" and args.experiment == "longctx":
        report = run_survey_longctx_command(args)
    elif cmd == "survey":
        report = run_survey_command(args)
    elif cmd == "roofline":
        report = run_roofline_command(args)
    elif cmd == "scale":
        report = run_scale_command(args)
    else:
        raise InvalidRequestError("bench needs a subcommand: latency, throughput, serve, survey, roofline or setup")
    from nimblelm.bench.machine import load_average

    end = load_average()
    report["machine"].setdefault("load_average_at_end", [round(x, 2) for x in end] if end else None)
    _emit(report, args)
    return 0 if report["results"] or report.get("roofline") or report.get("sot") or report.get("scale") else 1


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m nimblelm.bench ...`) until the main CLI wires `nimblelm bench`."""
    parser = argparse.ArgumentParser(prog="nimblelm")
    subparsers = parser.add_subparsers(dest="command")
    add_bench_subparser(subparsers)
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] != ["bench"]:
        argv = ["bench"] + argv
    args = parser.parse_args(argv)
    try:
        return run(args)
    except NimbleLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
