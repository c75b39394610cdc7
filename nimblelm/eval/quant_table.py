"""`nimblelm eval quantization`: what each quantization setting costs in quality, beside its size and speed.

For one model, every setting is loaded the way a user would load it (on-the-fly options through
`LLM(...)`, calibrated methods through `nimblelm quantize`'s code into a folder that `LLM(model=DIR)`
then reads) and measured on the same inputs:
- perplexity on the fixed text set of `nimblelm eval ppl`, and its change against fp32;
- greedy agreement with fp32: `--greedy-prompts` HumanEval prompts (held out: calibration reads ShareGPT,
  perplexity pydoc) each generate `--greedy-tokens` tokens with ignore_eos; per prompt, the share of
  tokens before the first one that differs from fp32's, and how many prompts match all the way;
- the bytes of the weights the engine holds, and batch-1 decode tokens/s.
GPTQ, AWQ and SmoothQuant share one calibration pass (the statistics of the fp32 model's inputs).
The issue's acceptance bounds are computed in the report, never asserted.
"""

from __future__ import annotations

import gc
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from nimblelm.errors import InvalidRequestError
from nimblelm.quantization.int4 import GROUP_SIZES
from nimblelm.quantization.kv_int8 import float_kv_layers


@dataclass(frozen=True)
class Setting:
    name: str
    label: str  # "{g}" is the 4-bit group size the run settled on
    options: dict = field(default_factory=dict)  # LLM(...) options of an on-the-fly setting
    method: str | None = None  # a `nimblelm quantize` method: written to a folder, then loaded
    bits: int | None = None


SETTINGS = {s.name: s for s in (
    Setting("fp32", "fp32"),
    Setting("int8", "RTN int8 g32", {"quantization": "int8"}),
    Setting("int4-g32", "RTN int4 g32", {"quantization": "int4"}),
    Setting("rtn-int4", "RTN int4 g{g}", method="rtn", bits=4),
    Setting("gptq-int4", "GPTQ int4 g{g}", method="gptq", bits=4),
    Setting("awq-int4", "AWQ int4 g{g}", method="awq", bits=4),
    Setting("smoothquant", "SmoothQuant W8A8", method="smoothquant", bits=8),
    Setting("kv-fp16", "KV cache float16", {"kv_cache_dtype": "float16"}),
    Setting("kv-bf16", "KV cache bfloat16", {"kv_cache_dtype": "bfloat16"}),
    Setting("kv-int8", "KV cache int8", {"kv_cache_dtype": "int8"}),
    Setting("kv-int4", "KV cache int4 (KIVI)", {"kv_cache_dtype": "int4"}),
    Setting("kv-int2", "KV cache int2 (KIVI)", {"kv_cache_dtype": "int2"}),
    # KIVI's key groups of 32 tokens: fewer scale bytes, wider ranges
    Setting("kv-int4-b32", "KV cache int4 (KIVI), 32-token blocks", {"kv_cache_dtype": "int4", "block_size": 32}),
    Setting("kv-int2-b32", "KV cache int2 (KIVI), 32-token blocks", {"kv_cache_dtype": "int2", "block_size": 32}),
    # A residual of one 16-token block (the query's own) instead of 128 tokens
    Setting("kv-int4-r16", "KV cache int4 (KIVI), 16-token residual", {"kv_cache_dtype": "int4", "kv_residual_length": 16}),
    Setting("kv-int2-r16", "KV cache int2 (KIVI), 16-token residual", {"kv_cache_dtype": "int2", "kv_residual_length": 16}),
    # 16-bit storage of the float weights, float32 compute (the CPU kernels' meaning of these dtypes)
    Setting("bf16", "bfloat16 weights", {"dtype": "bfloat16"}),
    Setting("fp16", "float16 weights", {"dtype": "float16"}),
    # dtype="auto"'s bfloat16 on AVX2 and AVX-512 CPUs: a low-bit cache keeps its residual in bfloat16 too
    Setting("bf16-kv-int4", "bfloat16 weights, KV cache int4 (KIVI)", {"dtype": "bfloat16", "kv_cache_dtype": "int4"}),
    Setting("bf16-kv-int2", "bfloat16 weights, KV cache int2 (KIVI)", {"dtype": "bfloat16", "kv_cache_dtype": "int2"}),
)}
# The bounds: (setting, setting it must beat) and (setting, largest perplexity change in %).
BEATS = (("gptq-int4", "rtn-int4"), ("awq-int4", "rtn-int4"))
MAX_CHANGE_PCT = (("int8", 1.0), ("kv-int8", 1.0), ("kv-int4", 1.0), ("smoothquant", 3.0))
PROMPT_TOKENS = 384  # the longest held-out prompt taken


def parse_settings(text: str) -> list[Setting]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        raise InvalidRequestError(f"unknown setting {', '.join(unknown) or repr(text)}: choose from "
                                  f"{', '.join(SETTINGS)}")
    # fp32 is every comparison's reference, so it always runs, first.
    return [SETTINGS["fp32"]] + [SETTINGS[n] for n in dict.fromkeys(names) if n != "fp32"]


def int4_group(config, requested: int) -> int:
    """The largest int4 group size up to `requested` that divides every linear layer's input (SmolLM2's
    576-wide layers take no group of 128)."""
    from nimblelm.quantization.saved import linear_shapes

    widths = {k for _, k in linear_shapes(config).values()}
    for g in sorted(GROUP_SIZES, reverse=True):
        if g <= requested and all(k % g == 0 for k in widths):
            return g
    raise InvalidRequestError(f"no int4 group size divides every layer's input ({sorted(widths)})")


def heldout_prompts(tokenizer, count: int, max_len: int) -> tuple[list[str], list[list[int]]]:
    """(task ids, token ids) of the first `count` HumanEval prompts of at most max_len tokens."""
    from nimblelm import corpora
    from nimblelm.eval.ppl import encode

    ids, prompts = [], []
    for problem in corpora.load_humaneval(corpora.humaneval_path()):
        tokens = encode(tokenizer, problem["prompt"])
        if len(tokens) <= max_len:
            ids.append(problem["task_id"])
            prompts.append(tokens)
        if len(prompts) == count:
            return ids, prompts
    raise InvalidRequestError(f"only {len(prompts)} HumanEval prompts fit in {max_len} tokens, {count} asked")


def matched_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def decode_speed(llm, prompt: list[int], tokens: int, repeat: int) -> list[float]:
    """Batch-1 decode tokens/s of `prompt` generating `tokens` tokens, after one warm-up: the tokens after
    the first over the time from the first token to the last."""
    from nimblelm import SamplingParams

    params = SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)
    speeds = []
    for i in range(repeat + 1):
        out = llm.generate([prompt], params, use_tqdm=False)[0]
        if i:
            speeds.append((tokens - 1) / (out.metrics.finished_time - out.metrics.first_token_time))
    return speeds


def run_quant_quality(
    model: str, settings: Sequence[Setting], *, group_size: int = 128, calib_samples: int = 64,
    calib_seq_len: int = 512, act_order: bool = True, seed: int = 0, text_set: str = "pydoc", window: int = 512,
    max_tokens: int = 8192, greedy_prompts: int = 8, greedy_tokens: int = 128, repeat: int = 3,
    threads: int | None = None, progress: bool = True, logger: Callable[[str], None] | None = None,
) -> dict:
    """Measure every setting (settings[0] must be fp32, the reference). Returns {"results": rows, ...}."""
    from nimblelm import LLM, SamplingParams
    from nimblelm.bench.backends import mean_std
    from nimblelm.bench.machine import CpuMonitor
    from nimblelm.eval.ppl import NimbleLMScorer, perplexity
    from nimblelm.quantization.quantize import calibrate, dense_llm, make_config, quantize_loaded

    log = logger or (lambda msg: print(msg, file=sys.stderr, flush=True))
    if settings[0].name != "fp32":
        raise InvalidRequestError("the first setting must be fp32: every comparison is against it")
    if group_size not in GROUP_SIZES:
        raise InvalidRequestError(f"--group-size must be one of {', '.join(map(str, GROUP_SIZES))}, got {group_size}")
    for name, value in (("--greedy-prompts", greedy_prompts), ("--greedy-tokens", greedy_tokens),
                        ("--repeat", repeat), ("--calib-samples", calib_samples)):
        if value < 1:
            raise InvalidRequestError(f"{name} must be >= 1, got {value}")
    max_len = max(window, PROMPT_TOKENS + greedy_tokens)
    engine = {"dtype": "float32", "max_model_len": max_len, "max_num_seqs": greedy_prompts, "num_threads": threads}
    greedy = SamplingParams(max_tokens=greedy_tokens, temperature=0.0, ignore_eos=True)
    rows: list[dict] = []
    reference: dict = {}

    def measure(setting: Setting, llm, quantize_s: float | None) -> None:
        monitor = CpuMonitor()
        ppl = perplexity(model, text_set=text_set, seed=seed, window=window, max_tokens=max_tokens,
                         scorer=NimbleLMScorer(llm=llm), tokenizer=llm.tokenizer, progress=progress)
        if not reference:
            reference["task_ids"], reference["prompts"] = heldout_prompts(llm.tokenizer, greedy_prompts,
                                                                          PROMPT_TOKENS)
        outs = [o.outputs[0].token_ids for o in llm.generate(reference["prompts"], greedy, use_tqdm=False)]
        reference.setdefault("tokens", outs)
        matched = [matched_prefix(a, b) for a, b in zip(outs, reference["tokens"])]
        speeds = decode_speed(llm, reference["prompts"][0], greedy_tokens, repeat)
        row = {"setting": setting.name, "label": setting.label.format(g=group), "ppl": ppl.ppl, "nll": ppl.nll,
               "scored_tokens": ppl.scored_tokens, "text_sha256": ppl.text_sha256,
               "delta_pct": 100.0 * (ppl.ppl / rows[0]["ppl"] - 1.0) if rows else 0.0,
               "greedy_matched": matched, "agreement": sum(matched) / (greedy_tokens * len(matched)),
               "identical": sum(m == greedy_tokens for m in matched), "weights_nbytes": int(llm.weights_nbytes),
               "decode_ts": [round(x, 3) for x in speeds], "quantize_s": quantize_s,
               "other_activity": monitor.stop()}
        row["mean_decode_ts"], row["std_decode_ts"] = mean_std(speeds)
        runner = llm.llm_engine.runner
        row["kv_bytes_per_token"] = runner.kv_bytes_per_block() / runner.block_size
        if runner.int8_kv_errors:  # an int8 cache: the layers it keeps in float, and why
            row["int8_kv_errors"] = [round(e, 4) for e in runner.int8_kv_errors]
            row["float_kv_layers"] = float_kv_layers(runner.int8_kv_errors)
        rows.append(row)
        log(f"{model} {row['label']}: perplexity {row['ppl']:.4f} ({row['delta_pct']:+.2f}%), greedy agreement "
            f"{100 * row['agreement']:.1f}% ({row['identical']}/{len(matched)} identical), "
            f"{row['weights_nbytes'] / 2**20:.0f} MiB, KV {row['kv_bytes_per_token'] / 1024:.1f} KiB a token, "
            f"{row['mean_decode_ts']:.1f} tok/s")

    fp32 = LLM(model=model, **engine)
    group = int4_group(fp32.model_config, group_size)
    measure(settings[0], fp32, None)
    del fp32
    gc.collect()

    stats, calib_s = None, None
    with tempfile.TemporaryDirectory(prefix="nimblelm-quality-") as tmp:
        for setting in settings[1:]:
            if setting.method is None:
                measure(setting, LLM(model=model, **{**engine, **setting.options}), None)
                gc.collect()
                continue
            group_of = group if setting.bits == 4 else None
            qconfig = make_config(model, setting.method, setting.bits, group_of, calib_samples=calib_samples,
                                  calib_seq_len=calib_seq_len, seed=seed, act_order=act_order)
            dense = dense_llm(model, threads, calib_seq_len)
            if qconfig.calibration and stats is None:
                t0 = time.perf_counter()
                stats = calibrate(dense, qconfig, progress=progress)
                calib_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            folder = Path(tmp) / setting.name
            quantize_loaded(dense, qconfig, stats, folder, progress)
            quantize_s = time.perf_counter() - t0
            del dense
            gc.collect()
            measure(setting, LLM(model=str(folder), **engine), quantize_s)
            gc.collect()
    return {"results": rows, "group_size": group, "requested_group_size": group_size,
            "calibration_s": calib_s, "task_ids": reference["task_ids"]}


def acceptance(rows: Sequence[dict]) -> list[str]:
    """The issue's bounds, met or missed, for the settings that ran."""
    by = {r["setting"]: r for r in rows}
    lines = []
    for better, worse in BEATS:
        if better in by and worse in by:
            a, b = by[better], by[worse]
            verdict = "met" if a["ppl"] < b["ppl"] else "missed"
            lines.append(f"{a['label']} below {b['label']}: {a['ppl']:.4f} against {b['ppl']:.4f}: {verdict}")
    for name, bound in MAX_CHANGE_PCT:
        if name in by:
            r = by[name]
            verdict = "met" if abs(r["delta_pct"]) < bound else "missed"
            lines.append(f"{r['label']} changes perplexity by under {bound:g}%: {r['delta_pct']:+.2f}%: {verdict}")
    return lines


def kv_layers_line(row: dict) -> str:
    """Which layers an int8 cache kept in float, with the probe's figures."""
    errors, kept = row["int8_kv_errors"], row["float_kv_layers"]
    if not kept:
        return f"{row['label']}: all {len(errors)} layers int8 (the probe's largest change: {100 * max(errors):.1f}%)."
    moved = ", ".join(f"layer {i} {100 * errors[i]:.1f}%" for i in kept)
    rest = max((e for i, e in enumerate(errors) if i not in kept), default=0.0)
    return (f"{row['label']}: {len(kept)} of {len(errors)} layers keep K/V in float; int8 would move their attention "
            f"output by {moved} (the int8 layers: at most {100 * rest:.1f}%).")


def quant_quality_markdown(report: dict) -> str:
    from nimblelm.bench.report import fmt_mean_std, machine_lines

    cfg = report["config"]
    rows = report["results"]
    n = len(report["task_ids"])
    lines = [f"# Quantization quality: {cfg['model']}", "", *machine_lines(report), ""]
    lines += [
        (f"Perplexity: text set `{cfg['text_set']}`, the first {cfg['max_tokens']} tokens in windows of "
         f"{cfg['window']} ({rows[0]['scored_tokens']} tokens scored). Greedy agreement: {n} HumanEval prompts "
         f"({', '.join(report['task_ids'])}), {cfg['greedy_tokens']} tokens each with ignore_eos; the share of "
         f"tokens before the first difference from fp32, and the prompts identical throughout. Decode: batch 1, "
         f"{cfg['greedy_tokens']} tokens, mean ± std of {cfg['repeat']} after one warm-up."), "",
        f"4-bit groups of {report['group_size']}"
        + (f" (asked {report['requested_group_size']}: it does not divide every layer's input)"
           if report["group_size"] != report["requested_group_size"] else "")
        + (f". Calibration (GPTQ, AWQ, SmoothQuant, one shared pass): {cfg['calib_samples']} ShareGPT windows of "
           f"{cfg['calib_seq_len']} tokens, seed {cfg['seed']}, {report['calibration_s']:.0f} s; GPTQ act-order "
           f"{'on' if cfg['act_order'] else 'off'}." if report.get("calibration_s") is not None else "."), "",
        ("| setting | perplexity | change | greedy agreement | identical | weights | KV a token | decode tok/s b1 "
         "| quantize s |"),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        q = f"{r['quantize_s']:.0f}" if r.get("quantize_s") is not None else "-"
        lines.append(f"| {r['label']} | {r['ppl']:.4f} | {r['delta_pct']:+.2f}% | {100 * r['agreement']:.1f}% | "
                     f"{r['identical']}/{n} | {r['weights_nbytes'] / 2**20:.0f} MiB | "
                     f"{r['kv_bytes_per_token'] / 1024:.1f} KiB | {fmt_mean_std(r['mean_decode_ts'], r['std_decode_ts'])} | {q} |")
    for r in rows:
        if "float_kv_layers" in r:
            lines += ["", kv_layers_line(r)]
    checks = acceptance(rows)
    if checks:
        lines += ["", "Issue 5's bounds (computed, not asserted):", "", *[f"- {c}" for c in checks]]
    busy = [r["label"] for r in rows if (r["other_activity"].get("other_share") or 0) > 0.05]
    if busy:
        lines += ["", f"Other processes took over 5% of the machine while measuring: {', '.join(busy)}."]
    return "\n".join(lines) + "\n"
