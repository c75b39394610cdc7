"""AWQ (Lin et al., 2023): protect the weights that meet large activations by scaling them up before
rounding. For each linear layer, s = mean|x|^alpha per input channel, alpha searched on a grid to
minimise the layer's output error on calibration rows, is folded exactly into the op before it
(smoothing.py); the scaled weights are then rounded to int4 with a zero point (asymmetric).
"""

from __future__ import annotations

import torch

from nimblelm.quantization.calibration import InputStats
from nimblelm.quantization.int4 import quantize_int4
from nimblelm.quantization.smoothing import ScalableInput

GRID = 20  # alpha = 0, 0.05, ..., 0.95; alpha = 0 (s = 1) is plain RTN, so the search never does worse


def output_error(x: torch.Tensor, weight: torch.Tensor, s: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean squared output error of int4 RTN of weight * s applied to x / s, against x @ weight^T."""
    q, scales, mins = quantize_int4(weight * s, group_size, symmetric=False)
    n, k = q.shape
    wq = (q.reshape(n, -1, group_size).float() * scales[..., None] + mins[..., None]).reshape(n, k) / s
    return (x @ (wq - weight).t()).pow(2).mean()


@torch.no_grad()
def search_scale(entry: ScalableInput, stats: InputStats, group_size: int) -> torch.Tensor:
    """The best scales over the alpha grid, one per producer channel."""
    x, w = stats.sample, entry.linear.weight.detach()
    act = entry.reduce(stats.abs_mean, "mean").clamp_min(1e-8)
    best, best_s = float("inf"), None
    for alpha in (i / GRID for i in range(GRID)):
        s = act.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()  # centred around 1, so the weights keep their magnitude
        err = float(output_error(x, w, entry.expand(s), group_size))
        if err < best:
            best, best_s = err, s
    return best_s
