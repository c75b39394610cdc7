"""Server pieces that need no process: flags from the environment, stream hold-back, request models."""

import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from nimblelm.cli import build_parser
from nimblelm.errors import InvalidRequestError
from nimblelm.outputs import CompletionOutput
from nimblelm.server.async_engine import EngineThread
from nimblelm.server.protocol import ChatCompletionRequest, CompletionRequest
from nimblelm.server.serving import _ChoiceState, _stop_prefix_len


def parse(argv, monkeypatch, **env):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return build_parser().parse_args(argv)


def test_every_serve_flag_reads_its_environment_variable(monkeypatch):
    args = parse(["serve"], monkeypatch, NIMBLELM_PORT="9001", NIMBLELM_HOST="0.0.0.0", NIMBLELM_API_KEY="k",
                 NIMBLELM_MODEL="some-model", NIMBLELM_MAX_MODEL_LEN="512", NIMBLELM_NO_CHUNKED_PREFILL="1",
                 NIMBLELM_SHUTDOWN_TIMEOUT="2.5")
    assert (args.port, args.host, args.api_key, args.model, args.max_model_len) == (9001, "0.0.0.0", "k", "some-model",
                                                                                    512)
    assert args.enable_chunked_prefill is False and args.shutdown_timeout == 2.5
    # The command line wins over the environment.
    assert parse(["serve", "--port", "7000"], monkeypatch, NIMBLELM_PORT="9001").port == 7000


def test_defaults_without_environment(monkeypatch):
    for name in ("NIMBLELM_PORT", "NIMBLELM_HOST", "NIMBLELM_API_KEY"):
        monkeypatch.delenv(name, raising=False)
    args = build_parser().parse_args(["serve"])
    assert (args.host, args.port, args.api_key, args.enable_chunked_prefill) == ("127.0.0.1", 8000, None, True)


@pytest.mark.parametrize("env", [{"NIMBLELM_PORT": "eighty"}, {"NIMBLELM_NO_CHUNKED_PREFILL": "maybe"},
                                 {"NIMBLELM_LOG_LEVEL": "loud"}])
def test_a_bad_environment_value_is_a_usage_error(monkeypatch, capsys, env):
    with pytest.raises(SystemExit) as e:
        parse(["serve"], monkeypatch, **env)
    assert e.value.code == 2 and next(iter(env)) in capsys.readouterr().err


def test_stop_prefix_hold_back():
    assert _stop_prefix_len("hello wor", ("world",)) == 3
    assert _stop_prefix_len("hello", ("xyz", "lo!")) == 2
    assert _stop_prefix_len("hello", ("abc",)) == 0
    assert _stop_prefix_len("", ("abc",)) == 0


def test_a_stream_never_sends_text_that_a_stop_string_later_cuts():
    # The engine's text grows "ab" -> "abc" -> then "cd" completes and the text is cut back to "ab".
    state, stops = _ChoiceState(), ("cd",)
    steps = [("ab", None), ("abc", None), ("ab", "stop")]
    sent = [state.advance(CompletionOutput(0, text, [1] * (i + 1), reason), stops)[0] for i, (text, reason) in
            enumerate(steps)]
    assert sent == ["ab", "", ""] and state.finished


def test_request_models_to_sampling_params():
    chat = ChatCompletionRequest.model_validate({
        "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 5, "max_tokens": 9, "n": 2.0, "top_k": 3, "logprobs": True, "top_logprobs": 2,
        "response_format": {"type": "json_object"}, "some_vendor_field": 1,
    })
    assert chat.conversation() == [{"role": "system", "content": "a\nb"}]
    params = chat.sampling_params(chat.requested_max_tokens, chat.num_logprobs())
    assert (params.n, params.max_tokens, params.top_k, params.logprobs) == (2, 5, 3, 2)
    assert params.structured_output.json_object and params.temperature == 1.0
    completion = CompletionRequest.model_validate({"prompt": [[1, 2], [3]], "best_of": 1})
    assert completion.prompts() == [[1, 2], [3]]
    with pytest.raises(InvalidRequestError, match="stream_options"):
        CompletionRequest.model_validate({"prompt": "x", "stream_options": {"include_usage": True}}).sampling_params(
            16, None)


def serve(*args):
    return subprocess.run([sys.executable, "-m", "nimblelm", "serve", *args], capture_output=True, text=True,
                          timeout=120, check=False, cwd=Path(__file__).resolve().parents[1])


def test_a_taken_port_is_one_line_and_exit_1():
    # The socket is bound before torch is imported, so this fails in well under a second. (A bad model
    # fails as in test_cli: the same LLM constructor and the same one-line handler in main.)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        result = serve("--port", str(taken.getsockname()[1]))
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "cannot listen on" in result.stderr


def test_engine_thread_runs_every_call_on_one_thread_and_raises_back():
    thread = EngineThread()
    idents = {thread.call(threading.get_ident) for _ in range(3)}
    assert len(idents) == 1 and threading.get_ident() not in idents

    def fail():
        raise InvalidRequestError("bad")

    with pytest.raises(InvalidRequestError, match="bad"):
        thread.call(fail)
    assert thread.call(lambda: 7) == 7  # an exception does not end the thread
