"""Loader: Hugging Face folders and GGUF files into config + fp32 weights + tokenizer, the dequant cache,
and the typed errors for everything that cannot be loaded."""

import json
import os
import shutil

import gguf
import numpy as np
import pytest
import torch
from hf_reference import model_and_tokenizer_from_gguf
from safetensors.torch import load_file, save_file
from tiny_models import (
    CHATML_TEMPLATE,
    ENDOFTEXT_ID,
    IM_END_ID,
    gguf_tensor_name,
    gguf_tensors,
    llama_cpp_permute,
    make_tiny_gguf,
    make_tiny_hf_model,
)
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from nimblelm.errors import ModelFormatError, ModelNotFoundError, UnsupportedModelError
from nimblelm.models import gguf_file, loader, registry
from nimblelm.models.loader import load_model
from nimblelm.models.registry import ModelEntry

TEXT = "Hello world! <|im_start|>user\nWhat is 12 + 345? The quick brown fox.<|im_end|>\n"


@pytest.fixture(autouse=True)
def cache(request, tmp_path, monkeypatch):
    """Unit tests get a private cache; integration tests share the user's, so real models are pulled once."""
    if request.node.get_closest_marker("integration") is None:
        monkeypatch.setenv("NIMBLELM_CACHE", str(tmp_path / "cache"))
    return registry.cache_dir()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny(request, tmp_path_factory):
    """(arch, HF folder, F32 GGUF of the same weights)."""
    root = tmp_path_factory.mktemp(request.param)
    folder = make_tiny_hf_model(root / "hf", request.param)
    return request.param, folder, make_tiny_gguf(root / f"tiny-{request.param}.gguf", folder)


@pytest.fixture(scope="module")
def llama_pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama")
    folder = make_tiny_hf_model(root / "hf", "llama")
    return folder, make_tiny_gguf(root / "tiny.gguf", folder)


def copy_folder(folder, tmp_path):
    return shutil.copytree(folder, tmp_path / "copy")


# ---------------------------------------------------------------- Hugging Face folders


def test_hf_folder(tiny):
    arch, folder, _ = tiny
    model = load_model(str(folder))
    config = model.config
    assert (config.architecture, config.vocab_size, config.hidden_size, config.intermediate_size) == (
        arch,
        384,
        64,
        128,
    )
    assert (config.num_layers, config.num_heads, config.num_kv_heads, config.head_dim) == (2, 4, 2, 16)
    assert config.max_position_embeddings == 512 and config.rms_norm_eps == 1e-6
    assert config.bos_token_id == ENDOFTEXT_ID and config.eos_token_ids == (IM_END_ID, ENDOFTEXT_ID)
    assert config.tie_word_embeddings == (arch == "llama") and config.attention_bias == (arch == "qwen2")
    assert config.rope_theta == (1e5 if arch == "llama" else 1e6) and config.rope_scaling is None
    assert config.sliding_window is None
    assert (model.source, model.name) == (folder, folder.name)

    assert set(model.weights) == set(loader.expected_shapes(config))
    assert ("lm_head.weight" in model.weights) == (arch == "qwen2")
    assert ("model.layers.1.self_attn.k_proj.bias" in model.weights) == (arch == "qwen2")
    source = load_file(folder / "model.safetensors")
    for name, weight in model.weights.items():
        assert weight.dtype == torch.float32 and torch.equal(weight, source[name]), name

    assert model.tokenizer.chat_template == CHATML_TEMPLATE
    assert model.tokenizer.eos_token == "<|im_end|>" and len(model.tokenizer) == 384


def test_hf_folder_bf16_weights_become_fp32(llama_pair, tmp_path):
    folder = copy_folder(llama_pair[0], tmp_path)
    weights = load_file(folder / "model.safetensors")
    save_file({name: w.bfloat16() for name, w in weights.items()}, folder / "model.safetensors")
    model = load_model(str(folder))
    assert all(w.dtype == torch.float32 for w in model.weights.values())
    assert torch.equal(model.weights["model.norm.weight"], weights["model.norm.weight"].bfloat16().float())


def test_hf_folder_sharded_weights(llama_pair, tmp_path):
    folder = copy_folder(llama_pair[0], tmp_path)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[:10], "model-00002-of-00002.safetensors": names[10:]}
    for file, shard_names in shards.items():
        save_file({n: weights[n] for n in shard_names}, folder / file)
    index = {"weight_map": {n: file for file, shard_names in shards.items() for n in shard_names}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    model = load_model(str(folder))
    assert all(torch.equal(model.weights[n], weights[n]) for n in model.weights)


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | changes))


def test_mistral_folder_keeps_its_sliding_window(llama_pair, tmp_path):
    folder = copy_folder(llama_pair[0], tmp_path)
    edit_config(folder, architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=64)
    config = load_model(str(folder)).config
    assert (config.architecture, config.sliding_window) == ("llama", 64)


def test_rope_scaling_is_passed_through(llama_pair, tmp_path):
    folder = copy_folder(llama_pair[0], tmp_path)
    edit_config(folder, rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5})
    config = load_model(str(folder)).config
    assert config.rope_scaling == {"rope_type": "linear", "factor": 2.0} and config.rope_theta == 5e5
    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}
    edit_config(
        folder, rope_parameters=None, rope_theta=5e5, rope_scaling=llama3 | {"original_max_position_embeddings": 64}
    )
    assert load_model(str(folder)).config.rope_scaling["rope_type"] == "llama3"
    edit_config(folder, rope_scaling={"type": "yarn", "factor": 4.0})
    with pytest.raises(UnsupportedModelError, match="rope scaling 'yarn'"):
        load_model(str(folder))


def test_unsupported_architecture_folder(llama_pair, tmp_path):
    folder = copy_folder(llama_pair[0], tmp_path)
    edit_config(folder, architectures=["GPT2LMHeadModel"])
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        load_model(str(folder))


def test_folder_without_config_or_weights(llama_pair, tmp_path):
    folder = copy_folder(llama_pair[0], tmp_path)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="no \\*.safetensors"):
        load_model(str(folder))
    (folder / "config.json").unlink()
    with pytest.raises(ModelFormatError, match="no config.json"):
        load_model(str(folder))


def test_folder_with_a_missing_weight(llama_pair, tmp_path):
    folder = copy_folder(llama_pair[0], tmp_path)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(ModelFormatError, match="missing weight model.layers.1.mlp.up_proj.weight"):
        load_model(str(folder))


def test_folder_with_an_unknown_weight(llama_pair, tmp_path):
    folder = copy_folder(llama_pair[0], tmp_path)
    weights = load_file(folder / "model.safetensors")
    weights["lm_head.weight"] = weights["model.embed_tokens.weight"].clone()  # a tied copy is fine
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    save_file(weights, folder / "model.safetensors")
    assert "lm_head.weight" not in load_model(str(folder)).weights
    weights["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(weights, folder / "model.safetensors")
    one_line_error(UnsupportedModelError, folder, "unexpected weight model.layers.0.self_attn.o_proj.bias")


def test_folder_without_tokenizer(llama_pair, tmp_path):
    folder = copy_folder(llama_pair[0], tmp_path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (folder / name).unlink()
    one_line_error(ModelFormatError, folder, "cannot load the tokenizer")


def test_folder_with_corrupt_safetensors(llama_pair, tmp_path):
    folder = copy_folder(llama_pair[0], tmp_path)
    (folder / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(ModelFormatError, match="unreadable safetensors"):
        load_model(str(folder))


# ---------------------------------------------------------------- GGUF files


def test_gguf_matches_the_hf_folder_exactly(tiny):
    _, folder, gguf_path = tiny
    reference = load_model(str(folder))
    model = load_model(str(gguf_path), progress=False)
    assert model.config == reference.config
    assert (model.source, model.name) == (gguf_path, gguf_path.stem)
    assert set(model.weights) == set(reference.weights)
    for name, weight in reference.weights.items():
        # Includes q_proj/k_proj: for llama this checks that llama.cpp's row permutation is undone.
        assert torch.equal(model.weights[name], weight), name


def test_gguf_tokenizer_matches_transformers(tiny):
    _, _, gguf_path = tiny
    model = load_model(str(gguf_path), progress=False)
    expected = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    assert model.tokenizer(TEXT).input_ids == expected(TEXT).input_ids
    assert model.tokenizer.chat_template == CHATML_TEMPLATE
    messages = [{"role": "user", "content": "hi"}]
    prompt = model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_gguf_tokenizer_matches_the_folder_tokenizer(llama_pair):
    folder, gguf_path = llama_pair
    reference = load_model(str(folder)).tokenizer
    assert load_model(str(gguf_path), progress=False).tokenizer(TEXT).input_ids == reference(TEXT).input_ids


@pytest.mark.parametrize("quant", ["Q8_0", "F16", "BF16"])
def test_quantized_gguf_dequantizes_like_gguf_py(tiny, tmp_path, quant):
    arch, folder, _ = tiny
    path = make_tiny_gguf(tmp_path / f"tiny-{quant}.gguf", folder, quant=quant)
    model = load_model(str(path), progress=False)
    reference = load_model(str(folder)).weights
    stored = gguf_tensors(folder, quant)
    config = model.config
    for name, weight in model.weights.items():
        data, qtype = stored[gguf_tensor_name(name)]
        expected = torch.from_numpy(gguf.quants.dequantize(data, qtype).copy())
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config.num_heads if "q_proj" in name else config.num_kv_heads
            expected = gguf_file.unpermute_qk(expected, heads)
        assert torch.equal(weight, expected), name
        assert torch.allclose(weight, reference[name], atol=0.02), name


def test_unpermute_inverts_llama_cpp_permute():
    weight = torch.randn(4 * 16, 64)
    for heads in (4, 2):
        permuted = torch.from_numpy(llama_cpp_permute(weight.numpy(), heads))
        assert not torch.equal(permuted, weight)
        assert torch.equal(gguf_file.unpermute_qk(permuted, heads), weight)


def test_gguf_name_mapping():
    assert gguf_file.hf_name("blk.11.attn_output.weight") == "model.layers.11.self_attn.o_proj.weight"
    assert gguf_file.hf_name("blk.0.attn_v.bias") == "model.layers.0.self_attn.v_proj.bias"
    assert gguf_file.hf_name("blk.3.ffn_norm.weight") == "model.layers.3.post_attention_layernorm.weight"
    assert gguf_file.hf_name("output.weight") == "lm_head.weight"
    assert gguf_file.hf_name("output_norm.weight") == "model.norm.weight"
    assert gguf_file.hf_name("blk.0.attn_q_norm.weight") is None
    assert gguf_file.hf_name("rope_freqs.weight") is None


def test_second_load_reads_the_cache(llama_pair, cache, monkeypatch):
    _, gguf_path = llama_pair
    first = load_model(str(gguf_path), progress=False)
    entry = loader.dequant_cache_path(gguf_path)
    assert entry.parent == cache / "dequant"
    assert sorted(p.name for p in entry.iterdir()) == ["config.json", "model.safetensors", "tokenizer"]
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary folder left behind

    def no_dequantizing(*args, **kwargs):
        raise AssertionError("the cached load must not dequantize")

    monkeypatch.setattr(gguf_file, "read_weights", no_dequantizing)
    second = load_model(str(gguf_path), progress=False)
    assert second.config == first.config
    assert all(torch.equal(second.weights[n], w) for n, w in first.weights.items())
    assert second.tokenizer(TEXT).input_ids == first.tokenizer(TEXT).input_ids
    assert second.tokenizer.chat_template == first.tokenizer.chat_template
    assert isinstance(second.tokenizer, PreTrainedTokenizerFast)


def test_cache_key_follows_file_changes(llama_pair, tmp_path):
    _, gguf_path = llama_pair
    copy = shutil.copy(gguf_path, tmp_path / "copy.gguf")
    before = loader.dequant_cache_path(copy), loader.dequant_cache_path(copy, identity="ab" * 32)
    os.utime(copy, ns=(0, 12345))
    assert loader.dequant_cache_path(copy) != before[0]
    assert loader.dequant_cache_path(copy, identity="ab" * 32) == before[1]  # a known sha256 names the content


def test_damaged_cache_is_rebuilt(llama_pair):
    _, gguf_path = llama_pair
    first = load_model(str(gguf_path), progress=False)
    (loader.dequant_cache_path(gguf_path) / "model.safetensors").write_bytes(b"garbage")
    with pytest.warns(UserWarning, match="rebuilding damaged cache"):
        again = load_model(str(gguf_path), progress=False)
    assert all(torch.equal(again.weights[n], w) for n, w in first.weights.items())


def one_line_error(error_type, model, match):
    with pytest.raises(error_type, match=match) as info:
        load_model(str(model), progress=False)
    assert "\n" not in str(info.value)


def test_truncated_gguf(llama_pair, tmp_path):
    data = llama_pair[1].read_bytes()
    for cut in (len(data) // 2, 200, 10):
        path = tmp_path / f"cut{cut}.gguf"
        path.write_bytes(data[:cut])
        one_line_error(ModelFormatError, path, "truncated")


def test_random_bytes_and_empty_files(tmp_path):
    noise = tmp_path / "noise.gguf"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    one_line_error(ModelFormatError, noise, "not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.touch()
    one_line_error(ModelFormatError, empty, "not a GGUF file")
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ModelFormatError):
        load_model(str(corrupt), progress=False)


def test_gguf_without_tokenizer(llama_pair, tmp_path):
    path = make_tiny_gguf(tmp_path / "no-tokenizer.gguf", llama_pair[0], with_tokenizer=False)
    one_line_error(ModelFormatError, path, "cannot build a tokenizer")


def test_missing_path(tmp_path):
    one_line_error(ModelNotFoundError, tmp_path / "nothing-here.gguf", "neither a known alias")


def write_gguf(path, arch):
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_unsupported_gguf_architectures(tmp_path):
    one_line_error(UnsupportedModelError, write_gguf(tmp_path / "m.gguf", "mamba"), "'mamba' is not supported")


def test_unsupported_alias_fails_before_downloading(monkeypatch):
    def no_download(*args):
        raise AssertionError("must not download a model it cannot load")

    entry = ModelEntry("planned", "p.gguf", "mamba", "test", "ab" * 32, 1, parts=(), supported=False)
    monkeypatch.setitem(registry.MODELS, entry.alias, entry)
    monkeypatch.setattr(registry, "_download_wheel", no_download)
    one_line_error(UnsupportedModelError, "planned", "mamba.*not supported yet \\(later issue\\)")


def test_alias_loads_from_the_registry(llama_pair, cache, monkeypatch):
    _, gguf_path = llama_pair
    data = gguf_path.read_bytes()
    entry = ModelEntry("tiny-alias", "tiny.gguf", "llama", "test", "cd" * 32, len(data), parts=())
    monkeypatch.setitem(registry.MODELS, entry.alias, entry)
    entry.path.parent.mkdir(parents=True)
    entry.path.write_bytes(data)
    model = load_model("tiny-alias", progress=False)
    assert (model.name, model.source) == ("tiny-alias", entry.path)
    # Registry files are cached under their sha256, not their path and mtime.
    assert loader.dequant_cache_path(entry.path, entry.sha256).is_dir()


# ---------------------------------------------------------------- the real packaged model


@pytest.mark.integration
def test_smollm2_matches_transformers():
    pytest.importorskip("accelerate", reason="transformers needs accelerate to load a GGUF model")
    model = load_model("smollm2-135m", progress=False)
    config = model.config
    assert (config.architecture, config.num_layers, config.hidden_size, config.vocab_size) == ("llama", 30, 576, 49152)
    assert (config.num_heads, config.num_kv_heads, config.head_dim) == (9, 3, 64)
    assert config.tie_word_embeddings and config.rope_theta == 1e5 and "lm_head.weight" not in model.weights
    assert config.eos_token_ids[0] == 2  # <|im_end|>

    source = model.source
    reference, tokenizer = model_and_tokenizer_from_gguf(source)
    state = reference.state_dict()
    assert set(model.weights) == set(state) - {"lm_head.weight"}
    for name, weight in model.weights.items():
        assert torch.equal(weight, state[name]), name

    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert model.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == prompt
    for text in (prompt, TEXT, "def f(x):\n    return x ** 2  # héllo wörld"):
        assert model.tokenizer(text).input_ids == tokenizer(text).input_ids
