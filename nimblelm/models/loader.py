"""Loading a model for the engine: config, fp32 weights under Hugging Face names, and the tokenizer.

Sources are a Hugging Face folder (config.json, tokenizer files, *.safetensors), a .gguf file, or an
alias of a packaged model (see registry.py). Dequantizing a GGUF costs seconds, so the first load of
one stores the result under `<cache>/dequant/` and later loads read that instead.

Linear layers that are quantized at the source arrive as they are, as tensors in one of nimblelm's
formats (quantization/formats.py), never as fp32: a folder written by `nimblelm quantize`
(quantization/saved.py), and with `gguf_direct` (quantization="gguf") a GGUF's layers whose types map
exactly onto a format (quantization/gguf_direct.py, converted at every load).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Container
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from nimblelm.config import ModelConfig
from nimblelm.errors import InvalidRequestError, ModelFormatError, UnsupportedModelError
from nimblelm.models import gguf_file, registry
from nimblelm.models.gguf_file import first_line
from nimblelm.models.hparams import GEMMA3, LAYER_TYPES, Fields, check_attention, sliding_pattern
from nimblelm.platform import stored_dtype
from nimblelm.quantization.gguf_direct import module_of, split_direct
from nimblelm.quantization.saved import read_quantized

# Bump when what the dequant cache holds changes meaning, so old entries are ignored rather than misread.
_CACHE_FORMAT = 1

_HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama", "MistralForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2",
    "Gemma3ForCausalLM": "gemma3",
}
# Configs saved without an "architectures" list still name their model_type.
_MODEL_TYPES = {
    "llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


@dataclass
class LoadedModel:
    config: ModelConfig
    # fp32, under Hugging Face names: every weight but those of the layers in `quantized`
    weights: dict[str, torch.Tensor]
    tokenizer: PreTrainedTokenizerFast
    source: Path
    name: str
    # Decoder module name -> (format name, tensors in that format) of the layers that arrive quantized.
    # "embed_tokens" is a GGUF's quantized token table, read back by rows; a tied model whose weights lack
    # the table reads it from the quantized "lm_head".
    quantized: dict[str, tuple[str, dict[str, torch.Tensor]]] = field(default_factory=dict)
    # A GGUF loaded with gguf_direct: module name -> GGUF types of the parts of each layer that fell back to fp32.
    fallbacks: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # The 16-bit type the checkpoint stores every matrix in, else float32 (platform.stored_dtype): where
    # dtype="auto" starts on the CPU kernels (platform.auto_cpu_dtype). `weights` are float32 whatever it is.
    stored_dtype: torch.dtype = torch.float32


def load_model(model: str, progress: bool = True, gguf_direct: bool = False) -> LoadedModel:
    """Load an alias, a Hugging Face folder or a .gguf file; every failure is a typed NimbleLMError.

    gguf_direct: keep a GGUF's quantized linear layers in nimblelm formats instead of fp32 (a .gguf only).
    """
    entry = registry.get_entry(model)
    if entry is not None and not entry.supported:
        # Fail before a download the engine could not use anyway.
        raise UnsupportedModelError(
            f"{model}: architecture {entry.architecture!r} is {registry.NOT_SUPPORTED_YET}; "
            f"`pull` can still fetch the file"
        )
    path = registry.resolve(model, progress=progress)
    quantized, fallbacks, stored = {}, {}, torch.float32
    if gguf_direct:
        if path.is_dir():
            raise InvalidRequestError(
                f"{model}: quantization='gguf' serves a .gguf file's own quantized weights; this is a folder, "
                "give a .gguf file (or use int8/int4 quantization)"
            )
        config, weights, tokenizer, quantized, fallbacks = load_gguf_direct(path, progress)
    elif path.is_dir():
        config, weights, tokenizer, quantized, stored = load_hf_folder(path)
    else:
        config, weights, tokenizer = load_gguf(path, progress, identity=entry.sha256 if entry else None)
        stored = gguf_file.stored_dtype(gguf_file.open_gguf(path))
    name = model if entry else (path.name if path.is_dir() else path.stem)
    return LoadedModel(config=config, weights=weights, tokenizer=tokenizer, source=path, name=name,
                       quantized=quantized, fallbacks=fallbacks, stored_dtype=stored)


# ---------------------------------------------------------------- weights shared by both formats


def expected_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every weight the decoder needs, with its shape, under Hugging Face names."""
    d, f, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"model.embed_tokens.weight": (vocab, d), "model.norm.weight": (d,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (vocab, d)
    for i in range(config.num_layers):
        layer = f"model.layers.{i}."
        shapes |= {
            layer + "self_attn.q_proj.weight": (q, d),
            layer + "self_attn.k_proj.weight": (kv, d),
            layer + "self_attn.v_proj.weight": (kv, d),
            layer + "self_attn.o_proj.weight": (d, q),
            layer + "mlp.gate_proj.weight": (f, d),
            layer + "mlp.up_proj.weight": (f, d),
            layer + "mlp.down_proj.weight": (d, f),
            layer + "input_layernorm.weight": (d,),
            layer + "post_attention_layernorm.weight": (d,),
        }
        if config.qk_norm:
            shapes |= {layer + f"self_attn.{n}_norm.weight": (config.head_dim,) for n in "qk"}
        if config.sandwich_norms:
            shapes |= {layer + f"{n}_feedforward_layernorm.weight": (d,) for n in ("pre", "post")}
        if config.attention_bias:
            shapes |= {
                layer + "self_attn.q_proj.bias": (q,),
                layer + "self_attn.k_proj.bias": (kv,),
                layer + "self_attn.v_proj.bias": (kv,),
            }
    return shapes


def select_weights(
    config: ModelConfig, weights: dict[str, torch.Tensor], source: Path, quantized: Container[str] = frozenset()
) -> dict[str, torch.Tensor]:
    """Check that every needed weight is present with the right shape, and that nothing else is there but
    what transformers also ignores (a tied lm_head copy, rope buffers): another extra weight means a
    feature (o_proj bias, qk-norm, ...) the decoder would silently skip. The weights of the layers in
    `quantized` (module names) come as those layers' tensors instead, checked where they are read."""
    shapes = {
        name: shape for name, shape in expected_shapes(config).items()
        if not _arrives_quantized(name, config, weights, quantized)
    }
    extra = [name for name in weights if name not in shapes and not _ignorable(name, config)]
    past = [name for name in extra if (layer := _LAYER.match(name)) and int(layer[1]) >= config.num_layers]
    if past:
        declared = config.num_layers
        raise ModelFormatError(f"{source}: weight {past[0]} lies past the {declared} layers the config declares")
    if extra:
        raise UnsupportedModelError(f"{source}: unexpected weight {extra[0]} (a feature nimblelm does not implement)")
    missing = [name for name in shapes if name not in weights]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise ModelFormatError(f"{source}: missing weight {missing[0]}{more}")
    for name, shape in shapes.items():
        if tuple(weights[name].shape) != shape:
            raise ModelFormatError(f"{source}: weight {name} has shape {tuple(weights[name].shape)}, expected {shape}")
    return {name: weights[name].float().contiguous() for name in shapes}


_LAYER = re.compile(r"model\.layers\.(\d+)\.")


def _ignorable(name: str, config: ModelConfig) -> bool:
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and config.tie_word_embeddings)


def _arrives_quantized(name: str, config: ModelConfig, weights: dict, quantized: Container[str]) -> bool:
    """Whether weight `name` comes as the tensors of a layer in `quantized` instead. A tied token table is
    the lm_head's when it comes with it (a GGUF holds one tensor for both), but a saved folder keeps its
    own in float beside its quantized lm_head."""
    place = module_of(name, config)
    if place is None or (name == "model.embed_tokens.weight" and name in weights):
        return False
    return place[0] in quantized


# ---------------------------------------------------------------- Hugging Face folders


def load_hf_folder(folder: Path) -> tuple[
        ModelConfig, dict[str, torch.Tensor], PreTrainedTokenizerFast, dict[str, tuple[str, dict]], torch.dtype]:
    """A Hugging Face folder, or one written by `nimblelm quantize` (its linear layers then come in
    `quantized`); also the type it stores its matrices in (LoadedModel.stored_dtype)."""
    config = read_hf_config(folder)
    tokenizer = _hf_tokenizer(folder)
    if not config.eos_token_ids and tokenizer.eos_token_id is not None:
        config = dataclasses.replace(config, eos_token_ids=(tokenizer.eos_token_id,))
    weights, quantized = _read_safetensors(folder), {}
    stored = stored_dtype(weights)
    saved = read_quantized(folder, config, weights)
    if saved is not None:
        weights, quantized = saved
    return config, select_weights(config, weights, folder, quantized), tokenizer, quantized, stored


def read_hf_config(folder: Path) -> ModelConfig:
    path = folder / "config.json"
    if not path.is_file():
        raise ModelFormatError(f"{folder}: not a model folder (no config.json)")
    raw = Fields(_read_json(path), str(path))
    generation_path = folder / "generation_config.json"
    generation = Fields(_read_json(generation_path) if generation_path.is_file() else {}, str(generation_path))
    model_type = raw.string("model_type", None)
    hf_arch = (raw.array("architectures", None) or [_MODEL_TYPES.get(model_type, model_type)])[0]
    if hf_arch is None:
        raise raw.error("lacks architectures (and model_type): which model is this?")
    arch = _HF_ARCHITECTURES.get(hf_arch) if isinstance(hf_arch, str) else None
    if arch is None:
        supported = ", ".join(_HF_ARCHITECTURES)
        raise UnsupportedModelError(f"{folder}: architecture {hf_arch!r} is not supported (supported: {supported})")
    _reject_unsupported_features(raw, hf_arch, folder)
    gemma = arch == "gemma3"
    hidden = raw.integer("hidden_size")
    num_heads = raw.integer("num_attention_heads")
    num_kv_heads = raw.integer("num_key_value_heads", num_heads)
    if not (raw.has("head_dim") or gemma) and hidden % num_heads:
        raise raw.error(
            f"hidden_size ({hidden}) is not a multiple of num_attention_heads ({num_heads}) and head_dim is not given"
        )
    # transformers' defaults where the file is silent: Gemma3TextConfig's differ from Llama's.
    head_dim = raw.integer("head_dim", 256 if gemma else hidden // num_heads)
    check_attention(
        raw, ("num_attention_heads", num_heads), ("num_key_value_heads", num_kv_heads), ("head_dim", head_dim)
    )
    num_layers = raw.integer("num_hidden_layers")
    rope_theta, rope_scaling = _rope(raw, folder, "full_attention" if gemma else None, 1e6 if gemma else 10000.0)
    eos_ids = raw.token_ids("eos_token_id") + generation.token_ids("eos_token_id")
    options = {}
    if gemma:
        options = _gemma3_options(raw, folder, num_layers)
    elif hf_arch == "MistralForCausalLM":
        options = {"sliding_window": raw.integer("sliding_window", None)}
    return ModelConfig(
        architecture=arch,
        vocab_size=raw.integer("vocab_size"),
        hidden_size=hidden,
        intermediate_size=raw.integer("intermediate_size"),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        rms_norm_eps=raw.number("rms_norm_eps", 1e-6),
        max_position_embeddings=raw.integer("max_position_embeddings", 131072 if gemma else 2048),
        tie_word_embeddings=raw.boolean("tie_word_embeddings", gemma),
        # Qwen2 always has q/k/v biases; its config does not say so.
        attention_bias=arch == "qwen2",
        bos_token_id=raw.integer("bos_token_id", generation.integer("bos_token_id", None, minimum=0), minimum=0),
        eos_token_ids=tuple(dict.fromkeys(eos_ids)),
        **options,
    )


def _gemma3_options(raw: Fields, folder: Path, num_layers: int) -> dict:
    """What sets a Gemma 3 apart in ModelConfig, with Gemma3TextConfig's defaults."""
    layer_types = raw.array("layer_types", None)
    if layer_types is None:
        layer_types = sliding_pattern(num_layers, raw.integer("sliding_window_pattern", 6))
    elif len(layer_types) != num_layers or not set(layer_types) <= set(LAYER_TYPES):
        raise raw.error(f"layer_types must list {' or '.join(LAYER_TYPES)} for each of the {num_layers} layers")
    sliding = raw.section("rope_parameters").section("sliding_attention")
    if sliding.string("rope_type", "default") != "default":
        raise UnsupportedModelError(f"{folder}: rope scaling of the sliding-window layers is not supported")
    return GEMMA3 | {
        "query_pre_attn_scalar": raw.number("query_pre_attn_scalar", 256.0),
        "sliding_window": raw.integer("sliding_window", 4096),
        "layer_types": tuple(layer_types),
        "sliding_rope_theta": raw.number("rope_local_base_freq", sliding.number("rope_theta", 10000.0)),
    }


def _reject_unsupported_features(raw: Fields, hf_arch: str, folder: Path) -> None:
    if hf_arch == "Gemma3ForCausalLM":
        activation = raw.string("hidden_activation", "gelu_pytorch_tanh")
        if activation != "gelu_pytorch_tanh":
            raise UnsupportedModelError(f"{folder}: activation {activation!r} is not supported for gemma3")
        # The reference ignores attn_logit_softcapping for Gemma 3; a final softcap it would apply.
        if raw.has("final_logit_softcapping"):
            raise UnsupportedModelError(f"{folder}: final_logit_softcapping is not supported")
        if raw.boolean("use_bidirectional_attention", False):
            raise UnsupportedModelError(f"{folder}: bidirectional attention (an embedding model) is not supported")
    elif raw.string("hidden_act", "silu") != "silu":
        raise UnsupportedModelError(f"{folder}: activation {raw.raw['hidden_act']!r} is not supported (only silu)")
    if raw.boolean("mlp_bias", False) or (hf_arch != "Qwen2ForCausalLM" and raw.boolean("attention_bias", False)):
        raise UnsupportedModelError(f"{folder}: llama-style biases (attention_bias/mlp_bias) are not supported")
    if hf_arch == "Qwen2ForCausalLM" and raw.boolean("use_sliding_window", False):
        raise UnsupportedModelError(f"{folder}: qwen2 sliding-window attention is not supported")


# What each rope scaling type reads (rotary._inv_freq).
_ROPE_KEYS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _rope(raw: Fields, folder: Path, layer_type: str | None, default_theta: float) -> tuple[float, dict | None]:
    """rope base and scaling, from either transformers 4 keys (rope_theta, rope_scaling) or 5 (rope_parameters,
    per layer type for Gemma 3, whose rope_scaling applies to its global layers only)."""
    parameters = raw.section("rope_parameters")
    if layer_type is not None:
        parameters = parameters.section(layer_type)
    theta = raw.number("rope_theta", parameters.number("rope_theta", default_theta))
    scaling = raw.section("rope_scaling") if raw.has("rope_scaling") else parameters
    kind = scaling.string("rope_type", scaling.string("type", "default"))
    if kind == "default":
        return theta, None
    if kind not in _ROPE_KEYS:
        supported = ", ".join(_ROPE_KEYS)
        raise UnsupportedModelError(f"{folder}: rope scaling {kind!r} is not supported (supported: {supported})")
    return theta, {"rope_type": kind} | {key: scaling.number(key) for key in _ROPE_KEYS[kind]}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelFormatError(f"{path}: unreadable JSON ({first_line(exc)})") from None


def _read_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = Fields(_read_json(index), str(index)).section("weight_map")
        files = sorted({folder / weight_map.string(name) for name in weight_map.raw})
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ModelFormatError(f"{folder}: no *.safetensors weights")
    weights = {}
    for file in files:
        try:
            weights |= load_file(file)
        except (OSError, SafetensorError) as exc:
            raise ModelFormatError(f"{file}: unreadable safetensors file ({first_line(exc)})") from None
    return weights


def _hf_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:  # transformers reports missing or broken tokenizer files with many exception types
        raise ModelFormatError(f"{folder}: cannot load the tokenizer ({first_line(exc)})") from exc


# ---------------------------------------------------------------- GGUF files and their cache


def load_gguf(
    path: Path, progress: bool, identity: str | None = None
) -> tuple[ModelConfig, dict[str, torch.Tensor], PreTrainedTokenizerFast]:
    """Load a GGUF through the dequant cache. `identity` (a sha256) names the file's content when known."""
    cached = dequant_cache_path(path, identity)
    if cached.is_dir():
        try:
            return _read_cache(cached)
        # A damaged entry is rebuilt from the GGUF, never fatal; tokenizers reports a bad file as a bare Exception.
        except Exception as exc:  # noqa: BLE001
            warnings.warn(f"rebuilding damaged cache {cached} ({first_line(exc)})", stacklevel=2)
            shutil.rmtree(cached, ignore_errors=True)
    model_file = gguf_file.open_gguf(path)
    config = gguf_file.read_config(model_file)
    shapes = expected_shapes(config)
    weights = select_weights(config, gguf_file.read_weights(model_file, config, shapes, progress), path)
    tokenizer = _gguf_tokenizer(path, model_file.metadata.get("tokenizer.chat_template"))
    _write_cache(cached, config, weights, tokenizer)
    return config, weights, tokenizer


def load_gguf_direct(path: Path, progress: bool) -> tuple[
        ModelConfig, dict[str, torch.Tensor], PreTrainedTokenizerFast, dict[str, tuple[str, dict]], dict[str, tuple]]:
    """A GGUF with its linear layers in nimblelm's formats, straight from the file's bytes (no cache: the
    conversion costs about as much as reading a cache would); also the layers that fell back to fp32."""
    model_file = gguf_file.open_gguf(path)
    config = gguf_file.read_config(model_file)
    shapes = expected_shapes(config)

    def fp32(tensor, name):
        return gguf_file.fp32_weight(model_file, tensor, name, config)

    # split_direct names tensors as Llama's, which only the matrices' names allow (Gemma's ffn_norm is not
    # Llama's): vectors (norms, biases) are never served directly, so they are read here.
    matrices = [t for t in model_file.tensors if len(t.shape) > 1]
    vectors = [t for t in model_file.tensors if len(t.shape) == 1]
    weights, quantized, fallbacks = split_direct(
        dataclasses.replace(model_file, tensors=matrices), config, shapes, fp32
    )
    weights |= gguf_file.read_weights(dataclasses.replace(model_file, tensors=vectors), config, shapes, progress=False)
    weights = select_weights(config, weights, path, quantized)
    tokenizer = _gguf_tokenizer(path, model_file.metadata.get("tokenizer.chat_template"))
    return config, weights, tokenizer, quantized, fallbacks


def dequant_cache_path(path: Path, identity: str | None = None) -> Path:
    """Where the dequantized copy of a GGUF lives; a changed file (size, mtime) gets a new entry."""
    if identity is None:
        stat = path.stat()
        identity = f"{path.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}"
    digest = hashlib.sha256(f"{_CACHE_FORMAT}\0{identity}".encode()).hexdigest()[:16]
    return registry.cache_dir() / "dequant" / f"{path.stem}-{digest}"


def _gguf_tokenizer(path: Path, chat_template: str | None) -> PreTrainedTokenizerFast:
    # The generic class converts the GGUF vocabulary exactly as AutoTokenizer does, but skips AutoTokenizer's
    # second full parse of the file to build a transformers config (10x faster for a 150k vocabulary).
    try:
        tokenizer = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:  # transformers' GGUF tokenizer conversion raises many exception types
        raise ModelFormatError(f"{path}: cannot build a tokenizer from the GGUF metadata ({first_line(exc)})") from exc
    if chat_template and not tokenizer.chat_template:
        tokenizer.chat_template = chat_template
    return tokenizer


def _read_cache(cached: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], PreTrainedTokenizerFast]:
    raw = json.loads((cached / "config.json").read_text())
    # JSON has no tuples: the tuple fields come back as lists.
    config = ModelConfig(**{key: tuple(value) if isinstance(value, list) else value for key, value in raw.items()})
    weights = load_file(cached / "model.safetensors")
    return config, weights, _cached_tokenizer(cached)


def _cached_tokenizer(cached: Path) -> PreTrainedTokenizerFast:
    # The generic class, as on the first load: it takes tokenizer.json as written, where AutoTokenizer would
    # pick e.g. Qwen2Tokenizer, which rebuilds the pre-tokenizer from its own defaults instead of the GGUF's.
    return PreTrainedTokenizerFast.from_pretrained(cached / "tokenizer")


def _write_cache(target: Path, config: ModelConfig, weights: dict[str, torch.Tensor], tokenizer) -> None:
    """Write into a temporary folder and rename it, so a killed process never leaves a half entry.

    Failing to cache only costs speed at the next start, so it warns instead of raising.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    except OSError as exc:
        warnings.warn(f"not caching the dequantized model ({first_line(exc)})", stacklevel=3)
        return
    try:
        save_file(weights, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
        # A subfolder, so transformers never mistakes our config.json for one of its own.
        tokenizer.save_pretrained(tmp / "tokenizer")
        os.rename(tmp, target)
    except OSError as exc:
        # Another process may have finished the same entry first.
        if not target.is_dir():
            warnings.warn(f"not caching the dequantized model ({first_line(exc)})", stacklevel=3)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
