"""Disaggregated prefill and decode against one colocated engine, under the same mixed ShareGPT load arriving as a
Poisson process: TTFT and TPOT percentiles and output tokens/s of each (distributed/disaggregated.py).

The colocated engine gets all the cores in one Ray actor; the disaggregated pair splits them, a prefill and a
decode instance of cpus/2 each, the prompts' KV blocks going through Ray's object store.

    python benchmarks/scripts/disaggregated.py -o benchmarks/results/smollm2-135m-disaggregated-$(git rev-parse --short HEAD)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def summary(outputs) -> dict:
    ttft = sorted(o.metrics.first_token_time - o.metrics.arrival_time for o in outputs)
    tpot = sorted((o.metrics.finished_time - o.metrics.first_token_time) / (len(o.outputs[0].token_ids) - 1)
                  for o in outputs if len(o.outputs[0].token_ids) > 1)
    span = max(o.metrics.finished_time for o in outputs) - min(o.metrics.arrival_time for o in outputs)

    def pct(xs, q):
        return xs[min(len(xs) - 1, int(q * len(xs)))]

    return {"ttft_p50_s": pct(ttft, 0.5), "ttft_p99_s": pct(ttft, 0.99), "tpot_p50_s": pct(tpot, 0.5),
            "tpot_p99_s": pct(tpot, 0.99), "output_tok_s": sum(len(o.outputs[0].token_ids) for o in outputs) / span,
            "req_s": len(outputs) / span}


def main() -> int:
    import ray

    from nimblelm import SamplingParams, corpora
    from nimblelm.bench.arrivals import arrival_times
    from nimblelm.bench.datasets import sample_sharegpt
    from nimblelm.bench.machine import machine_info
    from nimblelm.distributed.disaggregated import DisaggregatedLLM, colocated, serve_online
    from nimblelm.models.loader import load_model

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--num-prompts", type=int, default=48)
    p.add_argument("--rate", type=float, default=1.5, help="requests per second (Poisson)")
    p.add_argument("--max-output-len", type=int, default=128)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args()

    tokenizer = load_model(args.model, progress=False).tokenizer
    pairs = corpora.sharegpt_pairs(corpora.load_sharegpt(corpora.sharegpt_path()))
    workload = sample_sharegpt(pairs, tokenizer, args.num_prompts, seed=args.seed, max_output_len=args.max_output_len)
    times = arrival_times(args.num_prompts, args.rate, seed=args.seed)
    requests = [({"prompt_token_ids": list(r.prompt_token_ids)},
                 SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True), t)
                for r, t in zip(workload, times)]
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    options = {"dtype": "float32", "max_num_seqs": args.num_prompts}
    results = {}
    engine = colocated(args.model, cpus=args.cpus, **options)
    serve_online(requests[:2], engine)  # warm-up
    results["colocated"] = summary(serve_online(requests, engine))
    ray.kill(engine)
    pair = DisaggregatedLLM(args.model, cpus_per_instance=args.cpus / 2, **options)
    pair.serve(requests[:2])
    results["disaggregated"] = summary(pair.serve(requests))
    pair.close()

    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    prompt_tokens = sum(len(r.prompt_token_ids) for r in workload)
    output_tokens = sum(r.output_len for r in workload)
    report = {"command": "python " + " ".join(sys.argv), "machine": machine_info(), "config": vars(args),
              "workload": f"{args.num_prompts} ShareGPT requests (seed {args.seed}), {prompt_tokens} prompt + "
                          f"{output_tokens} output tokens, Poisson arrivals at {args.rate} req/s",
              "results": results}
    (out / "results.json").write_text(json.dumps(report, indent=1) + "\n")
    lines = [(f"- workload: {report['workload']}; {args.cpus} CPUs: colocated 1 engine × {args.cpus} threads, "
              f"disaggregated 2 engines × {args.cpus // 2}"), "",
             "| configuration | TTFT p50 | TTFT p99 | TPOT p50 | TPOT p99 | output tok/s | req/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['ttft_p50_s']:.3f} s | {r['ttft_p99_s']:.3f} s | {1000 * r['tpot_p50_s']:.0f} ms "
                     f"| {1000 * r['tpot_p99_s']:.0f} ms | {r['output_tok_s']:.1f} | {r['req_s']:.3f} |")
    (out / "report.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
