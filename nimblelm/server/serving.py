"""OpenAI completions and chat on top of the AsyncEngine: prompts and limits in, responses and SSE chunks out.

Everything here runs on the event loop and only translates: it validates and tokenizes the request,
queues it, and turns the engine's cumulative outputs into OpenAI bodies or stream deltas. The
tokenizer is the server's own copy, so the engine thread's detokenizer never shares one with it.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from functools import lru_cache

from jinja2 import TemplateError

from nimblelm.engine.structured import StructuredOutputBackend
from nimblelm.errors import InvalidRequestError, NimbleLMError
from nimblelm.outputs import CompletionOutput, Logprob, RequestOutput
from nimblelm.prompting import skeleton
from nimblelm.prompting.compression import compress
from nimblelm.prompting.scorer import SCORER_MODEL, Scorer
from nimblelm.sampling_params import SamplingParams
from nimblelm.server.async_engine import AsyncEngine, RequestStream
from nimblelm.server.errors import APIError, as_api_error
from nimblelm.server.protocol import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessageOut,
    ChoiceLogprobs,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
    TokenLogprob,
    TopLogprob,
    Usage,
)

logger = logging.getLogger("nimblelm.server")

SSE_DONE = "data: [DONE]\n\n"


class OpenAIServing:
    def __init__(self, engine: AsyncEngine, model_name: str, scorer_model: str = SCORER_MODEL):
        llm_engine = engine.engine
        self.engine = engine
        self.model_name = model_name
        self.scorer_model = scorer_model  # prompt compression's scorer, loaded on the first request for it
        self._scorer: Scorer | None = None
        self._scorer_lock = threading.Lock()
        self.max_model_len = llm_engine.config.max_model_len
        self.unbounded_generation = llm_engine.unbounded_generation  # the completion may outgrow the context
        self.vocab_size = llm_engine.model_config.vocab_size
        self.tokenizer = copy.deepcopy(llm_engine.tokenizer)
        self.token_bytes = _token_bytes_function(self.tokenizer)
        self.structured: StructuredOutputBackend | None = None
        self.structured_error: str | None = None
        try:  # built now (~0.6 s), not on the first structured request while others are being served
            self.structured = llm_engine.structured_output
        except Exception as e:  # noqa: BLE001 - any failure only disables structured output
            self.structured_error = f"structured output is not available for this model: {type(e).__name__}: {e}"
            logger.warning(self.structured_error)

    # -- shared checks ----------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def check_prompt(self, token_ids: list[int], max_tokens: int | None, param: str) -> None:
        if not token_ids:
            raise APIError(400, "the prompt is empty", param=param)
        if min(token_ids) < 0 or max(token_ids) >= self.vocab_size:
            raise APIError(400, f"prompt token ids must be in [0, {self.vocab_size})", param=param)
        limit, n = self.max_model_len, len(token_ids)
        if n >= limit:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, and the prompt has {n}: "
                           "shorten it", param=param, code="context_length_exceeded")
        if max_tokens is not None and n + max_tokens > limit and not self.unbounded_generation:
            raise APIError(400, f"this model's maximum context length is {limit} tokens, but {n + max_tokens} were "
                           f"requested ({n} in the prompt, {max_tokens} for the completion): lower max_tokens",
                           param="max_tokens", code="context_length_exceeded")

    def check_structured(self, params: SamplingParams) -> None:
        if params.structured_output is None:
            return
        if self.structured is None:
            raise APIError(400, self.structured_error or "structured output is not available", param="response_format")
        spec = params.structured_output
        try:
            self.structured.compile(spec)
        except InvalidRequestError as e:
            if spec.regex is None and spec.choice is None:
                raise APIError(400, str(e), param="response_format", code="invalid_json_schema") from None
            raise APIError(400, str(e), param="structured_outputs", code="invalid_regex") from None

    def _add(self, request_id: str, prompts: list[dict], params: list[SamplingParams]) -> list[RequestStream]:
        """One request per prompt, with its params."""
        streams: list[RequestStream] = []
        try:
            for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
                streams.append(self.engine.add_request(f"{request_id}-{i}", prompt, p))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        return streams

    # -- prompt compression ---------------------------------------------------------------------

    async def compressed(self, req: CompletionRequest | ChatCompletionRequest):
        """req with its prompt text (completions) or its user messages (chat) compressed by the server's
        scorer, off the event loop; req itself without prompt_compression."""
        if req.prompt_compression is None:
            return req
        try:
            config = req.prompt_compression.config(self.scorer_model)
        except InvalidRequestError as e:
            raise APIError(400, str(e), param="prompt_compression") from None
        if isinstance(req, CompletionRequest):
            texts = req.prompts()
            if not all(isinstance(t, str) for t in texts):
                raise APIError(400, "prompt_compression needs text prompts, not token ids", param="prompt")
            before = sum(len(self.tokenizer.encode(t)) for t in texts)
        else:
            texts = [m.to_template()["content"] for m in req.messages if m.role == "user"]
            before = len(self.tokenizer.encode(self._chat_text(req), add_special_tokens=False))
        shorter = iter([c.text for c in await asyncio.to_thread(self._compress, texts, config)])
        if isinstance(req, CompletionRequest):
            out = req.model_copy(update={"prompt": list(shorter)})
        else:
            out = req.model_copy(update={"messages": [m.model_copy(update={"content": next(shorter)})
                                                      if m.role == "user" else m for m in req.messages]})
        out._prompt_tokens_before_compression = before
        return out

    def _compress(self, texts: list[str], config) -> list:
        with self._scorer_lock:  # one scorer engine, driven by one request at a time
            if self._scorer is None:
                try:
                    self._scorer = Scorer(self.scorer_model)
                except NimbleLMError as e:  # the server's setting, not the request, is at fault
                    raise APIError(500, f"prompt compression's scorer {self.scorer_model!r} did not load: {e}",
                                   "server_error") from None
            return [compress(t, config, self._scorer) for t in texts]

    # -- tokenizer ------------------------------------------------------------------------------

    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.check_model(req.model)
        tokens = self.tokenizer.encode(req.prompt, add_special_tokens=req.add_special_tokens)
        return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=self.max_model_len)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(req.model)
        if any(t >= self.vocab_size for t in req.tokens):
            raise APIError(400, f"token ids must be in [0, {self.vocab_size})", param="tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens))

    def tokenizer_info(self) -> TokenizerInfo:
        t = self.tokenizer
        return TokenizerInfo(tokenizer_class=type(t).__name__, bos_token=t.bos_token, eos_token=t.eos_token,
                             pad_token=t.pad_token, model_max_length=self.max_model_len,
                             chat_template=t.chat_template if isinstance(t.chat_template, str) else None)

    # -- completions ------------------------------------------------------------------------------

    def completion_streams(self, req: CompletionRequest) -> tuple[str, list[RequestStream], SamplingParams]:
        self.check_model(req.model)
        params = req.sampling_params(req.max_tokens, req.logprobs, req.logprobs if req.echo else None)
        prompts = []
        for i, prompt in enumerate(req.prompts()):
            if isinstance(prompt, str):
                token_ids = self.tokenizer.encode(prompt) if prompt else []
                prompts.append({"prompt": prompt, "prompt_token_ids": token_ids})
            else:
                token_ids = list(prompt)
                prompts.append({"prompt_token_ids": token_ids})
            self.check_prompt(token_ids, params.max_tokens, "prompt")
        self.check_structured(params)
        request_id = f"cmpl-{uuid.uuid4().hex}"
        return request_id, self._add(request_id, prompts, [params] * len(prompts)), params

    async def completion(self, req: CompletionRequest, request_id: str, streams: list[RequestStream]) -> Completion:
        finals = await _finals(streams)
        choices = []
        for p, output in enumerate(finals):
            for c in output.outputs:
                prompt = self._echo(req, output)
                logprobs = None
                if req.logprobs is not None:
                    offset = len(prompt.text) if prompt else 0
                    logprobs = _completion_logprobs(c.token_ids, c.logprobs, req.logprobs, offset)
                    if prompt:
                        logprobs = _joined(prompt.logprobs, logprobs)
                text = prompt.text + c.text if prompt else c.text
                choices.append(CompletionChoice(index=p * req.n + c.index, text=text, logprobs=logprobs,
                                                finish_reason=_finish(c)))
        return Completion(id=request_id, created=int(time.time()), model=self.model_name, choices=choices,
                          usage=_usage(finals, req))

    async def completion_stream(
        self, req: CompletionRequest, request_id: str, streams: list[RequestStream], params: SamplingParams
    ) -> AsyncIterator[str]:
        created = int(time.time())
        states: dict[int, _ChoiceState] = {}
        finals: dict[int, RequestOutput] = {}

        def chunk(choice: CompletionChoice) -> str:
            body = Completion(id=request_id, created=created, model=self.model_name, choices=[choice])
            return _sse(body.model_dump_json(exclude=None if req.include_usage else {"usage"}))

        try:
            async for p, output in _merge(streams):
                finals[p] = output
                for c in output.outputs:
                    index = p * req.n + c.index
                    state = states.setdefault(index, _ChoiceState())
                    if state.finished:
                        continue
                    prompt = None
                    if not state.started:  # an echoed choice's first chunk starts with the prompt
                        state.started = True
                        prompt = self._echo(req, output)
                        state.text_offset = len(prompt.text) if prompt else 0
                    text, token_ids, entries = state.advance(c, params.stop_strings)
                    logprobs = None
                    if req.logprobs is not None and token_ids:
                        logprobs = _completion_logprobs(token_ids, entries, req.logprobs, state.text_offset)
                        state.text_offset += sum(len(t) for t in logprobs.tokens)
                    if prompt:
                        text = prompt.text + text
                        if prompt.logprobs is not None:
                            logprobs = _joined(prompt.logprobs, logprobs or CompletionLogprobs())
                    if text or logprobs is not None or state.finished:
                        finish = _finish(c) if state.finished else None
                        yield chunk(CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=finish))
            if req.include_usage:
                usage = _usage([finals[p] for p in sorted(finals)], req)
                body = Completion(id=request_id, created=created, model=self.model_name, choices=[], usage=usage)
                yield _sse(body.model_dump_json())
        except Exception as e:  # noqa: BLE001 - headers are sent: the error can only go in the stream
            yield _sse(json.dumps(as_api_error(e).body()))
        finally:
            for stream in streams:
                stream.close()
        yield SSE_DONE

    def _echo(self, req: CompletionRequest, output: RequestOutput) -> _Echo | None:
        """With echo: the prompt's text and, with logprobs, its tokens' logprobs (none for the first)."""
        if not req.echo:
            return None
        ids = output.prompt_token_ids
        text = output.prompt if output.prompt is not None else self.tokenizer.decode(ids)
        if req.logprobs is None:
            return _Echo(text, None)
        first = self.tokenizer.decode(ids[:1])
        rest = _completion_logprobs(ids[1:], output.prompt_logprobs[1:], req.logprobs, len(first))
        head = CompletionLogprobs(tokens=[first], token_logprobs=[None], top_logprobs=[None], text_offset=[0])
        return _Echo(text, _joined(head, rest))

    # -- chat -------------------------------------------------------------------------------------

    def chat_streams(self, req: ChatCompletionRequest) -> tuple[str, list[RequestStream], SamplingParams]:
        self.check_model(req.model)
        params = req.sampling_params(req.requested_max_tokens, req.num_logprobs())
        text = self._chat_text(req)
        # The template already wrote the special tokens; encoding must not add a second BOS (as LLM.chat).
        token_ids = self.tokenizer.encode(text, add_special_tokens=False)
        self.check_prompt(token_ids, params.max_tokens, "messages")
        self.check_structured(params)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        streams = self._add(request_id, [{"prompt": text, "prompt_token_ids": token_ids}], [params])
        return request_id, streams, params

    # -- Skeleton-of-Thought ----------------------------------------------------------------------

    def skeleton_plan(self, req: ChatCompletionRequest):
        """The plan of a chat request with output_organization "skeleton": its one question (after an
        optional system message), the sampling parameters, and its stages to run."""
        self.check_model(req.model)
        params = req.sampling_params(req.requested_max_tokens, req.num_logprobs())
        turns = req.conversation()
        system = turns[0]["content"] if turns[0]["role"] == "system" else None
        asked = turns[1:] if system is not None else turns
        if len(asked) != 1 or asked[0]["role"] != "user" or not req.add_generation_prompt:
            raise APIError(400, "Skeleton-of-Thought answers one user message (after an optional system one)",
                           param="messages")
        if params.logprobs is not None:
            raise APIError(400, "logprobs are not given with Skeleton-of-Thought", param="logprobs")
        try:
            skeleton.check(params, req.skeleton_router)
        except InvalidRequestError as e:
            raise APIError(400, str(e), param="output_organization") from None
        return skeleton.plan(self.tokenizer, asked[0]["content"], params, req.skeleton_router, system)

    async def skeleton_stages(self, plan, request_id: str) -> AsyncIterator[tuple[skeleton.Stage, list[RequestStream]]]:
        """Each stage of the plan with its requests' streams, queued; the caller reads the streams and the
        plan goes on with their final outputs. Ends with the plan's Answer as the last item's stage."""
        stage, k = next(plan), 0
        while True:
            for prompt, params in zip(stage.prompts, stage.params):
                self.check_prompt(prompt["prompt_token_ids"], params.max_tokens, "messages")
            streams = self._add(f"{request_id}-{k}", stage.prompts, stage.params)
            outs = yield stage, streams
            try:
                stage, k = plan.send(outs), k + 1
            except StopIteration as done:
                yield done.value, []
                return

    async def skeleton_chat(self, req: ChatCompletionRequest, plan) -> ChatCompletion:
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        stages = self.skeleton_stages(plan, request_id)
        stage, streams = await anext(stages)
        while not isinstance(stage, skeleton.Answer):
            stage, streams = await stages.asend(await _finals(streams))
        answer = stage
        choice = ChatChoice(index=0, message=ChatMessageOut(content=answer.text), finish_reason=answer.finish_reason)
        return ChatCompletion(id=request_id, created=int(time.time()), model=self.model_name, choices=[choice],
                              usage=_usage(answer.outputs, req))

    async def skeleton_chat_stream(self, req: ChatCompletionRequest, plan) -> AsyncIterator[str]:
        """Plain decoding streams token by token; Skeleton-of-Thought's points stream whole, in order, each
        as soon as it and those before it are done."""
        request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        exclude = None if req.include_usage else {"usage"}

        def chunk(delta: ChatDelta, finish=None) -> str:
            choice = ChatChunkChoice(index=0, delta=delta, finish_reason=finish)
            body = ChatCompletionChunk(id=request_id, created=created, model=self.model_name, choices=[choice])
            return _sse(body.model_dump_json(exclude=exclude))

        stages = self.skeleton_stages(plan, request_id)
        streams: list[RequestStream] = []
        try:
            yield chunk(ChatDelta(role="assistant", content=""))
            stage, streams = await anext(stages)
            while not isinstance(stage, skeleton.Answer):
                finals: dict[int, RequestOutput] = {}
                state, sent = _ChoiceState(), 0
                async for j, output in _merge(streams):
                    if output.finished:
                        finals[j] = output
                    if stage.name == "plain":
                        text, _, _ = state.advance(output.outputs[0], stage.params[0].stop_strings)
                        if text:
                            yield chunk(ChatDelta(content=text))
                    while stage.name == "points" and sent in finals:
                        line = skeleton.point_line(stage.points, sent + 1, finals[sent])
                        yield chunk(ChatDelta(content=("\n" if sent else "") + line))
                        sent += 1
                stage, streams = await stages.asend([finals[j] for j in range(len(streams))])
            yield chunk(ChatDelta(), finish=stage.finish_reason)
            if req.include_usage:
                body = ChatCompletionChunk(id=request_id, created=created, model=self.model_name, choices=[],
                                           usage=_usage(stage.outputs, req))
                yield _sse(body.model_dump_json())
        except Exception as e:  # noqa: BLE001 - headers are sent: the error can only go in the stream
            yield _sse(json.dumps(as_api_error(e).body()))
        finally:
            for stream in streams:
                stream.close()
        yield SSE_DONE

    def _chat_text(self, req: ChatCompletionRequest) -> str:
        conversation = req.conversation()
        if not self.tokenizer.chat_template:
            raise APIError(400, "this model has no chat template: use /v1/completions")
        try:
            return self.tokenizer.apply_chat_template(
                conversation, tokenize=False, add_generation_prompt=req.add_generation_prompt
            )
        except (TemplateError, ValueError) as e:  # the template's own checks, e.g. roles that must alternate
            raise APIError(400, f"the chat template refused the messages: {e}", param="messages") from None

    async def chat(self, req: ChatCompletionRequest, request_id: str, streams: list[RequestStream]) -> ChatCompletion:
        (output,) = await _finals(streams)
        choices = []
        for c in output.outputs:
            logprobs = None
            if req.logprobs:
                logprobs = ChoiceLogprobs(content=self._chat_logprobs(c.token_ids, c.logprobs, req.top_logprobs or 0))
            choices.append(ChatChoice(index=c.index, message=ChatMessageOut(content=c.text), logprobs=logprobs,
                                      finish_reason=_finish(c)))
        return ChatCompletion(id=request_id, created=int(time.time()), model=self.model_name, choices=choices,
                              usage=_usage([output], req))

    async def chat_stream(
        self, req: ChatCompletionRequest, request_id: str, streams: list[RequestStream], params: SamplingParams
    ) -> AsyncIterator[str]:
        created = int(time.time())
        exclude = None if req.include_usage else {"usage"}

        def chunk(index: int, delta: ChatDelta, logprobs=None, finish=None) -> str:
            choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish)
            body = ChatCompletionChunk(id=request_id, created=created, model=self.model_name, choices=[choice])
            return _sse(body.model_dump_json(exclude=exclude))

        states = [_ChoiceState() for _ in range(req.n)]
        output = None
        try:
            for index in range(req.n):  # the role first, before any token, as OpenAI does
                yield chunk(index, ChatDelta(role="assistant", content=""))
            async for _, output in _merge(streams):
                for c in output.outputs:
                    state = states[c.index]
                    if state.finished:
                        continue
                    text, token_ids, entries = state.advance(c, params.stop_strings)
                    logprobs = None
                    if req.logprobs and token_ids:
                        logprobs = ChoiceLogprobs(content=self._chat_logprobs(token_ids, entries, req.top_logprobs or 0))
                    if text or logprobs is not None:
                        yield chunk(c.index, ChatDelta(content=text), logprobs)
                    if state.finished:
                        yield chunk(c.index, ChatDelta(), finish=_finish(c))
            if req.include_usage and output is not None:
                body = ChatCompletionChunk(id=request_id, created=created, model=self.model_name, choices=[],
                                           usage=_usage([output], req))
                yield _sse(body.model_dump_json())
        except Exception as e:  # noqa: BLE001 - headers are sent: the error can only go in the stream
            yield _sse(json.dumps(as_api_error(e).body()))
        finally:
            for stream in streams:
                stream.close()
        yield SSE_DONE

    def _chat_logprobs(self, token_ids: list[int], entries: list[dict[int, Logprob]], k: int) -> list[TokenLogprob]:
        out = []
        for token, entry in zip(token_ids, entries):
            chosen = entry[token]
            top = [
                TopLogprob(token=lp.decoded_token or "", logprob=lp.logprob, bytes=self.token_bytes(t))
                for t, lp in _top(entry, token, k)
            ]
            out.append(TokenLogprob(token=chosen.decoded_token or "", logprob=chosen.logprob,
                                    bytes=self.token_bytes(token), top_logprobs=top))
        return out


@dataclass
class _Echo:
    text: str
    logprobs: CompletionLogprobs | None


def _joined(a: CompletionLogprobs, b: CompletionLogprobs) -> CompletionLogprobs:
    return CompletionLogprobs(tokens=a.tokens + b.tokens, token_logprobs=a.token_logprobs + b.token_logprobs,
                              top_logprobs=a.top_logprobs + b.top_logprobs, text_offset=a.text_offset + b.text_offset)


@dataclass
class _ChoiceState:
    """What one choice's stream has sent so far."""

    started: bool = False
    text_sent: int = 0
    tokens_sent: int = 0
    text_offset: int = 0
    finished: bool = False

    def advance(self, c: CompletionOutput, stops: tuple[str, ...]) -> tuple[str, list[int], list]:
        """The new text, token ids and logprob entries of `c` since the last call.

        While running, text that could be the start of a stop string is held back: if the stop
        string completes, the engine cuts it from the text, and it must never have been sent.
        """
        self.finished = c.finish_reason is not None
        end = len(c.text) if self.finished else len(c.text) - _stop_prefix_len(c.text, stops)
        text = c.text[self.text_sent : end] if end > self.text_sent else ""
        self.text_sent = max(self.text_sent, end)
        token_ids = c.token_ids[self.tokens_sent :]
        entries = c.logprobs[self.tokens_sent : len(c.token_ids)] if c.logprobs is not None else []
        self.tokens_sent = len(c.token_ids)
        return text, token_ids, entries


def _stop_prefix_len(text: str, stops: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that is the beginning of a stop string."""
    longest = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:k]):
                longest = k
                break
    return longest


def _top(entry: dict[int, Logprob], token: int, k: int) -> list[tuple[int, Logprob]]:
    """The k most likely tokens of one step (the entry also holds the sampled token, whatever its rank)."""
    ranked = sorted(entry.items(), key=lambda item: item[1].rank)
    return [(t, lp) for t, lp in ranked if t != token or lp.rank <= k][:k]


def _completion_logprobs(token_ids: list[int], entries: list, k: int, offset: int) -> CompletionLogprobs:
    out = CompletionLogprobs()
    for token, entry in zip(token_ids, entries):
        chosen = entry[token]
        text = chosen.decoded_token or ""
        out.tokens.append(text)
        out.token_logprobs.append(chosen.logprob)
        top = {lp.decoded_token or "": lp.logprob for _, lp in _top(entry, token, k)}
        top.setdefault(text, chosen.logprob)  # legacy completions list the sampled token among the top
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _finish(c: CompletionOutput) -> str | None:
    if c.finish_reason is None:
        return None
    return "length" if c.finish_reason == "length" else "stop"


def _usage(outputs: list[RequestOutput], req: CompletionRequest | ChatCompletionRequest) -> Usage:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                 prompt_tokens_before_compression=req._prompt_tokens_before_compression)


def _sse(data: str) -> str:
    return f"data: {data}\n\n"


async def _finals(streams: list[RequestStream]) -> list[RequestOutput]:
    async def last(stream: RequestStream) -> RequestOutput:
        output = None
        async for output in stream:
            pass
        return output

    try:
        return list(await asyncio.gather(*(last(s) for s in streams)))
    finally:
        for stream in streams:
            stream.close()


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several streams as they come."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
        except Exception as e:  # noqa: BLE001 - handed to the reader, which raises it
            queue.put_nowait((index, e))
        queue.put_nowait((index, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


_BYTE_LEVEL_CHARS = None


def _token_bytes_function(tokenizer):
    """token id -> the token's raw bytes, for logprobs' `bytes` (a token can be part of a character)."""
    global _BYTE_LEVEL_CHARS
    if _BYTE_LEVEL_CHARS is None:
        # GPT-2 byte-level BPE writes byte b as chr(b) when printable, else as chr(256 + k).
        printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
        extra = iter(range(256, 512))
        _BYTE_LEVEL_CHARS = {chr(b) if b in printable else chr(next(extra)): b for b in range(256)}
    chars = _BYTE_LEVEL_CHARS

    @lru_cache(maxsize=65536)
    def token_bytes(token_id: int) -> list[int]:
        piece = tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return []
        if all(ch in chars for ch in piece):
            return [chars[ch] for ch in piece]
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):  # SentencePiece byte fallback
            return [int(piece[3:5], 16)]
        return list(piece.replace("\u2581", " ").encode("utf-8"))

    return token_bytes
