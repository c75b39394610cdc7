"""Benchmarks: latency (pp/tg, llama-bench style) and offline throughput, nimblelm beside its peers.

Peers (Hugging Face transformers, llama.cpp) are optional: a missing one is skipped with a one-line
reason. Entry points live in :mod:`nimblelm.bench.cli`.
"""
