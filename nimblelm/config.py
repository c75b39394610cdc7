"""Configuration dataclasses shared by the loader, the engine and the model runner."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ModelConfig:
    """What the model definition needs to know about a checkpoint, independent of its file format."""

    architecture: str  # "llama", "qwen2" or "gemma3"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF-style dict, e.g. {"rope_type": "llama3", ...}
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # q/k/v projections carry biases (qwen2)
    sliding_window: int | None = None
    # Per layer, HF's names: "full_attention" or "sliding_attention" (within sliding_window). None: every
    # layer slides when sliding_window is set (Mistral), else every layer attends to the whole context.
    layer_types: tuple[str, ...] | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)
    # Gemma 3's departures from the Llama layer; the defaults are Llama's.
    hidden_act: str = "silu"  # of the gated MLP: "silu", or "gelu_pytorch_tanh" (Gemma)
    qk_norm: bool = False  # an RMSNorm over each query and key head, before rope
    sandwich_norms: bool = False  # RMSNorms on the attention and MLP outputs too, before the residual adds
    norm_weight_offset: float = 0.0  # RMSNorms multiply by offset + weight (Gemma checkpoints store weight - 1)
    scale_embeddings: bool = False  # token embeddings times sqrt(hidden_size), rounded to the model's dtype
    query_pre_attn_scalar: float | None = None  # attention scores scale by its -1/2 power; None: head_dim's
    sliding_rope_theta: float | None = None  # rope base of the sliding layers, unscaled; None: as the others

    @property
    def layer_windows(self) -> list[int | None]:
        """Each layer's attention window in tokens, None where it sees the whole context."""
        if self.layer_types is None:
            return [self.sliding_window] * self.num_layers
        return [self.sliding_window if t == "sliding_attention" else None for t in self.layer_types]


@dataclass
class EngineConfig:
    """Options of one engine; every field is also an `LLM(...)` keyword and a CLI flag."""

    model: str
    dtype: str = "auto"  # auto: on CPU the checkpoint's 16-bit type as stored, else float32; bfloat16 on CUDA
    device: str = "auto"  # auto: cuda when available, else cpu
    max_model_len: int | None = None  # default: the model's context length
    max_num_seqs: int = 64
    max_num_batched_tokens: int | None = None  # per-step token budget; default max(2048, max_num_seqs)
    enable_chunked_prefill: bool = True
    # Full KV blocks stay cached after their sequence ends; a prompt with the same start reuses them.
    enable_prefix_caching: bool = True
    # Decode steps on the CPU kernels are replayed from traces of the model (engine/step_capture.py);
    # True runs every step layer by layer from Python.
    enforce_eager: bool = False
    block_size: int = 16
    kv_cache_memory_bytes: int | None = None  # default 2 GiB on CPU, half the free memory on CUDA
    num_kv_blocks: int | None = None  # overrides the memory budget (tests use it to force preemption)
    # auto: the model's dtype; int8: int8 K/V with a float32 scale per token and KV head, except in the
    # layers int8 would distort (quantization/kv_int8.py); int4, int2: KIVI's (layers/kivi.py)
    kv_cache_dtype: str = "auto"
    # int4, int2: the recent entries each query reads at full precision (KIVI's residual length; in the model's
    # dtype, as an auto cache holds K/V), whole blocks of the query's own and those before it; default 128 tokens
    # (KIVI's), or max_model_len where that is shorter
    kv_residual_length: int | None = None
    seed: int = 0
    num_threads: int | None = None  # CPU threads; default: the physical cores
    # "int8", "int4", "w8a8": linear weights quantized at load (RTN, see quantization); "gguf": a .gguf
    # file's quantized linear tensors served as stored
    quantization: str | None = None
    # Speculative decoding, as vLLM's: {"method": "ngram", "num_speculative_tokens": k, ...}
    # (speculative/config.py); None decodes a token per step.
    speculative_config: dict | None = None
    # A KV cache policy: {"method": "streaming" | "snapkv", "budget": entries or "ratio": kept fraction, ...}
    # (engine/kv_cache/policy.py); None keeps every entry.
    kv_policy: dict | None = None
    # Tensor parallelism: the model split over this many ranks (processes with the mp or ray executor), their
    # collectives through torch.distributed (distributed/).
    tensor_parallel_size: int = 1
    # Pipeline parallelism: the layers cut into this many consecutive stages, each on tensor_parallel_size ranks.
    pipeline_parallel_size: int = 1
    # Where the ranks run: "uni" (this process; one rank), "mp" (local processes) or "ray" (Ray actors, on one
    # machine or a cluster). Default: uni for one rank, else mp.
    distributed_executor_backend: str | None = None
