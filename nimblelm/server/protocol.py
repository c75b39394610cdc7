"""The OpenAI API's request and response bodies as pydantic models, and the request -> SamplingParams step.

Requests are strict about types ("max_tokens": "5" is an error, as at OpenAI) and ignore fields they
do not know, as vLLM does, so clients that send newer or vendor fields keep working. Fields that
would change the answer but are not implemented (tools, logit_bias, suffix, ...) are refused with a
clear message rather than silently dropped. The response models are what the routes return, and
what the published OpenAPI schema shows.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr

from nimblelm.errors import InvalidRequestError
from nimblelm.prompting.compression import PromptCompression
from nimblelm.sampling_params import SamplingParams, StructuredOutputParams

MAX_N = 64  # completions per request; each is a sequence with its own KV blocks
MAX_LOGPROBS = 20


def _integral(value: Any) -> Any:
    # JSON Schema counts 2.0 as an integer, so the published schema does too; strings stay errors.
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]
TokenId = Annotated[Int, Field(ge=0)]
Text = Annotated[str, Field(min_length=1)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Request):
    include_usage: bool = False


class JsonSchemaFormat(_Request):
    name: str = "response"
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsOptions(_Request):
    """vLLM's request field `structured_outputs` (extra_body with the openai client): one of a JSON schema, any
    JSON object, a regex the whole text matches, or a choice of strings."""

    json_: dict[str, Any] | bool | None = Field(None, alias="json")
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None


class PromptCompressionOptions(_Request):
    """nimblelm's request field `prompt_compression` (extra_body with the openai client): the prompt's text
    compressed by the server's scorer model before it is served (nimblelm.prompting.PromptCompression)."""

    method: str = "llmlingua"
    rate: float | None = 0.5
    target_tokens: Int | None = None
    keep: list[str] = []
    question: str | None = None
    unit: str = "word"
    segment_tokens: Int = 100
    coarse_factor: float = 1.0
    dynamic_ratio: float | None = None
    reorder: str | None = None

    def config(self, scorer: str) -> PromptCompression:
        return PromptCompression(**{**self.model_dump(), "keep": tuple(self.keep)}, scorer=scorer)


class _SamplingRequest(_Request):
    """Fields that completions and chat share."""

    model: str | None = None  # None: the served model
    n: Int = Field(1, ge=1, le=MAX_N)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: Text | list[Text] | None = None
    seed: Int | None = Field(None, ge=0, lt=2**63)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # nimblelm's sampling fields beyond OpenAI's, named as vLLM names them.
    structured_outputs: StructuredOutputsOptions | None = None
    top_k: Int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, le=10)
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] | None = None
    prompt_compression: PromptCompressionOptions | None = None
    # Set by the server once it compressed the prompt: the served model's tokens of the prompt as sent.
    _prompt_tokens_before_compression: int | None = PrivateAttr(None)

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        if self.logit_bias:
            raise InvalidRequestError("logit_bias is not supported")
        if self.stream_options is not None and not self.stream:
            raise InvalidRequestError("stream_options is only allowed when stream is true")
        return SamplingParams(
            n=self.n,
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            min_p=self.min_p or 0.0,
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            repetition_penalty=1.0 if self.repetition_penalty is None else self.repetition_penalty,
            structured_output=self._structured_output(),
        )

    def _structured_output(self) -> StructuredOutputParams | None:
        fmt, so = self.response_format, self.structured_outputs
        if so is not None:
            if fmt is not None and fmt.type != "text":
                raise InvalidRequestError("give response_format or structured_outputs, not both")
            return StructuredOutputParams(json_schema=so.json_, json_object=so.json_object, regex=so.regex,
                                          choice=so.choice)
        if fmt is None or fmt.type == "text":
            return None
        if fmt.type == "json_object":
            return StructuredOutputParams(json_object=True)
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise InvalidRequestError("response_format of type json_schema needs json_schema.schema")
        return StructuredOutputParams(json_schema=fmt.json_schema.schema_)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_SamplingRequest):
    # A string, a list of strings, a list of token ids, or a list of token-id lists.
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    )
    max_tokens: Int | None = Field(16, ge=0)  # 0 with echo: the prompt's logprobs only (as OpenAI's legacy API)
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool = False  # the prompt before the completion, in its text and (with logprobs) its logprobs
    suffix: str | None = None
    best_of: Int | None = Field(None, ge=1, le=MAX_N)

    def prompts(self) -> list[str | list[int]]:
        if self.suffix:
            raise InvalidRequestError("suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise InvalidRequestError("best_of other than n is not supported")
        prompt = self.prompt
        if isinstance(prompt, str) or isinstance(prompt[0], int):
            return [prompt]
        return list(prompt)


class TextPart(_Request):
    type: Literal["text"]  # images and audio are not supported
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def to_template(self) -> dict[str, str]:
        content = self.content
        if not isinstance(content, str):
            content = "\n".join(part.text for part in content)
        # Chat templates know "system"; "developer" is OpenAI's newer name for it.
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Int | None = Field(None, ge=1)
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = True  # vLLM's extra: False continues the last assistant message
    # nimblelm's extras: Skeleton-of-Thought (nimblelm.prompting.skeleton) and the questions it takes.
    output_organization: Literal["skeleton"] | None = None
    skeleton_router: Literal["rule", "model", "always"] = "rule"
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None

    def conversation(self) -> list[dict[str, str]]:
        if self.tools or self.functions or self.tool_choice not in (None, "none"):
            raise InvalidRequestError("tools and function calling are not supported")
        return [m.to_template() for m in self.messages]

    def num_logprobs(self) -> int | None:
        if self.top_logprobs and not self.logprobs:
            raise InvalidRequestError("top_logprobs needs logprobs to be true")
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# -- responses ----------------------------------------------------------------------------------


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    # With prompt_compression: the prompt's tokens as the client sent it (prompt_tokens: as served).
    prompt_tokens_before_compression: int | None = Field(None, exclude_if=lambda v: v is None)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []
    top_logprobs: list[dict[str, float] | None] = []
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None
    refusal: list[TokenLogprob] | None = None


class ChatMessageOut(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    refusal: str | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ChatDelta(BaseModel):
    # Only what changed: the role in the first chunk, then content; the last chunk's delta is {}.
    role: Literal["assistant"] | None = Field(None, exclude_if=lambda v: v is None)
    content: str | None = Field(None, exclude_if=lambda v: v is None)


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "nimblelm"
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


# vLLM's tokenizer routes, which clients such as lm-evaluation-harness (tokenizer_backend=remote) use to
# count and split text with the served model's own tokenizer.


class TokenizeRequest(_Request):
    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeRequest(_Request):
    model: str | None = None
    tokens: list[TokenId]


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    model_max_length: int
    chat_template: str | None
