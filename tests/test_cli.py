"""The command line: results on stdout, one error line on stderr and a non-zero exit for bad input."""

import subprocess
import sys

import pytest


def nimblelm(*args, stdin=None):
    return subprocess.run(
        [sys.executable, "-m", "nimblelm", *args], capture_output=True, text=True, input=stdin, timeout=300, check=False
    )


def test_generate_prints_the_completion(tiny_qwen, tiny_llm):
    from nimblelm import SamplingParams

    expected = tiny_llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    result = nimblelm("generate", "--model", str(tiny_qwen), "--max-tokens", "8", "Hello world")
    assert result.returncode == 0, result.stderr
    assert result.stdout == expected[0].outputs[0].text + "\n"


def test_an_impossible_split_over_ranks_is_one_line(tiny_qwen):
    result = nimblelm("generate", "--model", str(tiny_qwen), "-tp", "3", "Hello world")  # 2 KV heads, 4 query heads
    assert result.returncode == 1 and len(result.stderr.strip().splitlines()) == 1
    assert "tensor_parallel_size=3" in result.stderr


def test_chat_streams_answers_until_eof(tiny_qwen):
    result = nimblelm("chat", "--model", str(tiny_qwen), "--max-tokens", "5", "-t", "0", stdin="Hello\nHow are you?\n")
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2  # one streamed answer line per user line


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "no-such-model", "hi"], "neither a known alias"),
        (["generate", "--model", "/nonexistent/model.gguf", "hi"], "neither a known alias"),
        (["generate", "--temperature", "-1", "hi"], "temperature"),
        (["generate", "--top-p", "0", "hi"], "top_p"),
        (["generate", "-n", "0", "hi"], "n must be"),
        (["generate", "--quantization", "int3", "hi"], "unknown quantization"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(args, message):
    result = nimblelm(*args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0].lower()


def test_not_a_gguf_file(tmp_path):
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"this is not a gguf file" * 10)
    result = nimblelm("generate", "--model", str(bogus), "hi")
    assert result.returncode == 1
    assert len(result.stderr.strip().splitlines()) == 1


def test_empty_and_too_long_prompts(tiny_qwen):
    result = nimblelm("generate", "--model", str(tiny_qwen), "")
    assert result.returncode == 1 and "empty" in result.stderr
    result = nimblelm("generate", "--model", str(tiny_qwen), "--max-model-len", "16", "word " * 40)
    assert result.returncode == 1 and "max_model_len" in result.stderr


def test_models_list_shows_every_alias():
    result = nimblelm("models", "list")
    assert result.returncode == 0, result.stderr
    for alias in ("smollm2-135m", "qwen2.5-coder-0.5b", "qwen2.5-coder-1.5b", "gemma3-270m"):
        assert alias in result.stdout
