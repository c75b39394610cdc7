"""`nimblelm bench latency | throughput | setup`: argparse wiring (add_bench_subparser) and run(args)."""

from __future__ import annotations

import argparse
import shlex
import sys

from nimblelm.errors import InvalidRequestError, NimbleLMError

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_BACKENDS = "nimblelm,transformers,llama.cpp"


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
                   help=f"comma list of nimblelm, transformers, llama.cpp (default {DEFAULT_BACKENDS}); "
                        "a peer that is not installed is skipped with a one-line reason")
    p.add_argument("--threads", "-t", type=int, default=None,
                   help="threads for every backend (default: physical cores)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs before the timed ones (default 1)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-model-len", type=int, default=None,
                   help="context length given to every backend (default: what the workload needs)")
    p.add_argument("--max-num-seqs", type=int, default=64,
                   help="nimblelm's max_num_seqs; also the concurrency of every backend's throughput run")
    p.add_argument("--llamacpp-gguf", default="auto", choices=("auto", "f32", "f16", "source"),
                   help="GGUF given to llama.cpp: auto = same precision class as --dtype (f32 for float32), "
                        "written from the same file; source = the packaged GGUF as is")
    p.add_argument("--output", "-o", default=None,
                   help="folder for results.json (raw figures, config, machine) and report.md")
    p.add_argument("--format", choices=("md", "json"), default="md", help="what to print (default md)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_bench_subparser(subparsers) -> argparse.ArgumentParser:
    """Add `bench` (with latency, throughput, setup) to an argparse subparsers object."""
    bench = subparsers.add_parser("bench", help="benchmark nimblelm against its peers",
                                  description="Benchmark nimblelm against transformers and llama.cpp "
                                              "on the same weights, in the same run.")
    bench.set_defaults(func=run)
    sub = bench.add_subparsers(dest="bench_command", metavar="{latency,throughput,setup}")
    sub.required = True

    lat = sub.add_parser("latency", help="llama-bench style pp/tg tests",
                         description="Prompt processing (pp) and token generation (tg) tok/s, llama-bench style.")
    lat.add_argument("-p", "--n-prompt", default="512", help="prompt lengths, comma list (default 512)")
    lat.add_argument("-n", "--n-gen", default="128", help="generated lengths, comma list (default 128)")
    lat.add_argument("-b", "--batch-size", default="1", help="sequences per test, comma list (default 1)")
    lat.add_argument("-r", "--repeat", type=int, default=5, help="timed repetitions per test (default 5)")
    _common(lat)

    thr = sub.add_parser("throughput", help="offline throughput of N requests",
                         description="Total and output tok/s of N requests submitted at once.")
    thr.add_argument("--dataset", choices=("sharegpt", "random"), default="sharegpt")
    thr.add_argument("--dataset-path", default=None,
                     help="ShareGPT JSON file (default: fetched once into the nimblelm cache)")
    thr.add_argument("--num-prompts", type=int, default=32)
    thr.add_argument("--max-output-len", type=int, default=128,
                     help="ShareGPT: cap on each request's output length (default 128)")
    thr.add_argument("--input-len", type=int, default=128, help="random: prompt length (default 128)")
    thr.add_argument("--output-len", type=int, default=128, help="random: output length (default 128)")
    thr.add_argument("--random-range-ratio", type=float, default=0.0,
                     help="random: lengths uniform in [len*(1-r), len*(1+r)] (default 0)")
    thr.add_argument("-r", "--repeat", type=int, default=1, help="timed passes (default 1)")
    thr.add_argument("--hf-batch-size", type=int, default=None,
                     help="transformers: requests per static generate batch (default: the concurrency)")
    _common(thr)

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
    threads = args.threads if args.threads is not None else default_threads()
    if threads < 1:
        raise InvalidRequestError(f"--threads must be >= 1, got {threads}")
    if args.max_model_len is not None and args.max_model_len < 2:
        raise InvalidRequestError(f"--max-model-len must be >= 2, got {args.max_model_len}")
    if args.max_num_seqs < 1:
        raise InvalidRequestError(f"--max-num-seqs must be >= 1, got {args.max_num_seqs}")
    torch.set_num_threads(threads)
    ctx = BenchContext(model=args.model, dtype=args.dtype, threads=threads, max_model_len=args.max_model_len or 0,
                       max_num_seqs=args.max_num_seqs, seed=args.seed)
    opts = {"llamacpp_gguf_type": args.llamacpp_gguf, "hf_batch_size": getattr(args, "hf_batch_size", None)}
    return ctx, backends, opts, machine_info(threads)


def _check_context(ctx) -> None:
    limit = ctx.config.max_position_embeddings
    if limit and ctx.max_model_len > limit:
        raise InvalidRequestError(
            f"the workload needs {ctx.max_model_len} positions, more than the model's context length {limit}")


def _emit(report: dict, args) -> None:
    from nimblelm.bench.report import to_json, to_markdown, write_report

    if args.output:
        j, m = write_report(report, args.output)
        print(f"wrote {j} and {m}", file=sys.stderr)
    print(to_json(report) if args.format == "json" else to_markdown(report))


def run_latency_command(args) -> dict:
    from nimblelm.bench.latency import make_tests, run_latency

    p = parse_int_list(args.n_prompt, "-p")
    n = parse_int_list(args.n_gen, "-n")
    b = parse_int_list(args.batch_size, "-b")
    tests = make_tests(p, n, b)
    if args.repeat < 1:
        raise InvalidRequestError(f"--repeat must be >= 1, got {args.repeat}")
    if args.warmup < 0:
        raise InvalidRequestError(f"--warmup must be >= 0, got {args.warmup}")
    ctx, backends, opts, machine = _prepare(args)
    ctx.max_model_len = max(ctx.max_model_len, max(p) + 1, max(n) + 1)
    _check_context(ctx)
    ctx.max_num_seqs = max(ctx.max_num_seqs, max(b))
    out = run_latency(ctx, backends, tests, repeat=args.repeat, warmup=args.warmup, backend_opts=opts,
                      progress=not args.no_progress)
    config = {"model": args.model, "dtype": args.dtype, "backends": backends, "n_prompt": p, "n_gen": n,
              "batch": b, "repeat": args.repeat, "warmup": args.warmup, "threads": ctx.threads,
              "seed": args.seed, "max_model_len": ctx.max_model_len, "max_num_seqs": ctx.max_num_seqs,
              "llamacpp_gguf": args.llamacpp_gguf}
    return {"kind": "latency", "command": _command_line(), "config": config, "machine": machine, **out}


def build_workload(args, ctx) -> list:
    from nimblelm.bench import datasets

    if args.num_prompts <= 0:
        raise InvalidRequestError(f"--num-prompts must be > 0, got {args.num_prompts}")
    if args.dataset == "sharegpt":
        if args.max_output_len <= 0:
            raise InvalidRequestError(f"--max-output-len must be > 0, got {args.max_output_len}")
        path = datasets.sharegpt_path(args.dataset_path)
        pairs = datasets.sharegpt_pairs(datasets.load_sharegpt(path))
        limit = min(2048, args.max_model_len or 2048, ctx.config.max_position_embeddings)
        return datasets.sample_sharegpt(pairs, ctx.tokenizer, args.num_prompts, seed=args.seed,
                                        max_output_len=args.max_output_len, max_prompt_len=min(1024, limit - 4),
                                        max_total_len=limit)
    return datasets.random_requests(args.num_prompts, args.input_len, args.output_len,
                                    vocab_size=ctx.config.vocab_size, range_ratio=args.random_range_ratio,
                                    seed=args.seed, exclude_ids=ctx.special_ids())


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
    if args.dataset == "random":
        if args.input_len <= 0 or args.output_len <= 0:
            raise InvalidRequestError("--input-len and --output-len must be > 0")
        if not 0.0 <= args.random_range_ratio < 1.0:
            raise InvalidRequestError(f"--random-range-ratio must be in [0, 1), got {args.random_range_ratio}")
    ctx, backends, opts, machine = _prepare(args)
    requests = build_workload(args, ctx)
    ctx.max_model_len = max(ctx.max_model_len, max(r.prompt_len + r.output_len for r in requests) + 1)
    _check_context(ctx)
    out = run_throughput(ctx, backends, requests, repeat=args.repeat, warmup=args.warmup, backend_opts=opts,
                         progress=not args.no_progress)
    config = {"model": args.model, "dtype": args.dtype, "backends": backends, "dataset": args.dataset,
              "num_prompts": args.num_prompts, "seed": args.seed, "repeat": args.repeat, "warmup": args.warmup,
              "threads": ctx.threads, "max_model_len": ctx.max_model_len, "max_num_seqs": ctx.max_num_seqs,
              "llamacpp_gguf": args.llamacpp_gguf}
    if args.dataset == "sharegpt":
        config["max_output_len"] = args.max_output_len
    else:
        config.update(input_len=args.input_len, output_len=args.output_len,
                      random_range_ratio=args.random_range_ratio)
    return {"kind": "throughput", "command": _command_line(), "config": config, "machine": machine, **out}


def run(args) -> int:
    """Run the `bench` subcommand parsed by add_bench_subparser; returns the exit code.

    Invalid options raise nimblelm.errors.InvalidRequestError (one line) for the caller to print.
    """
    cmd = getattr(args, "bench_command", None)
    if cmd == "setup":
        from nimblelm.bench.llamacpp import setup_llama_cpp

        bins = setup_llama_cpp(force=args.force)
        print(f"llama.cpp tools ready in {bins}")
        return 0
    if cmd == "latency":
        report = run_latency_command(args)
    elif cmd == "throughput":
        report = run_throughput_command(args)
    else:
        raise InvalidRequestError("bench needs a subcommand: latency, throughput or setup")
    from nimblelm.bench.machine import load_average

    end = load_average()
    report["machine"]["load_average_at_end"] = [round(x, 2) for x in end] if end else None
    _emit(report, args)
    return 0 if report["results"] else 1


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
