"""A `nimblelm serve` process for tests: started on a free loopback port (--port 0), stopped by a signal."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx2 as httpx

REPO = Path(__file__).resolve().parents[1]


class ServerProcess:
    def __init__(self, model, *args: str, env: dict[str, str] | None = None, timeout: float = 300):
        self.stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - lives as long as the server
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nimblelm", "serve", "--model", str(model), "--port", "0",
             "--log-level", "warning", *args],
            cwd=REPO,  # so that `-m nimblelm` is this checkout's code
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            text=True,
            env={**os.environ, **(env or {})},
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(target=lambda: [lines.put(line) for line in self.proc.stdout], daemon=True).start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.stop(signal.SIGKILL)
                raise RuntimeError(f"the server did not get ready in {timeout} s:\n{self.errors()}") from None
            match = re.search(r"on (http://\S+)/v1 \(ready", line)
            if match:
                break
        self.url = match.group(1)
        self.base_url = self.url + "/v1"

    def errors(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read()

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """Send `sig` and wait for the exit; returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def get(self, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kwargs)

    def post(self, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kwargs)

    def metrics(self) -> dict[str, float]:
        """The /metrics samples as {name{labels}: value}, with the model_name label left out."""
        out = {}
        for line in self.get("/metrics").text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[re.sub(r'model_name="[^"]*",?', "", name).replace("{}", "")] = float(value)
        return out

    def wait_idle(self, timeout: float = 30) -> dict[str, float]:
        """Metrics once no request runs or waits (the gauges are updated after every engine step)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if m["nimblelm_requests_running"] == 0 and m["nimblelm_requests_waiting"] == 0:
                return m
            if time.monotonic() > deadline:
                raise AssertionError(f"the server is not idle after {timeout} s: {m}")
            time.sleep(0.05)
