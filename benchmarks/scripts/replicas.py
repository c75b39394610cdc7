"""Replicas against one engine, on the same ShareGPT load: `nimblelm bench serve` (every request sent at once) against
`nimblelm serve` with 1 thread, on Ray Serve with one replica of 1 thread, and on Ray Serve with --size replicas
of 1 thread each. Prints req/s and output tok/s of each, and the ratios to the plain server.

    python benchmarks/scripts/replicas.py -o benchmarks/results/smollm2-135m-replicas-$(git rev-parse --short HEAD)
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

CONFIGURATIONS = {  # name -> `nimblelm serve` flags beyond the model's
    "serve": [],
    "ray-serve-1": ["--ray-serve"],
    "ray-serve-dp": ["--data-parallel-size", "{size}"],
}


def start(model: str, port: int, flags: list[str]) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "nimblelm", "serve", "--model", model, "--port", str(port),
                             "--threads", "1", "--log-level", "warning", *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in proc.stdout:
        if re.search(r"\(ready", line):
            return proc
    raise RuntimeError(f"nimblelm serve {' '.join(flags)} exited before it was ready")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--size", type=int, default=2)
    p.add_argument("--num-prompts", type=int, default=64)
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("-o", "--output", required=True)
    args = p.parse_args()
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    rows = {}
    for name, flags in CONFIGURATIONS.items():
        flags = [f.format(size=args.size) for f in flags]
        proc = start(args.model, args.port, flags)
        try:
            time.sleep(2)
            subprocess.run([sys.executable, "-m", "nimblelm", "bench", "serve", "--backends", "openai", "--base-url",
                            f"http://127.0.0.1:{args.port}", "--served-model-name", args.model, "--model", args.model,
                            "--num-prompts", str(args.num_prompts), "--no-progress", "-o", str(out / name)],
                           check=True, stdout=subprocess.DEVNULL)
        finally:
            proc.terminate()
            proc.wait(120)
        result = json.loads((out / name / "results.json").read_text())["results"][0]["metrics"]
        rows[name] = result
    base = rows["serve"]
    lines = ["| configuration | req/s | vs serve | output tok/s | vs serve |", "| --- | ---: | ---: | ---: | ---: |"]
    for name, r in rows.items():
        lines.append(f"| {name} | {r['request_throughput']:.3f} | {r['request_throughput'] / base['request_throughput']:.2f}× "
                     f"| {r['output_throughput']:.1f} | {r['output_throughput'] / base['output_throughput']:.2f}× |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
