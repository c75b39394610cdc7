"""The interactive terminal chat: reads a line, streams the answer token by token."""

from __future__ import annotations

import sys

from nimblelm.errors import InvalidRequestError, NimbleLMError
from nimblelm.llm import LLM
from nimblelm.sampling_params import SamplingParams


def run_chat(llm: LLM, params: SamplingParams, system: str | None = None) -> int:
    if not llm.tokenizer.chat_template:
        # A base model (gemma3-270m): say so once, rather than after every line the user types.
        raise InvalidRequestError("this model has no chat template (a base model); use `generate` with a plain prompt")
    engine = llm.llm_engine
    history = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    print("nimblelm chat: type a message, Ctrl-D or /exit to quit, /reset to clear the history.", file=sys.stderr)
    turn = 0
    while True:
        if interactive:
            print(">>> ", end="", flush=True, file=sys.stderr)
        line = sys.stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        if line.strip() == "/reset":
            history = history[:1] if system else []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        request_id = f"chat-{turn}"
        turn += 1
        try:
            engine.add_request(request_id, llm.apply_chat_template(history), params)
        except NimbleLMError as e:  # e.g. the history outgrew max_model_len: say so, keep chatting
            print(f"error: {e} (/reset clears the history)", file=sys.stderr)
            history.pop()
            continue
        text, printed = "", 0
        try:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    text = output.outputs[0].text
                    print(text[printed:], end="", flush=True)
                    printed = len(text)
        except KeyboardInterrupt:
            engine.abort_request(request_id)
            print()
            history.pop()
            continue
        print()
        history.append({"role": "assistant", "content": text})
