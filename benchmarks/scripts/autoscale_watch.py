"""Watch `nimblelm serve --min-replicas 1 --max-replicas 2` (Ray Serve's autoscaler) scale up under load.

24 clients keep a request each in flight for SECONDS (every prompt new, so the prefix-affinity policy has no owner
to keep it on); each response's replica (x-nimblelm-replica) and time are recorded, and the summary says when
each replica first answered.

    python benchmarks/scripts/autoscale_watch.py 150
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess
import sys
import time

import httpx2 as httpx

PORT = 8124
CLIENTS = 24


def main() -> int:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 120
    server = subprocess.Popen(
        [sys.executable, "-m", "nimblelm", "serve", "--model", "smollm2-135m", "--port", str(PORT), "--min-replicas",
         "1", "--max-replicas", "2", "--max-num-seqs", "8", "--threads", "1", "--log-level", "warning"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in server.stdout:
        print(line, end="")
        if "(ready" in line:
            break
    start = time.time()
    log = []  # (answered at, replica)

    def client(i: int) -> None:
        while time.time() - start < seconds:
            body = {"model": "smollm2-135m", "prompt": f"Story {i} part {len(log)}:", "max_tokens": 64,
                    "temperature": 0.8}
            response = httpx.post(f"http://127.0.0.1:{PORT}/v1/completions", json=body, timeout=300)
            response.raise_for_status()
            log.append((round(time.time() - start, 1), response.headers["x-nimblelm-replica"]))

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(client, range(CLIENTS)))
    server.send_signal(signal.SIGINT)
    server.wait(120)
    replicas = sorted({r for _, r in log})
    print(json.dumps({"requests": len(log), "seconds": seconds,
                      "first_answer_s": {r: min(t for t, rr in log if rr == r) for r in replicas},
                      "answers": {r: sum(rr == r for _, rr in log) for r in replicas}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
