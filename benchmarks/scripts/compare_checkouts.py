"""The same benchmarks from two checkouts of nimblelm, alternated in one run: is the newer one as fast?

Runs, from each checkout's folder with this Python, `nimblelm bench latency` (batch 1, pp512 and tg128)
in float32, int8 and int4, and `nimblelm bench throughput` on 32 ShareGPT requests, `--rounds` times,
alternating base and new so that both see the same machine state. Prints per test the median tokens/s
of each, their ratio, and the spread of the rounds (max/min of each side) as the run's noise.
Usage: python benchmarks/scripts/compare_checkouts.py BASE_DIR NEW_DIR [--rounds 2] [--threads 2] [--only TEXT]
"""

import argparse
import json
import statistics
import subprocess
import sys

LATENCY = ["latency", "-p", "512", "-n", "128", "-b", "1", "-r", "3"]
THROUGHPUT = ["throughput", "--dataset", "sharegpt", "--num-prompts", "32", "--max-output-len", "128", "-r", "1"]
TESTS = [(f"{q} {t}", LATENCY + ["--quantization", q], t) for q in ("none", "int8", "int4") for t in ("pp512", "tg128")]
TESTS.append(("sharegpt-32 output tok/s", THROUGHPUT, "throughput"))


def run(folder: str, args: list[str], threads: int) -> dict:
    cmd = [sys.executable, "-m", "nimblelm", "bench", *args, "--backends", "nimblelm", "-t", str(threads),
           "--format", "json", "--no-progress", "--model", "smollm2-135m"]
    out = subprocess.run(cmd, cwd=folder, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def value(report: dict, test: str) -> float:
    if test == "throughput":
        [row] = report["results"]
        return row["mean_output_tok_s"]
    return next(r["mean_ts"] for r in report["results"] if r["test"] == test)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("base")
    p.add_argument("new")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default="", help="only the tests whose name contains this")
    a = p.parse_args()
    tests = [t for t in TESTS if a.only in t[0]]
    samples: dict[tuple[str, str], list[float]] = {}
    machine = {}
    commands = {}
    for args in {tuple(args) for _, args, _ in tests}:
        commands[args] = [t for t in tests if tuple(t[1]) == args]
    for _ in range(a.rounds):
        for args, group in commands.items():
            for side, folder in (("base", a.base), ("new", a.new)):
                report = run(folder, list(args), a.threads)
                machine[side] = report["machine"]
                for name, _, test in group:
                    samples.setdefault((name, side), []).append(value(report, test))
    m = machine["new"]
    print(f"{m['cpu_model']} ({' '.join(m['cpu_features'])}), {a.threads} threads, base "
          f"{machine['base']['nimblelm_commit']} vs new {m['nimblelm_commit']}, {a.rounds} rounds, {m['date']}")
    print("| test | base tok/s | new tok/s | new / base | spread base, new |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, _, _ in tests:
        base, new = samples[(name, "base")], samples[(name, "new")]
        mb, mn = statistics.median(base), statistics.median(new)
        print(f"| {name} | {mb:.1f} | {mn:.1f} | {mn / mb:.3f} | {max(base) / min(base):.3f}, {max(new) / min(new):.3f} |")


if __name__ == "__main__":
    main()
