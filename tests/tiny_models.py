"""Tiny random-weight models for fast unit tests: a Hugging Face folder, and the same model as a GGUF
file written the way llama.cpp's converter would write it (so the loader's GGUF path can be checked
against the folder's weights exactly)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = range(3)

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.
A small language model reads a prompt, predicts the next token, and repeats until it is done.
Inference engines batch many requests together so that the weights are read once per step.
The scheduler decides which sequences run, and the model runner decides how they run on the device.
Paged attention stores keys and values in fixed blocks, so memory is not wasted on padding.
Speculative decoding lets a small draft model propose tokens that a larger model then verifies.
Quantization stores weights in fewer bits, trading a little quality for a lot of speed and memory.
Hello world! How are you today? I am fine, thank you. What is the capital of France? It is Paris.
def add(a, b):
    return a + b
for i in range(10):
    print(i * i)
Numbers like 12, 345 and 6789 appear in text; so do dates such as 2024-05-17 and times like 10:30.
Every morning the baker opens the shop, and the smell of fresh bread fills the quiet street.
Rivers flow to the sea, mountains rise toward the sky, and forests cover the rolling hills.
"""

# Shapes kept tiny so a whole model is written and loaded in well under a second.
TINY_CONFIG = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 384,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-6,
    "bos_token_id": ENDOFTEXT_ID,
    "eos_token_id": IM_END_ID,
    "pad_token_id": ENDOFTEXT_ID,
}
# Gemma 3: six layers so that the default pattern (every 6th layer global) gives both kinds; a window of
# 8 tokens that test prompts outgrow; one KV head (as gemma3-270m); a head size other than hidden / heads;
# a sliding-layer rope base far from the global one, so that mixing them up shows. query_pre_attn_scalar
# is the head size, as a GGUF (which does not carry it) implies.
TINY_GEMMA3 = {
    "tie_word_embeddings": True,
    "num_hidden_layers": 6,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "query_pre_attn_scalar": 32,
    "sliding_window": 8,
    "rope_theta": 1000000.0,
    "rope_local_base_freq": 100.0,
}
_ARCHS = {
    "llama": (LlamaConfig, LlamaForCausalLM, {"tie_word_embeddings": True, "rope_theta": 100000.0}),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {"tie_word_embeddings": False, "rope_theta": 1000000.0}),
    "gemma3": (Gemma3TextConfig, Gemma3ForCausalLM, TINY_GEMMA3),
}


def make_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on TRAINING_TEXT, with exactly `vocab_size` tokens and ChatML specials."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    if backend.get_vocab_size() != vocab_size:
        raise ValueError(f"training text too small for a vocabulary of {vocab_size} tokens")
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML_TEMPLATE,
    )


def make_tiny_hf_model(path, arch: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a tiny random model as a Hugging Face folder; `overrides` go into the transformers config."""
    config_class, model_class, arch_defaults = _ARCHS[arch]
    config = config_class(**(TINY_CONFIG | arch_defaults | overrides))
    torch.manual_seed(seed)
    model = model_class(config)
    with torch.no_grad():
        # Random norm weights (instead of ones) so a swapped norm mapping shows up in weight comparisons.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") and arch == "gemma3":
                # Gemma's norms multiply by 1 + weight. On a grid of 2^-8 (as bf16 checkpoints' are), the +1 of
                # llama.cpp's converter and the loader's -1 are exact, so GGUF and folder weights compare equal.
                param.copy_(torch.round(25.6 * torch.randn_like(param)) / 256)
            elif name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * torch.randn_like(param))
            elif name.endswith(".bias"):
                param.copy_(0.1 * torch.randn_like(param))
    model.generation_config.eos_token_id = [IM_END_ID, ENDOFTEXT_ID]
    path = Path(path)
    model.save_pretrained(path)
    make_tokenizer(config.vocab_size).save_pretrained(path)
    return path


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """The row order llama.cpp's converter gives q/k of arch llama (pairs of rows interleaved per head)."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
# llama.cpp's names for Gemma 3 (gguf-py's tensor_mapping): its ffn_norm is the norm before the MLP.
_GEMMA3_GGUF_NAMES = _GGUF_NAMES | {
    "post_attention_layernorm": "post_attention_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}


def gguf_tensor_name(hf_name: str, arch: str = "llama") -> str:
    module, _, suffix = hf_name.rpartition(".")
    if module.startswith("model.layers."):
        layer, _, rest = module.removeprefix("model.layers.").partition(".")
        names = _GEMMA3_GGUF_NAMES if arch == "gemma3" else _GGUF_NAMES
        return f"blk.{layer}.{names[rest]}.{suffix}"
    return {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}[module] + "." + suffix


def gguf_tensors(folder, quant="F32") -> dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]]:
    """The folder's weights as llama.cpp would store them: GGUF names, q/k permuted for llama, matrices
    in `quant` (vectors stay F32), or in quant(gguf_name) when it is a function. Values are (array to
    write, its type)."""
    config = json.loads((Path(folder) / "config.json").read_text())
    arch = _gguf_arch(config)
    tensors = {}
    for name, weight in load_file(Path(folder) / "model.safetensors").items():
        if name == "lm_head.weight" and config["tie_word_embeddings"]:
            continue
        array = weight.float().numpy()
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            array = llama_cpp_permute(array, heads)
        if arch == "gemma3" and name.endswith("norm.weight"):
            array = array + 1  # llama.cpp's converter stores the factor Gemma's norms multiply by
        gguf_name = gguf_tensor_name(name, arch)
        qtype = gguf.GGMLQuantizationType[quant(gguf_name) if callable(quant) else quant]
        if array.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            tensors[gguf_name] = (gguf.quants.quantize(array, qtype), qtype)
        else:
            tensors[gguf_name] = (np.ascontiguousarray(array), gguf.GGMLQuantizationType.F32)
    return tensors


def _gguf_arch(config: dict) -> str:
    return "gemma3" if config["model_type"] == "gemma3_text" else config["model_type"]


def make_tiny_gguf(path, folder, quant="F32", with_tokenizer: bool = True, metadata: dict | None = None) -> Path:
    """Convert a folder from make_tiny_hf_model to a GGUF file, as llama.cpp's converter would.

    metadata: keys to change, each to None (left out) or to (value, gguf.GGUFValueType), for malformed files."""
    config = json.loads((Path(folder) / "config.json").read_text())
    arch = _gguf_arch(config)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_name(f"tiny-{arch}")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    if arch == "gemma3":
        rope = config["rope_parameters"]
        writer.add_rope_freq_base(rope["full_attention"]["rope_theta"])
        writer.add_rope_freq_base_swa(rope["sliding_attention"]["rope_theta"])
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
        writer.add_sliding_window(config["sliding_window"])
    else:
        writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_vocab_size(config["vocab_size"])
    if with_tokenizer:
        _add_tokenizer(writer, Path(folder))
    for name, (array, qtype) in gguf_tensors(folder, quant).items():
        writer.add_tensor(name, array, raw_dtype=qtype)
    for key, value in (metadata or {}).items():
        writer.kv_data[0].pop(key, None)
        if value is not None:
            writer.add_key_value(key, *value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def _add_tokenizer(writer: gguf.GGUFWriter, folder: Path) -> None:
    spec = json.loads((folder / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in SPECIAL_TOKENS else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(ENDOFTEXT_ID)
    writer.add_eos_token_id(IM_END_ID)
    writer.add_pad_token_id(ENDOFTEXT_ID)
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML_TEMPLATE)


def assert_first_tokens_close(ref, out, tol: float = 0.3) -> None:
    """Each output's first token equals the reference's, and the log-probabilities the two share are
    within `tol` nats: what a faithful quantization of a tiny random model keeps (its logits span tens
    of nats; a wrong scale or layout moves them by whole nats)."""
    for a, b in zip(ref, out, strict=True):
        first_a, first_b = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
        assert a.outputs[0].token_ids[0] == b.outputs[0].token_ids[0]
        for token, lp in first_b.items():
            if token in first_a:
                assert abs(lp.logprob - first_a[token].logprob) < tol
