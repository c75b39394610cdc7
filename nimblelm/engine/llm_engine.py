"""The engine loop: add requests, step (schedule, run, postprocess), abort. Nothing else steps it."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, replace

import torch

from nimblelm.config import EngineConfig
from nimblelm.distributed.executor import UniExecutor, make_executor
from nimblelm.distributed.pipeline import PipelineStage
from nimblelm.distributed.tensor_parallel import TensorParallel
from nimblelm.distributed.worker import RunnerSpec, Worker
from nimblelm.engine.detokenizer import IncrementalDetokenizer
from nimblelm.engine.kv_cache.manager import KVCacheManager, kv_groups
from nimblelm.engine.kv_cache.policy import KVPolicy
from nimblelm.engine.kv_cache.transfer import PrefixKV
from nimblelm.engine.model_runner import ModelRunner
from nimblelm.engine.scheduler import Scheduler, SchedulerConfig
from nimblelm.engine.sequence import Request, Sequence
from nimblelm.engine.step import ModelRunnerOutput, SchedulerOutput
from nimblelm.engine.structured import StructuredOutputBackend, grammar_bitmask
from nimblelm.errors import InvalidRequestError
from nimblelm.kernels import bf16_products_in_words, cpu_ops, widens_in_registers
from nimblelm.layers.kivi import BITS, RESIDUAL_LENGTH
from nimblelm.models.loader import load_model
from nimblelm.outputs import CompletionOutput, Logprob, RequestMetrics, RequestOutput, SpecDecodeStats
from nimblelm.platform import (
    auto_cpu_dtype,
    physical_cores,
    resolve_device,
    resolve_dtype,
    resolve_kv_cache_dtype,
    set_threads,
)
from nimblelm.quantization import GGUF_DIRECT, formats, linear_method, refuse_requantizing
from nimblelm.sampling_params import SamplingParams
from nimblelm.speculative import SpeculativeConfig
from nimblelm.speculative.layer_skip import saved_skip_layers

Prompt = str | list[int] | dict


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load, for metrics and the server's limits."""

    num_running: int  # requests with a sequence in the running batch
    num_waiting: int  # requests whose sequences all wait (new, or preempted)
    num_used_blocks: int
    num_blocks: int
    num_preemptions: int  # since the engine started
    prefix_cache_queries: int  # prompt tokens looked up in the prefix cache, since the engine started
    prefix_cache_hits: int  # of those, tokens whose K/V were found cached
    spec: SpecDecodeStats | None = None  # with speculative decoding, since the engine started

    @property
    def kv_usage(self) -> float:
        return self.num_used_blocks / self.num_blocks if self.num_blocks else 0.0


HALF_WEIGHTS = {torch.bfloat16: "bf16", torch.float16: "fp16"}  # dtype -> its weight format on the CPU kernels


class LLMEngine:
    def __init__(self, config: EngineConfig, progress: bool = True):
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)  # a bad name fails before the model loads
        world = config.tensor_parallel_size * config.pipeline_parallel_size
        parallel = world > 1 or config.distributed_executor_backend not in (None, "uni")
        for name in ("tensor_parallel_size", "pipeline_parallel_size"):
            if getattr(config, name) < 1:
                raise InvalidRequestError(f"{name} must be >= 1, got {getattr(config, name)}")
        if world > 1 and config.distributed_executor_backend == "uni":
            raise InvalidRequestError("distributed_executor_backend='uni' runs one rank: tensor_parallel_size or "
                                      "pipeline_parallel_size > 1 needs 'mp' or 'ray'")
        # With ranks in processes of their own, num_threads is each rank's (default: the cores shared out).
        threads = config.num_threads
        if parallel and threads is None and self.device.type == "cpu":
            threads = max(1, physical_cores() // world)
        self.num_threads = set_threads(threads) if self.device.type == "cpu" else None
        speculative = SpeculativeConfig.from_dict(config.speculative_config) if config.speculative_config else None
        if speculative is not None and speculative.method == "layer_skip" and speculative.skip_layers is None:
            speculative = replace(speculative, skip_layers=saved_skip_layers(config.model))
        kv_policy = KVPolicy.from_dict(config.kv_policy) if config.kv_policy is not None else None
        method = linear_method(config.quantization)
        resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype)
        loaded = load_model(config.model, progress=progress, gguf_direct=config.quantization == GGUF_DIRECT)
        refuse_requantizing(config.quantization, loaded.quantized)
        kernels = self.device.type == "cpu" and cpu_ops() is not None
        if config.dtype == "auto" and kernels:
            self.dtype = auto_cpu_dtype(loaded.stored_dtype, widens_in_registers())
        weights = (config.quantization if config.quantization not in (None, "none") else _name(self.dtype)) + " weights"
        if config.dtype == "auto" and self.dtype != loaded.stored_dtype and config.quantization in (None, "none"):
            weights += f" (auto: the checkpoint's {_name(loaded.stored_dtype)} rounded)"
        if loaded.fallbacks:
            # Said once, at start: these layers read several times the bytes of the file's own types.
            kinds = ", ".join(sorted({" + ".join(parts) for parts in loaded.fallbacks.values()}))
            fallback = (f"{len(loaded.fallbacks)} linear layers dequantized to float, their fused GGUF parts "
                        f"({kinds}) sharing no integer format")
            warnings.warn(f"nimblelm: {fallback}", stacklevel=3)
            weights += f" ({fallback})"
        kv_auto = self.dtype  # vLLM's auto: K/V in the model's dtype
        if self.dtype in HALF_WEIGHTS and kernels:
            # The CPU kernels compute in float32: a 16-bit dtype here means 16-bit storage for the linear
            # weights that stay in float (widened in registers: half of float32's bytes per decode step) and
            # for the KV cache (auto), with float32 activations; quantized layers keep their own format.
            if config.quantization in (None, "none", GGUF_DIRECT):
                method = formats.linear_method(HALF_WEIGHTS[self.dtype])
            self.dtype = torch.float32
        self.kv_dtype = resolve_kv_cache_dtype(config.kv_cache_dtype, kv_auto)
        # What the engine chose, in words, for the server's start line (dtype="auto" decides it here).
        compute = f"{_name(self.dtype)} compute"
        if getattr(method, "name", None) == "bf16" and bf16_products_in_words():
            compute += f" (bfloat16 linears {bf16_products_in_words()})"
        kv = _name(self.kv_dtype)
        if self.kv_dtype in BITS:
            kv += f" (residual in {_name(kv_auto)})"
        self.precision = f"{weights}, {compute}, {kv} KV cache"
        if kv_policy is not None and all(w is not None for w in loaded.config.layer_windows):
            raise InvalidRequestError("kv_policy: every layer of this model attends within a sliding window already")
        if kv_policy is not None and kv_policy.cache_positions:
            if any(w is not None for w in loaded.config.layer_windows):
                raise InvalidRequestError("kv_policy: cache_positions needs a model without sliding-window layers")
            if config.kv_cache_dtype == "int8":
                raise InvalidRequestError("kv_policy: cache_positions rotates kept keys, which an int8 cache cannot")
        self.model_config = loaded.config
        self.tokenizer = loaded.tokenizer
        self.config = config = _complete(config, loaded.config.max_position_embeddings)
        if config.kv_residual_length is not None and speculative is not None and speculative.proposes_trees:
            # A tree's rows stand for entries up to num_speculative_tokens past the step's first: with this residual
            # every row reads all of the step's entries at full precision, so none reads another branch's sealed.
            need = config.block_size + speculative.num_speculative_tokens
            if config.kv_residual_length < need:
                raise InvalidRequestError(f"token trees over an {config.kv_cache_dtype} KV cache need kv_residual_length "
                                          f">= block_size + num_speculative_tokens ({need}), got "
                                          f"{config.kv_residual_length}")
        if kv_policy is not None and kv_policy.needs_votes and config.max_num_batched_tokens < kv_policy.window_size:
            raise InvalidRequestError(f"kv_policy: {kv_policy.method}'s window of {kv_policy.window_size} tokens must "
                                      f"fit a step's max_num_batched_tokens ({config.max_num_batched_tokens})")
        self.kv_groups = kv_groups(loaded.config.layer_windows, kv_policy is not None and kv_policy.method == "pyramidkv")
        options = {"dtype": self.dtype, "device": self.device, "max_model_len": config.max_model_len,
                   "block_size": config.block_size, "seed": config.seed, "linear_method": method,
                   "kv_cache_dtype": self.kv_dtype, "enforce_eager": config.enforce_eager, "speculative": speculative,
                   "kv_policy": kv_policy, "kv_residual_length": config.kv_residual_length,
                   "kv_residual_dtype": kv_auto}
        self.runner: ModelRunner | None = None  # the model, where it runs in this process (the uni executor)
        if parallel:
            _refuse_parallel(config, speculative)
            TensorParallel.check(loaded.config, config.tensor_parallel_size)
            TensorParallel.check_quantized(loaded.config, config.tensor_parallel_size, loaded.quantized)
            PipelineStage.check(loaded.config.num_layers, config.pipeline_parallel_size)
            del loaded
            spec = RunnerSpec(config.model, config.quantization == GGUF_DIRECT, self.num_threads, options,
                              config.tensor_parallel_size, config.pipeline_parallel_size,
                              cpu_ops().bf16_products() if kernels else None)
            self.executor = make_executor(config.distributed_executor_backend, spec)
        else:
            self.runner = ModelRunner(loaded.config, loaded.weights, quantized=loaded.quantized, **options)
            del loaded
            self.executor = UniExecutor(Worker(self.runner))
        num_blocks = self._num_blocks(config)
        self.executor.collective_rpc("allocate_kv", num_blocks, config.max_num_seqs)
        # The salt names what shapes the K/V (the weights' dtype too: the CPU kernels compute in float32 for
        # either), so that import_prefix refuses another engine's blocks where they would differ.
        salt = (f"{config.model}|{kv_auto}|{self.dtype}|{self.kv_dtype}|{config.quantization}|{config.block_size}|"
                f"{config.tensor_parallel_size}x{config.pipeline_parallel_size}").encode()
        self.kv_cache_manager = KVCacheManager(
            num_blocks, config.block_size, [g.window for g in self.kv_groups], self._prefix_caching(kv_policy), salt,
        )
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.enable_chunked_prefill),
            self.kv_cache_manager,
            kv_policy,
            [g.layers[0] / max(1, self.model_config.num_layers - 1) for g in self.kv_groups],
        )
        self.requests: dict[str, Request] = {}
        self._detokenizers: dict[int, IncrementalDetokenizer] = {}
        self._kept_drafts: dict[int, list[int]] = {}  # of the last step run, for the next (SchedulerOutput)
        self._structured: StructuredOutputBackend | None = None  # built by the first structured request
        self.spec_stats = SpecDecodeStats() if speculative is not None else None  # since the engine started

    def _prefix_caching(self, kv_policy: KVPolicy | None) -> bool:
        if kv_policy is None or kv_policy.method != "h2o" or not self.config.enable_prefix_caching:
            return self.config.enable_prefix_caching
        # Its blocks hold the attention their entries received from their own sequence's queries: shared, two
        # sequences would add into the same sums, and a new one would start from another's.
        warnings.warn("nimblelm: kv_policy h2o turns prefix caching off", stacklevel=3)
        return False

    def _num_blocks(self, config: EngineConfig) -> int:
        bs = config.block_size
        if config.num_kv_blocks is not None:
            num_blocks = config.num_kv_blocks
        else:
            budget = config.kv_cache_memory_bytes
            if budget is None:
                budget = 2 << 30
                if self.device.type == "cuda":
                    budget = torch.cuda.mem_get_info(self.device)[0] // 2
            # The budget is each rank's: the rank with the most KV heads sets the count.
            beside = max(self.executor.collective_rpc("kv_bytes_beside_blocks", config.max_num_seqs))
            if beside >= budget:
                raise InvalidRequestError(
                    f"the low-bit KV cache's residual rings ({beside} bytes: kv_residual_length="
                    f"{config.kv_residual_length} tokens for each of max_num_seqs={config.max_num_seqs} sequences) take "
                    f"all of kv_cache_memory_bytes={budget}: give it more, or lower max_num_seqs or kv_residual_length"
                )
            budget -= beside
            per_block = max(self.executor.collective_rpc("kv_bytes_per_block"))
            # More than every sequence at full length could ever use is wasted memory.
            ceiling = config.max_num_seqs * -(-config.max_model_len // bs) * len(self.kv_groups)
            num_blocks = min(budget // per_block, ceiling)
        # One sequence of max_model_len tokens: every group's table, a sliding one holding its window's blocks.
        full = -(-config.max_model_len // bs)
        need = sum(full if g.window is None else min(full, -(-g.window // bs) + 1) for g in self.kv_groups)
        if num_blocks < need:
            raise InvalidRequestError(
                f"the KV cache holds {num_blocks} blocks, fewer than the {need} that one sequence of max_model_len="
                f"{config.max_model_len} tokens needs: give it more memory (kv_cache_memory_bytes) or lower "
                "max_model_len"
            )
        return num_blocks

    # -- requests -----------------------------------------------------------------------------

    def add_request(
        self, request_id: str, prompt: Prompt, params: SamplingParams, arrival_time: float | None = None
    ) -> None:
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        text, token_ids = self.check_request(prompt, params)
        grammar = self.structured_output.compile(params.structured_output) if params.structured_output else None
        metrics = RequestMetrics(arrival_time=arrival_time if arrival_time is not None else time.perf_counter())
        request = Request(request_id, text, token_ids, params, metrics)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]
        for index in range(params.n):
            seq = Sequence(request_id, token_ids, params, index)
            if grammar is not None:
                seq.matcher = self.structured_output.matcher(grammar)
            request.seqs.append(seq)
            self._detokenizers[seq.seq_id] = IncrementalDetokenizer(
                self.tokenizer, len(token_ids), params.skip_special_tokens
            )
            self.scheduler.add(seq)
        self.requests[request_id] = request

    @property
    def structured_output(self) -> StructuredOutputBackend:
        if self._structured is None:
            self._structured = StructuredOutputBackend(
                self.tokenizer, self.model_config.vocab_size, self.model_config.eos_token_ids
            )
        return self._structured

    def _tokenize(self, prompt: Prompt) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._tokenize(list(prompt["prompt_token_ids"]))[1]
            if "prompt" not in prompt:
                raise InvalidRequestError("a prompt dict needs 'prompt' or 'prompt_token_ids'")
            prompt = prompt["prompt"]
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("the prompt is empty")
            return prompt, self.tokenizer.encode(prompt)
        if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) for t in prompt):
            return None, list(prompt)
        raise InvalidRequestError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def check_request(self, prompt: Prompt, params: SamplingParams) -> tuple[str | None, list[int]]:
        """The prompt's (text, token ids), or InvalidRequestError where add_request would refuse it."""
        text, token_ids = self._tokenize(prompt)
        self._check_prompt(token_ids, params)
        return text, token_ids

    def _check_prompt(self, token_ids: list[int], params: SamplingParams) -> None:
        if not token_ids:
            raise InvalidRequestError("the prompt is empty")
        limit = self.config.max_model_len
        if len(token_ids) > limit or (len(token_ids) == limit and params.max_tokens != 0):
            raise InvalidRequestError(
                f"the prompt has {len(token_ids)} tokens; max_model_len={limit} leaves no room to generate"
            )
        vocab = self.model_config.vocab_size
        if min(token_ids) < 0 or max(token_ids) >= vocab:
            raise InvalidRequestError(f"prompt token ids must be in [0, {vocab})")

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                self.scheduler.finish(seq, "abort")
            self._release(seq)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def num_unfinished_requests(self) -> int:
        return len(self.requests)

    def export_prefix(self, prompt: Prompt) -> PrefixKV:
        """The K/V of the prompt's full blocks that this engine holds in its prefix cache (after computing the
        prompt), for another engine of the same model and layout to import_prefix."""
        token_ids = self._tokenize(prompt)[1]
        hashes, groups = self.kv_cache_manager.prefix_blocks(token_ids)
        kv = self.executor.collective_rpc("read_blocks", [ids for _, ids in groups])
        return PrefixKV(self.kv_cache_manager.salt, hashes, [first for first, _ in groups], kv)

    def import_prefix(self, prefix: PrefixKV) -> int:
        """File another engine's prompt blocks in this one's prefix cache, so that the prompt's request finds them;
        returns the blocks written (0 where they are cached already or the cache has no free blocks for them)."""
        if prefix.salt != self.kv_cache_manager.salt:
            raise InvalidRequestError("import_prefix: the blocks come from an engine whose model, dtypes, block size "
                                      "or parallel layout differ from this one's")
        placed = self.kv_cache_manager.adopt_prefix(prefix.hashes, prefix.firsts)
        if not placed or not any(placed):
            return 0
        self.executor.collective_rpc("write_blocks", placed, prefix.kv)
        return sum(map(len, placed))

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix (as vLLM's): False, changing nothing, while requests run."""
        return self.kv_cache_manager.reset_prefix_cache()

    def stats(self) -> EngineStats:
        running = {s.request_id for s in self.scheduler.running}
        waiting = {s.request_id for s in self.scheduler.waiting} - running
        kv = self.kv_cache_manager
        return EngineStats(
            num_running=len(running),
            num_waiting=len(waiting),
            num_used_blocks=kv.num_blocks - kv.num_free_blocks,
            num_blocks=kv.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache_queries=kv.num_queried_tokens,
            prefix_cache_hits=kv.num_hit_tokens,
            spec=replace(self.spec_stats, accepted_per_position=list(self.spec_stats.accepted_per_position))
            if self.spec_stats is not None else None,
        )

    # -- the loop -----------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One engine step; returns an output for every request that got new tokens or finished."""
        sched = self.scheduler.schedule()
        if sched.is_empty and not sched.finished_req_ids:
            return []
        now = time.perf_counter()
        for seq_id in sched.num_scheduled_tokens:
            metrics = self.requests[self.scheduler.seqs[seq_id].request_id].metrics
            if metrics.first_scheduled_time is None:
                metrics.first_scheduled_time = now
        self._add_grammar_bitmask(sched)
        sched.kept_drafts, self._kept_drafts = self._kept_drafts, {}
        out = self.executor.execute(sched)
        self._kept_drafts = out.kept_drafts
        rejected = {
            seq_id: len(sched.spec_token_ids[seq_id]) - (len(tokens) - 1)
            for seq_id, tokens in zip(out.req_ids, out.sampled_token_ids) if seq_id in sched.spec_token_ids
        }
        self.scheduler.update(sched, rejected)
        return self._postprocess(sched, out)

    def _add_grammar_bitmask(self, sched: SchedulerOutput) -> None:
        """The allowed next tokens of the structured sequences that will sample this step, at each draft."""
        seqs = [self.scheduler.seqs[i] for i in sched.num_scheduled_tokens]
        drafts = {s.seq_id: sched.spec_token_ids.get(s.seq_id, []) for s in seqs}
        structured = [
            s for s in seqs if s.matcher is not None
            and s.num_computed_tokens + sched.num_scheduled_tokens[s.seq_id] - len(drafts[s.seq_id]) == s.num_tokens
        ]
        if structured:
            sched.grammar_req_ids = [s.seq_id for s in structured]
            sched.grammar_bitmask = grammar_bitmask([s.matcher for s in structured],
                                                    [drafts[s.seq_id] for s in structured],
                                                    self.model_config.vocab_size)

    def _postprocess(self, sched: SchedulerOutput, out: ModelRunnerOutput) -> list[RequestOutput]:
        now = time.perf_counter()
        for seq_id, entries in out.prompt_logprobs.items():
            seq = self.scheduler.seqs[seq_id]
            request = self.requests[seq.request_id]
            start = seq.num_computed_tokens - sched.num_scheduled_tokens[seq_id]  # the step's first position
            # Every sequence of the request computes the prompt, a preempted one again (in chunks that need not
            # end where the first run's did): only entries past the request's list are new. Tokens before a
            # prefix-cache hit (prompt_logprobs_start) were scored by no one: None.
            if start + 1 > len(request.prompt_logprobs):
                request.prompt_logprobs += [None] * (start + 1 - len(request.prompt_logprobs))
            known = len(request.prompt_logprobs) - (start + 1)
            request.prompt_logprobs += [
                self._logprob_entry(t, e, request.params.prompt_logprobs)
                for t, e in zip(seq.token_ids[start + 1 + known :], entries[known:])
            ]
        touched: dict[str, Request] = {}
        for row, (seq_id, tokens) in enumerate(zip(out.req_ids, out.sampled_token_ids)):
            seq = self.scheduler.seqs[seq_id]
            request = self.requests[seq.request_id]
            touched[request.request_id] = request
            if seq.params.max_tokens == 0:  # the prompt was all it asked for
                self.scheduler.finish(seq, "length")
                continue
            if seq_id in sched.spec_token_ids:
                self._count_drafts(request, len(sched.spec_token_ids[seq_id]), len(tokens) - 1)
            for i, token in enumerate(tokens):
                seq.token_ids.append(token)
                if seq.logprobs is not None:
                    seq.logprobs.append(self._logprob_entry(token, out.logprobs[row][i], seq.params.logprobs))
                if seq.matcher is not None:
                    seq.matcher.accept(token)
                delta = self._detokenizers[seq.seq_id].step(seq.token_ids)
                seq.text += delta
                self._check_stop(seq, token, len(delta))
                if seq.is_finished:  # tokens kept after a stop are dropped
                    if seq.stop_reason is None:
                        seq.text += self._detokenizers[seq.seq_id].step(seq.token_ids, final=True)
                    break
            seq.spec_token_ids = [] if seq.is_finished else out.draft_token_ids.get(seq_id, [])
            seq.spec_parents = None if seq.is_finished else out.draft_parents.get(seq_id)
            if request.metrics.first_token_time is None:
                request.metrics.first_token_time = now
        outputs = []
        for request in touched.values():
            if request.is_finished:
                request.metrics.finished_time = now
                del self.requests[request.request_id]
                for seq in request.seqs:
                    self._release(seq)
            outputs.append(self._output(request))
        return outputs

    def _count_drafts(self, request: Request, num_drafts: int, num_accepted: int) -> None:
        if request.metrics.spec is None:
            request.metrics.spec = SpecDecodeStats()
        request.metrics.spec.add(num_drafts, num_accepted)
        self.spec_stats.add(num_drafts, num_accepted)

    def _check_stop(self, seq: Sequence, token: int, delta_len: int) -> None:
        params = seq.params
        if not params.ignore_eos and token in self.model_config.eos_token_ids:
            return self.scheduler.finish(seq, "stop")
        if token in params.stop_token_ids:
            return self.scheduler.finish(seq, "stop", token)
        if params.stop_strings:
            stop, cut = _find_stop(seq.text, params.stop_strings, delta_len)
            if stop is not None:
                seq.text = seq.text[:cut]
                return self.scheduler.finish(seq, "stop", stop)
        if seq.matcher is not None and seq.matcher.is_finished:
            return self.scheduler.finish(seq, "stop")  # the JSON value is complete: nothing may follow
        if seq.num_output_tokens == params.max_tokens or self._context_len(seq) >= self.config.max_model_len:
            return self.scheduler.finish(seq, "length")
        return None

    @property
    def unbounded_generation(self) -> bool:
        """Whether a sequence may outgrow max_model_len: its positions are places in a bounded cache."""
        policy = self.scheduler.kv_policy
        return policy is not None and policy.cache_positions

    def _context_len(self, seq: Sequence) -> int:
        """The positions seq's next token needs: its tokens, or with cache positions its cache entries."""
        if self.unbounded_generation:
            return self.kv_cache_manager.num_entries(seq, 0, seq.num_tokens)
        return seq.num_tokens

    def _logprob_entry(self, token: int, row, wanted: int) -> dict[int, Logprob]:
        chosen, rank, top_ids, top_lps = row
        decode = self.tokenizer.decode
        entry = {token: Logprob(chosen, rank, decode([token]))}
        for r, (tid, lp) in enumerate(zip(top_ids[:wanted], top_lps[:wanted]), start=1):
            entry.setdefault(tid, Logprob(lp, r, decode([tid])))
        return entry

    def _release(self, seq: Sequence) -> None:
        self._detokenizers.pop(seq.seq_id, None)

    @staticmethod
    def _output(request: Request) -> RequestOutput:
        completions = [
            CompletionOutput(
                index=s.index,
                text=s.text,
                token_ids=s.output_token_ids,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
                logprobs=s.logprobs,
            )
            for s in request.seqs
        ]
        return RequestOutput(
            request.request_id, request.prompt, request.prompt_token_ids, completions, request.is_finished,
            metrics=request.metrics, prompt_logprobs=request.prompt_logprobs,
        )


def _find_stop(text: str, stops: tuple[str, ...], delta_len: int) -> tuple[str | None, int]:
    """The stop string that the last `delta_len` characters completed first, and where it starts."""
    found = [(text.find(s, max(0, len(text) - delta_len - len(s) + 1)), s) for s in stops]
    found = [(i, s) for i, s in found if i >= 0]
    if not found:
        return None, -1
    cut, stop = min(found)
    return stop, cut


def _refuse_parallel(config: EngineConfig, speculative: SpeculativeConfig | None) -> None:
    """What a model split over ranks cannot do yet: one clear error at start."""
    if speculative is not None and speculative.method == "layer_skip" and config.pipeline_parallel_size > 1:
        raise InvalidRequestError("a model split over ranks cannot be combined with speculative method 'layer_skip' "
                                  "over pipeline stages (it drafts with layers that no one stage holds) yet")


def _complete(config: EngineConfig, model_max_len: int) -> EngineConfig:
    """Fill defaults that depend on the model, and reject impossible combinations."""
    max_len = config.max_model_len or model_max_len
    if max_len < 2:
        raise InvalidRequestError(f"max_model_len must be at least 2, got {max_len}")
    if max_len > model_max_len:
        raise InvalidRequestError(f"max_model_len={max_len} exceeds the model's context length {model_max_len}")
    if config.max_num_seqs < 1:
        raise InvalidRequestError(f"max_num_seqs must be >= 1, got {config.max_num_seqs}")
    if config.block_size < 1:
        raise InvalidRequestError(f"block_size must be >= 1, got {config.block_size}")
    budget = config.max_num_batched_tokens or max(2048, config.max_num_seqs)
    if budget < config.max_num_seqs:
        raise InvalidRequestError("max_num_batched_tokens must be at least max_num_seqs")
    if not config.enable_chunked_prefill and budget < max_len:
        raise InvalidRequestError("without chunked prefill, max_num_batched_tokens must be at least max_model_len")
    residual = config.kv_residual_length
    if config.kv_cache_dtype not in ("int4", "int2"):
        if residual is not None:
            raise InvalidRequestError("kv_residual_length applies to int4 and int2 KV caches only")
    elif residual is None:  # KIVI's, in whole blocks; no longer than a sequence can be
        bs = config.block_size
        residual = max(bs, min(RESIDUAL_LENGTH // bs * bs, -(-max_len // bs) * bs))
    elif residual < 1 or residual % config.block_size:
        raise InvalidRequestError(f"kv_residual_length must be whole blocks of {config.block_size} tokens, got {residual}")
    return replace(config, max_model_len=max_len, max_num_batched_tokens=budget, kv_residual_length=residual)


def _name(dtype: torch.dtype) -> str:
    return {torch.quint4x2: "int4", torch.quint2x4: "int2"}.get(dtype) or str(dtype).removeprefix("torch.")
