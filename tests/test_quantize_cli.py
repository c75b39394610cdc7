"""`nimblelm quantize`: the folder it writes, loading it with no flag, and one clear error per bad option."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from nimblelm import LLM, SamplingParams
from nimblelm.cli import main
from nimblelm.errors import ModelFormatError
from nimblelm.layers.linear import Linear
from nimblelm.models.loader import load_model
from nimblelm.quantization.int4 import Int4WeightOnly
from nimblelm.quantization.saved import tensor_key


@pytest.fixture(scope="module")
def rtn_folder(tiny_qwen, tmp_path_factory):
    out = tmp_path_factory.mktemp("quantized") / "rtn4"
    assert main(["quantize", "--model", str(tiny_qwen), "--method", "rtn", "--bits", "4", "--group-size", "32",
                 "--output", str(out)]) == 0
    return out


def test_quantize_writes_a_folder_that_generate_loads_without_flags(rtn_folder):
    names = {p.name for p in rtn_folder.iterdir()}
    assert {"config.json", "tokenizer.json", "model.safetensors", "quantization_config.json"} <= names
    config = json.loads((rtn_folder / "quantization_config.json").read_text())
    assert config | {"nimblelm_version": "x", "source": "x"} == {
        "method": "rtn", "bits": 4, "group_size": 32, "symmetric": True, "calibration": None,
        "calib_samples": None, "calib_seq_len": None, "seed": None, "act_order": False, "source": "x",
        "nimblelm_version": "x", "format_version": 1,
    }
    expected = LLM(str(rtn_folder)).generate("Hello world", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    result = subprocess.run([sys.executable, "-m", "nimblelm", "generate", "--model", str(rtn_folder),
                             "--max-tokens", "8", "Hello world"], capture_output=True, text=True, timeout=300, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected[0].outputs[0].text + "\n"


@pytest.mark.parametrize(("args", "message"), [
    (["--method", "rtn", "--bits", "3"], "rtn cannot quantize to 3 bits"),
    (["--method", "awq", "--bits", "8"], "awq cannot quantize to 8 bits"),
    (["--method", "smoothquant", "--bits", "4"], "smoothquant cannot quantize to 4 bits"),
    (["--method", "smoothquant", "--bits", "8", "--group-size", "32"], "takes no group size"),
    (["--method", "hqq", "--bits", "4"], "unknown quantization method"),
    (["--method", "rtn", "--bits", "4", "--group-size", "48"], "group size must be one of"),
    (["--method", "rtn", "--bits", "4", "--group-size", "128"], "does not divide the input dimension 64"),
    (["--method", "gptq", "--bits", "4", "--group-size", "32", "--calib-samples", "1", "--calib-seq-len", "16"],
     "calibration set too small"),
])
def test_bad_options_are_one_line_and_exit_1(tiny_qwen, tmp_path, capsys, args, message):
    assert main(["quantize", "--model", str(tiny_qwen), *args, "--output", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and message in err[-1], err


def copy_folder(src, dst):
    dst.mkdir()
    for p in src.iterdir():
        (dst / p.name).write_bytes(p.read_bytes())
    return dst


def test_corrupt_quantized_folders_are_format_errors(rtn_folder, tmp_path):
    missing = copy_folder(rtn_folder, tmp_path / "missing")
    tensors = load_file(missing / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.mins"]
    save_file(tensors, missing / "model.safetensors")
    with pytest.raises(ModelFormatError, match="incomplete quantized model, model.layers.1.mlp.down_proj.mins"):
        LLM(str(missing))

    misshapen = copy_folder(rtn_folder, tmp_path / "misshapen")
    tensors = load_file(misshapen / "model.safetensors")
    tensors["lm_head.scales"] = tensors["lm_head.scales"][:, :1].contiguous()
    save_file(tensors, misshapen / "model.safetensors")
    with pytest.raises(ModelFormatError, match="lm_head.scales is"):
        LLM(str(misshapen))

    # The folder's int4 layers are symmetric: minimums other than -8 * scales contradict its config.
    asymmetric = copy_folder(rtn_folder, tmp_path / "asymmetric")
    tensors = load_file(asymmetric / "model.safetensors")
    tensors["model.layers.0.self_attn.o_proj.mins"] = tensors["model.layers.0.self_attn.o_proj.mins"] + 0.5
    save_file(tensors, asymmetric / "model.safetensors")
    with pytest.raises(ModelFormatError, match="layers.0.self_attn.o_proj: its int4 minimums are not -8 \\* scales"):
        LLM(str(asymmetric))

    bad_config = copy_folder(rtn_folder, tmp_path / "config")
    (bad_config / "quantization_config.json").write_text('{"method": "rtn", "bits": 3, "group_size": 32}')
    with pytest.raises(ModelFormatError, match="not a valid quantization config"):
        LLM(str(bad_config))

    truncated = copy_folder(rtn_folder, tmp_path / "truncated")
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFormatError, match="unreadable safetensors"):
        LLM(str(truncated))


def test_a_quantized_folder_is_adopted_bit_for_bit(rtn_folder, tmp_path, monkeypatch):
    """The layers take the saved tensors as they are: the loader makes no fp32 weight for them, nothing
    rounds them again, and the kernels' storage holds exactly the file's values."""
    edited = copy_folder(rtn_folder, tmp_path / "edited")
    saved = load_file(edited / "model.safetensors")
    # Every value 5 in a group: no rounding of a float weight gives that back (the group's extreme maps to 0).
    key = "model.layers.0.self_attn.o_proj.qweight"
    saved[key] = torch.full_like(saved[key], 0x55)
    save_file(saved, edited / "model.safetensors")

    loaded = load_model(str(edited))
    assert not [name for name in loaded.weights if name.endswith("proj.weight") or name == "lm_head.weight"]
    assert {fmt for fmt, _ in loaded.quantized.values()} == {"int4-g32"}

    def process(method, layer):
        raise AssertionError(f"rounded a float weight again: {layer}")

    monkeypatch.setattr(Int4WeightOnly, "process", process)
    model = LLM(str(edited)).llm_engine.runner.model
    linears = {name: m for name, m in model.named_modules() if isinstance(m, Linear)}
    assert set(linears) == set(loaded.quantized)
    for name, layer in linears.items():
        assert layer.weight is None
        for tensor, value in layer.method.stored(layer).items():
            assert torch.equal(value, saved[tensor_key(name, tensor)]), (name, tensor)
        if layer.bias is not None:
            assert torch.equal(layer.bias, saved[tensor_key(name, "bias")])
    assert torch.equal(model.embed_tokens.weight, saved["model.embed_tokens.weight"])


def test_a_quantized_folder_refuses_a_second_quantization(rtn_folder):
    from nimblelm.errors import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="already quantized"):
        LLM(str(rtn_folder), quantization="int8")


def test_offline_quantization_of_gemma3_is_refused_in_one_line(tmp_path, capsys):
    from tiny_models import make_tiny_hf_model

    gemma = make_tiny_hf_model(tmp_path / "gemma3", arch="gemma3")
    assert main(["quantize", "--model", str(gemma), "--method", "rtn", "--bits", "8", "--output",
                 str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error:") and "supports llama, qwen2 models, not gemma3" in err[-1], err
