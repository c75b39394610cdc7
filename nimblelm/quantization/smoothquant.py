"""SmoothQuant (Xiao et al., 2022): move the activations' outlier channels into the weights before
W8A8. For each linear layer, s_j = max|x_j|^alpha / max|W_:,j|^(1 - alpha), folded exactly into the op
before it (smoothing.py); the layer then holds int8 per-output-channel weights and rounds its inputs
to int8 per token at run time (w8a8.py).
"""

from __future__ import annotations

import torch

from nimblelm.quantization.calibration import InputStats
from nimblelm.quantization.smoothing import ScalableInput

ALPHA = 0.5  # the paper's default: the difficulty split evenly between activations and weights


@torch.no_grad()
def smoothing_scale(entry: ScalableInput, stats: InputStats, alpha: float = ALPHA) -> torch.Tensor:
    """s per producer channel; channels that never fire keep s = 1."""
    act = entry.reduce(stats.abs_max, "max")
    wmax = entry.reduce(entry.linear.weight.detach().abs().amax(0), "max")
    s = act.pow(alpha) / wmax.clamp_min(1e-8).pow(1 - alpha)
    return torch.where(act > 0, s.clamp_min(1e-5), torch.ones_like(s))
