"""Quality checks shared by the techniques that may change outputs (quantization, KV policies, ...).

`nimblelm eval ppl`: perplexity on a fixed, seeded, recorded text set (see nimblelm.eval.ppl).
"""

from nimblelm.eval.ppl import PerplexityResult, load_text_set, perplexity, windows

__all__ = ["PerplexityResult", "load_text_set", "perplexity", "windows"]
