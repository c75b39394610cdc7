"""GPTQ (Frantar et al., 2022): quantize a weight column by column, each column's rounding error
spread over the columns not yet quantized, weighted by the inverse Hessian of the layer's inputs.

H = 2 X^T X / tokens, dampened by a fraction of its mean diagonal; its inverse's upper Cholesky factor
gives the update of every later column at once. Updates inside a block of 128 columns are applied
eagerly, those to later columns once per block (lazy batch updates). With act-order, columns go in
order of decreasing H diagonal (largest inputs first); the group of each column stays its original
one, with the group's grid fixed up front from the unquantized weights.

Output is the linear methods' storage: int4 (int4.py) or int8 with group scales (int8.py).
"""

from __future__ import annotations

import torch

from nimblelm.errors import InvalidRequestError
from nimblelm.quantization.int4 import int4_params, pack_int4, quantize_to_grid
from nimblelm.quantization.int8 import int8_scales

BLOCK = 128  # a multiple of every group size, so a group never straddles two blocks
_TINY = torch.finfo(torch.float32).tiny


def _grid(groups: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, min) per row over the last dimension, for the target format."""
    if bits == 4:
        return int4_params(groups, symmetric)
    scale = int8_scales(groups)
    return scale, torch.zeros_like(scale)


def _round(w: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 4:
        return quantize_to_grid(w, scale, minimum)
    return torch.round(w / scale.clamp_min(_TINY)).clamp(-127, 127)


@torch.no_grad()
def gptq_quantize(
    weight: torch.Tensor, hessian: torch.Tensor, bits: int, group_size: int, symmetric: bool = True,
    act_order: bool = False, damp: float = 0.01,
) -> dict[str, torch.Tensor]:
    """The layer's tensors (qweight, scales[, mins]) for the weight [N, K] and its inputs' Hessian [K, K]."""
    if weight.shape[1] % group_size:
        raise InvalidRequestError(f"group size {group_size} does not divide the input dimension {weight.shape[1]}")
    w = weight.detach().float().clone()
    h = hessian.double().clone()  # the Cholesky factors are far steadier in float64, and K is small
    n, k = w.shape
    dead = h.diagonal() == 0  # inputs that never fired: their weights cannot matter
    h[dead, dead] = 1
    w[:, dead] = 0
    order = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(k)
    group_of = order // group_size  # the original group of each column in processing order
    scales, mins = torch.zeros(n, k // group_size), torch.zeros(n, k // group_size)
    if act_order:
        scales[:], mins[:] = _grid(w.reshape(n, -1, group_size), bits, symmetric)
    w, h = w[:, order], h[order][:, order]
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True).float()

    q = torch.zeros(n, k)
    for start in range(0, k, BLOCK):
        stop = min(start + BLOCK, k)
        block, errors = w[:, start:stop].clone(), torch.zeros(n, stop - start)
        hblock = hinv[start:stop, start:stop]
        for i in range(stop - start):
            col = start + i
            g = group_of[col]
            if not act_order and col % group_size == 0:
                # The group's grid from its columns as they are now, after the earlier columns' errors.
                scales[:, g], mins[:, g] = _grid(block[:, i:i + group_size], bits, symmetric)
            q[:, col] = _round(block[:, i], scales[:, g], mins[:, g], bits)
            error = (block[:, i] - (q[:, col] * scales[:, g] + mins[:, g])) / hblock[i, i]
            block[:, i:] -= error[:, None] * hblock[i, i:][None, :]
            errors[:, i] = error
        w[:, stop:] -= errors @ hinv[start:stop, stop:]

    q = q[:, torch.argsort(order)]  # back to the original column order
    if bits == 4:
        return {"qweight": pack_int4(q.to(torch.uint8)), "scales": scales, "mins": mins}
    return {"qweight": q.to(torch.int8), "scales": scales}
