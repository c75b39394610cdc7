"""The offline API: `LLM(model=...).generate(prompts, SamplingParams(...))`, shaped like vLLM's."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

from tqdm import tqdm

from nimblelm.config import EngineConfig
from nimblelm.engine.llm_engine import LLMEngine, Prompt
from nimblelm.errors import InvalidRequestError
from nimblelm.models.registry import DEFAULT_MODEL
from nimblelm.outputs import RequestOutput
from nimblelm.prompting.compression import CompressedPrompt, PromptCompression
from nimblelm.sampling_params import SamplingParams

if TYPE_CHECKING:
    from nimblelm.prompting.scorer import Scorer

Message = dict[str, str]


class LLM:
    def __init__(self, model: str = DEFAULT_MODEL, **engine_options):
        unknown = set(engine_options) - set(EngineConfig.__dataclass_fields__)
        if unknown:
            raise InvalidRequestError(f"unknown engine option(s): {', '.join(sorted(unknown))}")
        self.llm_engine = LLMEngine(EngineConfig(model=model, **engine_options))
        self._ids = itertools.count()
        self._scorers: dict[str, Scorer] = {}

    @property
    def tokenizer(self):
        return self.llm_engine.tokenizer

    def get_tokenizer(self):
        return self.llm_engine.tokenizer

    @property
    def model_config(self):
        return self.llm_engine.model_config

    @property
    def weights_nbytes(self) -> int:
        return sum(self.llm_engine.executor.collective_rpc("weights_nbytes"))

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        prompt_compression: PromptCompression | None = None,
        output_organization: str | None = None,
        skeleton_router: str = "rule",
    ) -> list[RequestOutput]:
        """Run every prompt to completion; outputs come back in the order of the prompts. With
        prompt_compression, each text prompt is compressed first (RequestOutput.prompt_compression says how).
        With output_organization="skeleton", each prompt is a question answered by Skeleton-of-Thought where
        skeleton_router ("rule", "model" or "always") finds it suits (RequestOutput.skeleton says how)."""
        if not isinstance(prompts, (list, tuple)) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # one prompt: a string, a token-id list, a dict (or something invalid)
        prompts = list(prompts)
        compressed = self._compress(prompts, prompt_compression) if prompt_compression is not None else None
        if compressed is not None:
            prompts = [c.text for c in compressed]
        if output_organization is not None:
            return self._organized(prompts, sampling_params, output_organization, skeleton_router, compressed)
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        elif len(params) != len(prompts):
            raise InvalidRequestError(f"{len(params)} sampling params for {len(prompts)} prompts")
        engine = self.llm_engine
        ids = [str(next(self._ids)) for _ in prompts]
        try:
            for request_id, prompt, p in zip(ids, prompts, params):
                engine.add_request(request_id, prompt, p)
            outputs = self._run(ids, use_tqdm)
        finally:
            for request_id in ids:  # whatever an error left behind must not stay in the engine
                engine.abort_request(request_id)
        for output, c in zip(outputs, compressed or ()):
            output.prompt_compression = c
        return outputs

    def _organized(self, questions: list, params, organization: str, router: str,
                   compressed: list[CompressedPrompt] | None) -> list[RequestOutput]:
        from nimblelm.prompting import skeleton

        if organization != "skeleton":
            raise InvalidRequestError(f"output_organization {organization!r}: the one organization is 'skeleton'")
        if params is not None and not isinstance(params, SamplingParams):
            raise InvalidRequestError("Skeleton-of-Thought takes one SamplingParams for all its questions")
        outputs = skeleton.generate(self, questions, params or SamplingParams(), router)
        for output, c in zip(outputs, compressed or ()):
            output.prompt_compression = c
        return outputs

    def _compress(self, prompts: list, config: PromptCompression) -> list[CompressedPrompt]:
        from nimblelm.prompting import compress
        from nimblelm.prompting.scorer import SCORER_MODEL, Scorer

        if not isinstance(config, PromptCompression):
            raise InvalidRequestError("prompt_compression takes a nimblelm.prompting.PromptCompression")
        if not all(isinstance(p, str) for p in prompts):
            raise InvalidRequestError("prompt compression needs text prompts (it keeps the prompt's own text)")
        name = config.scorer or SCORER_MODEL
        if name not in self._scorers:  # the engine's own model scores in the engine itself
            self._scorers[name] = (Scorer(llm=self) if name == self.llm_engine.config.model else
                                   Scorer(name, num_threads=self.llm_engine.config.num_threads))
        return [compress(p, config, self._scorers[name]) for p in prompts]

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prompt prefix, so the next prompts are computed from their first token."""
        return self.llm_engine.reset_prefix_cache()

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = True,
        add_generation_prompt: bool = True,
    ) -> list[RequestOutput]:
        """Apply the model's chat template to one conversation or a list of them, then generate."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.apply_chat_template(c, add_generation_prompt) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def apply_chat_template(self, conversation: list[Message], add_generation_prompt: bool = True) -> dict:
        tokenizer = self.tokenizer
        if not tokenizer.chat_template:
            raise InvalidRequestError("this model has no chat template; use generate() with a plain prompt")
        if not conversation or not all(isinstance(m, dict) and "role" in m and "content" in m for m in conversation):
            raise InvalidRequestError("a conversation is a non-empty list of {'role': ..., 'content': ...} dicts")
        text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
        # The template already wrote any special tokens; encoding must not add a second BOS.
        return {"prompt": text, "prompt_token_ids": tokenizer.encode(text, add_special_tokens=False)}

    def _run(self, ids: list[str], use_tqdm: bool) -> list[RequestOutput]:
        engine = self.llm_engine
        finished: dict[str, RequestOutput] = {}
        with tqdm(total=len(ids), desc="Generating", disable=not use_tqdm) as bar:
            while engine.has_unfinished_requests():
                for output in engine.step():
                    if output.finished:
                        finished[output.request_id] = output
                        bar.update(1)
        return [finished[i] for i in ids]
