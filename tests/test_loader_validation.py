"""Malformed model inputs, as a new user might hand them over: each must end in one typed, one-line error
(ModelFormatError or UnsupportedModelError) that names the file and the field, never a raw KeyError,
TypeError or a traceback from inside the model."""

import json
import shutil

import pytest
from gguf import GGUFValueType
from safetensors.torch import load_file, save_file
from tiny_models import make_tiny_gguf, make_tiny_hf_model

from nimblelm.errors import ModelFormatError, UnsupportedModelError
from nimblelm.models.loader import load_model


class _Drop:
    def __repr__(self) -> str:  # a stable test id (object() would put its address in it)
        return "DROP"


DROP = _Drop()  # a config key to remove


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("NIMBLELM_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("valid")
    return {arch: make_tiny_hf_model(root / arch, arch) for arch in ("llama", "gemma3")}


def assert_one_clear_error(error_type, model, *fragments):
    with pytest.raises(error_type) as info:
        load_model(str(model), progress=False)
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message


# ---------------------------------------------------------------- config.json

CONFIG_CASES = [
    # (architecture, changes to config.json, error, what the message says after the file name)
    ("llama", {"hidden_size": DROP}, ModelFormatError, "config.json: lacks hidden_size"),
    ("llama", {"num_hidden_layers": DROP}, ModelFormatError, "lacks num_hidden_layers"),
    ("llama", {"vocab_size": DROP}, ModelFormatError, "lacks vocab_size"),
    ("llama", {"intermediate_size": None}, ModelFormatError, "lacks intermediate_size"),
    ("llama", {"num_attention_heads": DROP}, ModelFormatError, "lacks num_attention_heads"),
    ("llama", {"hidden_size": "64"}, ModelFormatError, "hidden_size must be an integer, got '64'"),
    ("llama", {"hidden_size": 64.0}, ModelFormatError, "hidden_size must be an integer, got 64.0"),
    ("llama", {"vocab_size": True}, ModelFormatError, "vocab_size must be an integer, got True"),
    ("llama", {"num_hidden_layers": 0}, ModelFormatError, "num_hidden_layers must be positive, got 0"),
    ("llama", {"hidden_size": -64}, ModelFormatError, "hidden_size must be positive, got -64"),
    ("llama", {"num_key_value_heads": 0}, ModelFormatError, "num_key_value_heads must be positive"),
    ("llama", {"max_position_embeddings": "long"}, ModelFormatError, "max_position_embeddings must be an integer"),
    ("llama", {"num_key_value_heads": 3}, ModelFormatError,
     "num_attention_heads (4) is not a multiple of num_key_value_heads (3)"),
    ("llama", {"head_dim": DROP, "hidden_size": 66}, ModelFormatError,
     "hidden_size (66) is not a multiple of num_attention_heads (4)"),
    ("llama", {"head_dim": 15}, ModelFormatError, "head_dim (15) must be even"),
    ("llama", {"rms_norm_eps": "1e-6"}, ModelFormatError, "rms_norm_eps must be a number, got '1e-6'"),
    ("llama", {"rms_norm_eps": 0}, ModelFormatError, "rms_norm_eps must be positive"),
    ("llama", {"rope_parameters": {"rope_type": "default", "rope_theta": -1}}, ModelFormatError,
     "rope_parameters.rope_theta must be positive"),
    ("llama", {"rope_parameters": "fast"}, ModelFormatError, "rope_parameters must be an object"),
    ("llama", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, ModelFormatError,
     "lacks rope_parameters.factor"),
    ("llama", {"tie_word_embeddings": "yes"}, ModelFormatError, "tie_word_embeddings must be true or false"),
    ("llama", {"eos_token_id": "</s>"}, ModelFormatError, "eos_token_id must be a token id or a list of them"),
    ("llama", {"eos_token_id": [2, "x"]}, ModelFormatError, "eos_token_id must be a token id"),
    ("llama", {"bos_token_id": -1}, ModelFormatError, "bos_token_id must be at least 0, got -1"),
    ("llama", {"architectures": "LlamaForCausalLM"}, ModelFormatError, "architectures must be a list"),
    ("llama", {"architectures": ["GPT2LMHeadModel"]}, UnsupportedModelError, "'GPT2LMHeadModel' is not supported"),
    ("llama", {"architectures": DROP, "model_type": "bert"}, UnsupportedModelError, "'bert' is not supported"),
    ("llama", {"architectures": [], "model_type": DROP}, ModelFormatError, "lacks architectures (and model_type)"),
    ("llama", {"architectures": [7]}, UnsupportedModelError, "architecture 7 is not supported"),
    ("llama", {"hidden_act": "gelu"}, UnsupportedModelError, "activation 'gelu' is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, UnsupportedModelError,
     "rope scaling 'yarn' is not supported"),
    # Shapes that disagree with the weights.
    ("llama", {"intermediate_size": 100}, ModelFormatError,
     "weight model.layers.0.mlp.gate_proj.weight has shape (128, 64), expected (100, 64)"),
    ("llama", {"vocab_size": 500}, ModelFormatError, "weight model.embed_tokens.weight has shape (384, 64)"),
    ("llama", {"num_hidden_layers": 3}, ModelFormatError, "missing weight model.layers.2."),
    ("llama", {"num_hidden_layers": 1}, ModelFormatError,
     "weight model.layers.1.input_layernorm.weight lies past the 1 layers the config declares"),
    ("gemma3", {"layer_types": ["sliding_attention"] * 5}, ModelFormatError,
     "layer_types must list full_attention or sliding_attention for each of the 6 layers"),
    ("gemma3", {"layer_types": ["sliding_attention"] * 5 + ["global"]}, ModelFormatError, "layer_types must list"),
    ("gemma3", {"sliding_window": 0}, ModelFormatError, "sliding_window must be positive"),
    ("gemma3", {"query_pre_attn_scalar": "256"}, ModelFormatError, "query_pre_attn_scalar must be a number"),
    ("gemma3", {"rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": 10000}},
     ModelFormatError, "rope_parameters.sliding_attention must be an object"),
    ("gemma3", {"final_logit_softcapping": 30.0}, UnsupportedModelError, "final_logit_softcapping is not supported"),
    ("gemma3", {"hidden_activation": "gelu"}, UnsupportedModelError, "activation 'gelu' is not supported"),
]


@pytest.mark.parametrize("arch, changes, error, fragment", CONFIG_CASES, ids=[str(c[1])[:60] for c in CONFIG_CASES])
def test_malformed_config_json(folders, tmp_path, arch, changes, error, fragment):
    folder = shutil.copytree(folders[arch], tmp_path / "model")
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is DROP:
            config.pop(key, None)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))
    assert_one_clear_error(error, folder, str(folder), fragment)


@pytest.mark.parametrize("text, fragment", [
    ("[1, 2, 3]", "config.json: must be a JSON object, got list"),
    ('{"hidden_size": 64,', "config.json: unreadable JSON"),
    ("", "config.json: unreadable JSON"),
])
def test_config_json_that_is_not_an_object(folders, tmp_path, text, fragment):
    folder = shutil.copytree(folders["llama"], tmp_path / "model")
    (folder / "config.json").write_text(text)
    assert_one_clear_error(ModelFormatError, folder, fragment)


def test_malformed_generation_config(folders, tmp_path):
    folder = shutil.copytree(folders["llama"], tmp_path / "model")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "end"}))
    assert_one_clear_error(ModelFormatError, folder, "generation_config.json: eos_token_id must be a token id")


# ---------------------------------------------------------------- safetensors


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def corrupt_header(path):
    data = bytearray(path.read_bytes())
    data[8:16] = b"\xff" * 8  # the JSON header starts here
    path.write_bytes(bytes(data))


def header_longer_than_file(path):
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")


def reshaped_tensor(path):
    weights = load_file(path)
    name = "model.layers.1.self_attn.o_proj.weight"
    weights[name] = weights[name].reshape(32, 128)
    save_file(weights, path)


@pytest.mark.parametrize("damage, error, fragment", [
    (truncate, ModelFormatError, "unreadable safetensors file"),
    (corrupt_header, ModelFormatError, "unreadable safetensors file"),
    (header_longer_than_file, ModelFormatError, "unreadable safetensors file"),
    (reshaped_tensor, ModelFormatError, "weight model.layers.1.self_attn.o_proj.weight has shape (32, 128)"),
])
def test_damaged_safetensors(folders, tmp_path, damage, error, fragment):
    folder = shutil.copytree(folders["llama"], tmp_path / "model")
    damage(folder / "model.safetensors")
    assert_one_clear_error(error, folder, str(folder), fragment)


@pytest.mark.parametrize("index, fragment", [
    ({"weight_map": ["model.safetensors"]}, "weight_map must be an object"),
    ({"weight_map": {"model.norm.weight": 3}}, "weight_map.model.norm.weight must be a string"),
    ({"weight_map": {"model.norm.weight": "missing.safetensors"}}, "missing.safetensors: unreadable safetensors file"),
])
def test_malformed_shard_index(folders, tmp_path, index, fragment):
    folder = shutil.copytree(folders["llama"], tmp_path / "model")
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_one_clear_error(ModelFormatError, folder, fragment)


# ---------------------------------------------------------------- GGUF metadata

U32, F32, STR, ARRAY = GGUFValueType.UINT32, GGUFValueType.FLOAT32, GGUFValueType.STRING, GGUFValueType.ARRAY
GGUF_CASES = [
    # (architecture, metadata changes, error, what the message says after the file name)
    ("llama", {"general.architecture": None}, ModelFormatError, "lacks general.architecture"),
    ("llama", {"general.architecture": ("mamba", STR)}, UnsupportedModelError, "'mamba' is not supported"),
    ("llama", {"llama.embedding_length": None}, ModelFormatError, "lacks llama.embedding_length"),
    ("llama", {"llama.block_count": None}, ModelFormatError, "lacks llama.block_count"),
    ("llama", {"llama.attention.head_count": None}, ModelFormatError, "lacks llama.attention.head_count"),
    ("llama", {"llama.feed_forward_length": None}, ModelFormatError, "lacks llama.feed_forward_length"),
    ("llama", {"llama.attention.layer_norm_rms_epsilon": None}, ModelFormatError,
     "lacks llama.attention.layer_norm_rms_epsilon"),
    ("llama", {"llama.embedding_length": ("64", STR)}, ModelFormatError,
     "llama.embedding_length must be an integer, got '64'"),
    ("llama", {"llama.block_count": (0, U32)}, ModelFormatError, "llama.block_count must be positive"),
    ("llama", {"llama.rope.freq_base": ("fast", STR)}, ModelFormatError, "llama.rope.freq_base must be a number"),
    ("llama", {"llama.attention.head_count_kv": (3, U32)}, ModelFormatError,
     "llama.attention.head_count (4) is not a multiple of llama.attention.head_count_kv (3)"),
    ("llama", {"llama.attention.head_count_kv": ([2, 4], ARRAY)}, UnsupportedModelError,
     "a different number of kv heads per layer"),
    ("llama", {"llama.attention.head_count_kv": (["2"], ARRAY)}, ModelFormatError,
     "llama.attention.head_count_kv must be a positive integer or a list of them"),
    ("llama", {"tokenizer.ggml.eos_token_id": ("</s>", STR)}, ModelFormatError,
     "tokenizer.ggml.eos_token_id must be a token id"),
    # Metadata that disagrees with the tensors.
    ("llama", {"llama.embedding_length": (128, U32)}, ModelFormatError, "has shape"),
    ("llama", {"llama.feed_forward_length": (96, U32)}, ModelFormatError,
     "has shape (64, 128), expected (64, 96)"),
    ("llama", {"llama.block_count": (1, U32)}, ModelFormatError, "lies past the 1 layers the config declares"),
    ("gemma3", {"gemma3.attention.sliding_window": None}, ModelFormatError, "lacks gemma3.attention.sliding_window"),
    ("gemma3", {"gemma3.rope.freq_base_swa": (-1.0, F32)}, ModelFormatError,
     "gemma3.rope.freq_base_swa must be positive"),
]


@pytest.mark.parametrize("arch, metadata, error, fragment", GGUF_CASES, ids=[str(c[1])[:60] for c in GGUF_CASES])
@pytest.mark.parametrize("direct", [False, True], ids=["fp32", "gguf-direct"])
def test_malformed_gguf(folders, tmp_path, arch, metadata, error, fragment, direct):
    path = make_tiny_gguf(tmp_path / "bad.gguf", folders[arch], metadata=metadata)
    with pytest.raises(error) as info:
        load_model(str(path), progress=False, gguf_direct=direct)
    assert "\n" not in str(info.value) and str(path) in str(info.value) and fragment in str(info.value)
