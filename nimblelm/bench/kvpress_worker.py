"""Runs in the kvpress peer's env (kvpress_peer.ensure_env), never imported by nimblelm: one request, one answer.

stdin: one JSON request, or a list of them on the same model (loaded once); stdout: the answer (a list for a
list), one JSON line prefixed with '@@' (library output may come first).
  {"op": "kept", "model", "token_ids", "method", "keep_ratio", "params"}
      -> {"kept": per layer, per KV head, the prompt positions kvpress kept, ascending}
  {"op": "generate", "model", "prompts", "method" (null: no press), "keep_ratio", "max_new_tokens", "params",
   "threads" (null: torch's default)}
      -> {"outputs": [{"token_ids", "prefill_s", "decode_s"}, ...]}
  {"op": "both", ...}: "kept"'s request and answer, and "generate"'s answer for its token_ids alone (one model load)
The model loads in float32 with sdpa attention, so SnapKV computes its window's attention itself, kvpress's
path when a layer returns no attention weights. Imports only torch, transformers, kvpress and the standard library.
"""

import contextlib
import importlib.util
import json
import sys
import time
import types

import torch


def stand_in(name: str) -> types.ModuleType:
    """An empty module whose every attribute is a function that says the package is absent."""
    module = types.ModuleType(name)

    def attribute(attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def absent(*args, **kwargs):
            raise RuntimeError(f"{name}.{attr}: {name} is not installed in the kvpress peer's env")

        return absent

    module.__getattr__ = attribute
    return module


def import_kvpress():
    """kvpress's __init__ imports every press, and two of them (DuoAttention, the expected-attention stats)
    import datasets and fire at the top, for their calibration downloads. The env leaves both out (datasets
    alone brings pyarrow and pandas, 250 MB), so stand-ins fill in while kvpress imports, and leave again."""
    added = [name for name in ("datasets", "fire") if name not in sys.modules and importlib.util.find_spec(name) is None]
    sys.modules.update({name: stand_in(name) for name in added})
    try:
        import kvpress
    finally:
        for name in added:
            del sys.modules[name]
    return kvpress


def make_press(kvpress, method: str, keep_ratio: float, params: dict):
    params = dict(params)
    if method == "snapkv":
        press = kvpress.SnapKVPress(compression_ratio=1 - keep_ratio, window_size=params.pop("window_size", 64),
                                    kernel_size=params.pop("kernel_size", 5))
    elif method == "pyramidkv":
        press = kvpress.PyramidKVPress(compression_ratio=1 - keep_ratio, window_size=params.pop("window_size", 64),
                                       kernel_size=params.pop("kernel_size", 5), beta=params.pop("beta", 20))
    elif method == "streaming":
        press = kvpress.StreamingLLMPress(compression_ratio=1 - keep_ratio, n_sink=params.pop("num_sinks", 4))
    else:
        raise ValueError(f"unknown method {method!r} (snapkv, pyramidkv, streaming)")
    if params:
        raise ValueError(f"unknown {method} parameters: {sorted(params)}")
    # kvpress leaves Gemma 3's sliding-window layers uncompressed for Gemma3ForConditionalGeneration only; for
    # the text model (Gemma3ForCausalLM) too here, as nimblelm's policies do.
    hook = press.forward_hook
    press.forward_hook = lambda module, args, kwargs, output: (
        output if getattr(module, "is_sliding", False) else hook(module, args, kwargs, output))
    return press


def kept(model, press, token_ids: list[int]) -> list[list[list[int]]]:
    """Each layer's scores are recorded as ScorerPress.compress asks for them; its selection (the top n_kept
    scores) is then taken again and checked against the keys kvpress left in the cache."""
    from transformers import DynamicCache

    seen = {}
    score = press.score

    def recorded(module, hidden_states, keys, values, attentions, kwargs):
        scores = score(module, hidden_states, keys, values, attentions, kwargs)
        seen[module.layer_idx] = (scores[0], keys[0])
        return scores

    press.score = recorded
    cache = DynamicCache()
    with torch.no_grad(), press(model):
        model.model(input_ids=torch.tensor([token_ids]), past_key_values=cache)
    out = []
    for i, layer in enumerate(cache.layers):
        stored = layer.keys[0]  # [num_kv_heads, n_kept, head_dim]
        if i not in seen:  # compression_ratio 0: compress returns the cache as it is
            if stored.shape[1] != len(token_ids):
                raise RuntimeError(f"layer {i}: kvpress compressed without scoring")
            out.append([list(range(len(token_ids)))] * stored.shape[0])
            continue
        scores, keys = seen[i]
        idx = scores.topk(stored.shape[1], dim=-1).indices
        if not torch.equal(keys.gather(1, idx[..., None].expand(-1, -1, keys.shape[-1])), stored):
            raise RuntimeError(f"layer {i}: the top scores are not the keys kvpress kept")
        out.append(idx.sort(dim=-1).values.tolist())
    return out


def generate(model, press, prompts: list[list[int]], max_new_tokens: int) -> list[dict]:
    """Greedy, as kvpress's pipeline decodes: the press on the prefill only, positions going on from the prompt's
    length whatever the cache kept, and a stop at the model's end-of-sequence tokens. The first token comes
    from the prefill's logits; decode_s times the forward passes of the rest."""
    from transformers import DynamicCache

    stop = model.generation_config.eos_token_id
    stop = set(stop if isinstance(stop, list) else [stop])
    outputs = []
    with torch.no_grad():
        for ids in prompts:
            cache = DynamicCache()
            start = time.perf_counter()
            with press(model) if press is not None else contextlib.nullcontext():
                logits = model(input_ids=torch.tensor([ids]), past_key_values=cache, logits_to_keep=1).logits
            tokens = [int(logits[0, -1].argmax())]
            prefilled = time.perf_counter()
            while len(tokens) < max_new_tokens and tokens[-1] not in stop:
                logits = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=cache,
                               position_ids=torch.tensor([[len(ids) + len(tokens) - 1]])).logits
                tokens.append(int(logits[0, -1].argmax()))
            outputs.append({"token_ids": tokens, "prefill_s": prefilled - start,
                            "decode_s": time.perf_counter() - prefilled})
    return outputs


def answer(model, kvpress, req: dict) -> dict:
    method, keep_ratio, params = req.get("method"), req.get("keep_ratio", 1.0), req.get("params", {})
    press = None if method is None else make_press(kvpress, method, keep_ratio, params)
    if req["op"] not in ("kept", "generate", "both"):
        raise ValueError(f"unknown op {req['op']!r}")
    out = {}
    if req["op"] in ("kept", "both"):
        out["kept"] = kept(model, press, req["token_ids"])
    if req["op"] in ("generate", "both"):
        prompts = req["prompts"] if req["op"] == "generate" else [req["token_ids"]]
        out["outputs"] = generate(model, press, prompts, req["max_new_tokens"])
    return out


def main() -> int:
    """One request, or a list of them on the same model (loaded once): their answers, in order."""
    req = json.load(sys.stdin)
    reqs = req if isinstance(req, list) else [req]
    if reqs[0].get("threads"):
        torch.set_num_threads(reqs[0]["threads"])
    kvpress = import_kvpress()
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()

    model = AutoModelForCausalLM.from_pretrained(reqs[0]["model"], dtype=torch.float32,
                                                 attn_implementation="sdpa").eval()
    answers = [answer(model, kvpress, r) for r in reqs]
    print("@@" + json.dumps(answers if isinstance(req, list) else answers[0]), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
