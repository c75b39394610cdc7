"""Disaggregated prefill and decode: one engine computes prompts, another generates from them, and each prompt's KV
blocks travel between the two through Ray's object store.

Each engine runs in a Ray actor of its own. The prefill instance computes a prompt (and samples nothing that is
kept), then reads out the K/V of the prompt's full blocks with their prefix-cache hashes (LLMEngine.export_prefix).
The decode instance writes them into free blocks of its own cache and files them under the same hashes
(LLMEngine.import_prefix), so the request that follows finds them as a prefix-cache hit: it computes only the
prompt's last, partial block and then generates, as if it had computed the whole prompt itself. A prompt's
generation therefore never shares a step with another prompt's long prefill.
"""

from __future__ import annotations

from collections.abc import Sequence

from nimblelm.errors import InvalidRequestError
from nimblelm.outputs import RequestOutput
from nimblelm.sampling_params import SamplingParams


class _Instance:
    """An LLM in a Ray actor."""

    def __init__(self, model: str, options: dict):
        from nimblelm.llm import LLM

        self.llm = LLM(model, **options)

    def prefill(self, prompts: list) -> list:
        """Compute the prompts (each to its first sampled token) and return each one's prefix KV."""
        self.llm.generate(prompts, SamplingParams(max_tokens=1), use_tqdm=False)
        return [self.llm.llm_engine.export_prefix(p) for p in prompts]

    def decode(self, prompts: list, params: list[SamplingParams], prefixes: list) -> list[RequestOutput]:
        engine = self.llm.llm_engine
        for prefix in prefixes:
            engine.import_prefix(prefix)
        return self.llm.generate(prompts, params, use_tqdm=False)

    def stats(self):
        return self.llm.llm_engine.stats()


class DisaggregatedLLM:
    """`generate` as LLM's, with prompts computed on a prefill instance and generated on a decode instance."""

    def __init__(self, model: str, prefill_options: dict | None = None, decode_options: dict | None = None,
                 cpus_per_instance: float = 1, **options):
        """options: engine options of both instances; prefill_options and decode_options add to them."""
        try:
            import ray
        except ImportError:
            raise InvalidRequestError("disaggregated prefill and decode need Ray: pip install 'nimblelm[ray]'") from None
        if not ray.is_initialized():
            ray.init(include_dashboard=False)
        self._ray = ray
        instance = ray.remote(_Instance).options(num_cpus=cpus_per_instance)
        threads = {"num_threads": max(1, int(cpus_per_instance))}
        self.prefill = instance.remote(model, {**threads, **options, **(prefill_options or {})})
        self.decode = instance.remote(model, {**threads, **options, **(decode_options or {})})

    def generate(self, prompts: Sequence, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None
                 ) -> list[RequestOutput]:
        prompts = list(prompts)
        params = sampling_params or SamplingParams()
        params = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        # The prefill instance's result stays in the object store; the decode instance reads it from there.
        prefixes = self.prefill.prefill.remote(prompts)
        return self._ray.get(self.decode.decode.remote(prompts, params, prefixes))

    def stats(self):
        """(the prefill instance's EngineStats, the decode instance's)."""
        return tuple(self._ray.get([self.prefill.stats.remote(), self.decode.stats.remote()]))

    def close(self) -> None:
        for actor in (self.prefill, self.decode):
            self._ray.kill(actor)
