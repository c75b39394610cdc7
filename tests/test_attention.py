"""Paged attention: the C++ decode kernel against SDPA over a plainly gathered cache."""

import pytest
import torch
import torch.nn.functional as F

from nimblelm.kernels import cpu_ops


def reference(q, k_cache, v_cache, tables, lens, window):
    out = []
    group = q.shape[1] // k_cache.shape[2]
    for b in range(q.shape[0]):
        k = k_cache[tables[b]].flatten(0, 1)[: lens[b]]
        v = v_cache[tables[b]].flatten(0, 1)[: lens[b]]
        if window:
            k, v = k[-window:], v[-window:]
        k = k.repeat_interleave(group, dim=1).transpose(0, 1)
        v = v.repeat_interleave(group, dim=1).transpose(0, 1)
        out.append(F.scaled_dot_product_attention(q[b][:, None], k, v)[:, 0])
    return torch.stack(out)


@pytest.mark.parametrize("window", [0, 5])
def test_paged_decode_kernel_matches_sdpa(window):
    ops = cpu_ops()
    assert ops is not None, "the C++ kernels did not build"
    torch.manual_seed(0)
    num_blocks, block_size, kv_heads, heads, dim = 12, 4, 2, 6, 16
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    tables = torch.tensor([[7, 2, 9, 0], [3, 11, 0, 0], [5, 0, 0, 0]])
    lens = torch.tensor([15, 6, 1])
    q = torch.randn(3, heads, dim)
    out = torch.empty_like(q)
    ops.paged_decode_attention(out, q, k_cache, v_cache, tables, lens, dim**-0.5, window)
    assert torch.allclose(out, reference(q, k_cache, v_cache, tables, lens, window), atol=1e-5)
