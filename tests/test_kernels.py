"""The C++ CPU kernels against torch's own ops on the same inputs."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nimblelm import kernels
from nimblelm.bench.machine import cpu_features
from nimblelm.kernels import cpu_ops
from nimblelm.layers.linear import Linear
from nimblelm.quantization import tiles


@pytest.fixture(scope="module")
def ops():
    ops = cpu_ops()
    assert ops is not None, "the C++ kernels did not build"
    return ops


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 11, 12, 13, 30, 64, 150])
@pytest.mark.parametrize(("n", "k"), [(8, 16), (13, 37), (70, 64), (129, 200), (40, 2100)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("weights", [torch.float32, torch.bfloat16, torch.float16])
def test_packed_linear_matches_f_linear(ops, rows, n, k, bias, weights):
    # One and two rows (the two-panel path), row counts around the 6-row tile (AVX2) and the 12-row one
    # (AVX-512, two panels wide) and past the 72-row pass, output sizes that leave a partial panel or an
    # odd panel count (one panel left over from the two-panel tiles), and K deeper than one slice
    # (2100 = 3 x 700) hit every tail. 16-bit panels are widened in registers: the oracle multiplies
    # by the float32 values of the 16-bit weights. (bfloat16 products: test_bf16_products_...)
    torch.manual_seed(n * k + rows)
    x, w = torch.randn(rows, k), torch.randn(n, k).to(weights)
    b = torch.randn(n) if bias else None
    panels = ops.pack_panels(w)
    assert panels.dtype == weights
    w = w.float()
    depth = -(-k // 32) * 32 if weights == torch.bfloat16 else k  # bfloat16: whole AMX tiles deep
    assert panels.shape == (-(-n // 16), depth, 16)
    products = ops.bf16_products()
    ops.set_bf16_products("off")
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.allclose(ops.packed_linear(x, panels, n, b), F.linear(x, w, b), atol=1e-3, rtol=1e-4)
    finally:
        torch.set_num_threads(before)
        ops.set_bf16_products(products)


@pytest.mark.parametrize("rows", [3, 4, 7, 8, 12, 13, 15, 16, 17, 33, 150, 300])
@pytest.mark.parametrize(("n", "k"), [(8, 16), (13, 37), (70, 64), (129, 200), (40, 2100), (48, 96)])
def test_bf16_products_multiply_bfloat16_activations_by_the_weights(ops, bf16_products, rows, n, k):
    # Row counts around the fewest the products take (4 dot products, 8 tiles), the 12-row dot tile and
    # one and two 16-row AMX tiles with their tails, two AMX row blocks (300 > 256, a prompt's rows: tiled
    # activations, and streamed outputs where N is whole panels, as 48) whose second ends in a
    # 16-row tile, and the shapes above: partial panels, an odd panel
    # count (one panel left over from the pairs), K not a multiple of the tile's 32 or of a pair. The
    # products round the activations to bfloat16 first; the products of two bfloat16 values are exact in
    # float32, so the oracle is F.linear on the rounded activations.
    torch.manual_seed(n * k + rows)
    x, w, b = torch.randn(rows, k), torch.randn(n, k).bfloat16(), torch.randn(n)
    rounding = bf16_products and rows >= bf16_products
    expected = F.linear(x.bfloat16().float() if rounding else x, w.float(), b)
    got = ops.packed_linear(x, ops.pack_panels(w), n, b)
    assert torch.allclose(got, expected, atol=1e-3, rtol=1e-4)
    if rounding:  # and rounding the activations is what the products do: float32 ones differ by far more
        assert not torch.allclose(got, F.linear(x, w.float(), b), atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize(("n", "k"), [(48, 96), (70, 64)])
def test_bf16_products_give_a_row_the_same_bits_in_any_batch(ops, bf16_products, n, k):
    # A prompt's rows (from 256) take another layout of the rounded activations than a decode step's: the same
    # products in the same order, so a row's outputs must not depend on the rows beside it.
    if not bf16_products:
        pytest.skip("no bfloat16 products on this machine")
    torch.manual_seed(n)
    x, panels = torch.randn(300, k), ops.pack_panels(torch.randn(n, k).bfloat16())
    batched = ops.packed_linear(x, panels, n, None)
    for rows in (bf16_products, 33, 255):
        assert torch.equal(ops.packed_linear(x[:rows], panels, n, None), batched[:rows])


def test_write_kv_cache_matches_index_copy(ops):
    torch.manual_seed(0)
    blocks, block_size, kv_heads, dim = 6, 4, 2, 8
    qkv = torch.randn(5, (3 + 2 * kv_heads) * dim)  # k and v are strided views into fused rows
    k = qkv[:, 3 * dim : (3 + kv_heads) * dim].view(5, kv_heads, dim)
    v = qkv[:, (3 + kv_heads) * dim :].view(5, kv_heads, dim)
    slots = torch.tensor([17, 0, 5, 23, 9])
    k_cache, v_cache = torch.zeros(blocks, block_size, kv_heads, dim), torch.zeros(blocks, block_size, kv_heads, dim)
    ops.write_kv_cache_(k_cache, v_cache, k, v, slots)
    k_ref, v_ref = torch.zeros_like(k_cache), torch.zeros_like(v_cache)
    k_ref.view(-1, kv_heads, dim).index_copy_(0, slots, k)
    v_ref.view(-1, kv_heads, dim).index_copy_(0, slots, v)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)
    with pytest.raises(RuntimeError, match="slot out of range"):
        ops.write_kv_cache_(k_cache, v_cache, k, v, torch.tensor([0, 1, 2, 3, blocks * block_size]))


@pytest.mark.parametrize("rows", [1, 5, 17, 64])
@pytest.mark.parametrize("width", [8, 37, 1536])
def test_silu_mul_matches_torch(ops, rows, width):
    # Widths below, off and on the 8-lane vector; gate values far into both tails of the exp.
    torch.manual_seed(rows * width)
    gate_up = torch.randn(rows, 2 * width) * 30
    gate, up = gate_up.split(width, dim=-1)
    assert torch.allclose(ops.silu_mul(gate_up), F.silu(gate) * up, rtol=1e-5, atol=1e-5)


def rms_norm_reference(x, w, eps):
    x64 = x.double()
    return (x64 * torch.rsqrt(x64.square().mean(-1, keepdim=True) + eps) * w.double()).float()


def rows_of_many_magnitudes(rows, width):
    """Gaussian rows scaled from 1e-4 (where eps = 1e-6 weighs on the norm) to 1e3, one of three or more
    rows all zeros."""
    x = torch.randn(rows, width) * torch.logspace(-4, 3, rows)[:, None]
    if rows >= 3:
        x[rows // 2] = 0
    return x


# Rows around rms_norm's and rope_'s grain of 16 rows per thread, widths below, off and on the 8-lane vector.
@pytest.mark.parametrize("rows", [1, 3, 17, 33])
@pytest.mark.parametrize("width", [8, 37, 576])
def test_rms_norm_and_add_rms_norm_match_torch(ops, rows, width):
    torch.manual_seed(rows * width)
    x, residual, w = rows_of_many_magnitudes(rows, width), torch.randn(rows, width), torch.randn(width)
    # A few float32 roundings (the scale, two products) from the float64 reference: rtol 2e-6.
    torch.testing.assert_close(ops.rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), rtol=2e-6, atol=0)
    # add_rms_norm_: residual += x exactly as torch adds, then x = rms_norm(residual) * w, both in place.
    added = x + residual
    ops.add_rms_norm_(x, residual, w, 1e-6)
    assert torch.equal(residual, added)
    torch.testing.assert_close(x, rms_norm_reference(added, w, 1e-6), rtol=2e-6, atol=0)


def rotate_half_reference(x, cos, sin):
    """Rotary embedding of x [tokens, heads, head_dim] in float64: cos, sin [tokens, head_dim]."""
    x64, cos, sin = x.double(), cos.double()[:, None], sin.double()[:, None]
    half = x.shape[-1] // 2
    return (x64 * cos + torch.cat([-x64[..., half:], x64[..., :half]], dim=-1) * sin).float()


@pytest.mark.parametrize("tokens", [1, 3, 17, 33])
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(9, 3, 64), (5, 1, 16), (3, 3, 6)])
def test_rope_rotates_the_q_and_k_heads_as_torch_does(ops, tokens, heads, kv_heads, dim):
    from nimblelm.layers.rotary import RotaryEmbedding

    torch.manual_seed(tokens * dim + heads)
    [(cos, sin)] = RotaryEmbedding(dim, 4096, [(10000.0, None)])(torch.randint(0, 4096, (tokens,)))
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim)
    before = qkv.clone()
    rotated = (heads + kv_heads) * dim
    ops.rope_(qkv, cos, sin, heads + kv_heads, dim)
    want = rotate_half_reference(before[:, :rotated].view(tokens, -1, dim), cos, sin).view(tokens, rotated)
    # Two products and a sum of values below 5 in float32: an absolute 1e-6.
    torch.testing.assert_close(qkv[:, :rotated], want, rtol=0, atol=1e-6)
    assert torch.equal(qkv[:, rotated:], before[:, rotated:])  # the v heads are left alone


@pytest.mark.parametrize("vocab", [1, 7, 8, 31, 33, 1000, 49152])
@pytest.mark.parametrize("rows", [1, 3, 32])
def test_greedy_tokens_are_torch_max_indices(ops, rows, vocab):
    # Vocabularies shorter than one vector, with tails after the 32-value maximum pass and the 8-value
    # scan; small integer logits tie often (the first of equal maxima wins), and -inf rows and tails
    # (grammar masks) leave index 0 or a maximum at the front.
    torch.manual_seed(rows * vocab)
    logits = torch.randint(-3, 3, (rows, vocab)).float()
    logits[0, vocab // 2:] = float("-inf")
    if rows > 1:
        logits[1] = float("-inf")
        logits[2] = torch.randn(vocab)
    assert torch.equal(ops.greedy_tokens(logits), logits.max(dim=-1).indices)
    view = torch.randn(vocab, rows).t()  # not contiguous
    assert torch.equal(ops.greedy_tokens(view), view.max(dim=-1).indices)


def test_pack_module_keeps_values_and_ties():
    from torch import nn

    from nimblelm import hugepages

    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(10, 6), nn.Linear(6, 10, bias=True))
    model[1].weight = model[0].weight  # tied, as an untied lm_head is not
    model.register_buffer("scales", torch.rand(3))
    before = {name: t.clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    hugepages.pack_module(model)
    after = dict([*model.named_parameters(), *model.named_buffers()])
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert model[1].weight is model[0].weight
    storages = {t.untyped_storage().data_ptr() for t in after.values()}
    assert len(storages) == 1  # one buffer
    assert all(t.data_ptr() % hugepages.ALIGN == 0 for t in after.values())


def test_unquantized_rows_read_back_the_packed_weight():
    # A tied embedding looks its rows up in the output layer's panels (models/decoder.py, TiedEmbedding).
    torch.manual_seed(0)
    layer = Linear(24, 40)
    with torch.no_grad():
        layer.weight.normal_()
    w = layer.weight.detach().clone()
    layer.prepare()
    assert layer.weight is None and layer.panels.shape == (3, 24, 16)
    ids = torch.tensor([[0, 15, 16], [39, 7, 32]])
    assert torch.equal(layer.method.rows(layer, ids), w[ids])


def _pack_int4_reference(q: torch.Tensor) -> torch.Tensor:
    """q [N, K] in 0..15 -> [N, K / 2] bytes: per block of 32, byte i = q[i] | q[i + 16] << 4."""
    n, k = q.shape
    blocks = q.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


@pytest.mark.parametrize("rows", [1, 2, 3, 6, 33])
@pytest.mark.parametrize(("n", "k", "group"), [(8, 64, 32), (37, 128, 64), (70, 256, 128), (13, 96, 32), (9, 384, 128),
                                            (12, 128, 64), (8, 384, 128)])
@pytest.mark.parametrize("bias", [False, True])
def test_int4_linear_matches_the_dequantized_matmul(ops, rows, n, k, group, bias):
    # K a multiple of 64 takes the two-blocks-per-load path, 96 the one-block path; 384 has an odd
    # number of 128-groups.
    torch.manual_seed(n + k + rows)
    q = torch.randint(0, 16, (n, k))
    scales, mins = torch.rand(n, k // group) * 0.1, torch.randn(n, k // group) * 0.2
    w = (q.reshape(n, k // group, group) * scales[..., None] + mins[..., None]).reshape(n, k)
    x = torch.randn(rows, k)
    b = torch.randn(n) if bias else None
    got = ops.int4_linear(x, _pack_int4_reference(q), scales, mins, b, group)
    # The kernel rounds activations to int8 per block of 32 (as llama.cpp does); on the same rounded
    # activations the float product agrees to float rounding.
    blocks = x.reshape(rows, k // 32, 32)
    amax = blocks.abs().amax(-1, keepdim=True)
    x_rounded = (torch.round(blocks * (127 / amax)) * (amax / 127)).reshape(rows, k)
    want = F.linear(x_rounded, w, b)
    assert torch.allclose(got, want, atol=1e-4 * want.abs().max().item(), rtol=1e-4)
    assert (got - F.linear(x, w, b)).norm() / want.norm() < 0.02
    # Symmetric weights without their minimums: the kernel takes them as -8 * scales (summed in another
    # order: to float rounding).
    packed = _pack_int4_reference(q)
    symmetric = ops.int4_linear(x, packed, scales, None, b, group)
    assert torch.allclose(symmetric, ops.int4_linear(x, packed, scales, -8 * scales, b, group), rtol=1e-5,
                          atol=1e-5 * symmetric.abs().max().item())
    # Each row's outputs are the same bits whatever rows share its call (a verifying step's rows are decoded
    # as one-row steps would be), and in row tiles (where the shape allows) the same sums come out too.
    for m in range(rows):
        assert torch.equal(ops.int4_linear(x[m : m + 1], packed, scales, mins, b, group), got[m : m + 1])
    plain = {"qweight": packed, "scales": scales, "mins": mins}
    if tiles.tileable(packed):
        t = tiles.tile(plain)
        assert t["qweight"].shape == (n // 4, 2 * k)
        assert torch.equal(ops.int4_linear(x, t["qweight"], t["scales"], t["mins"], b, group), got)
        t = tiles.tile(plain | {"mins": None})
        assert torch.equal(ops.int4_linear(x, t["qweight"], t["scales"], None, b, group), symmetric)
    else:
        assert tiles.tile(plain) is plain


@pytest.mark.parametrize("rows", [1, 13, 33, 100, 600])
@pytest.mark.parametrize(("n", "k"), [(5, 64), (40, 96), (140, 1056)])
@pytest.mark.parametrize("bias", [False, True])
def test_dequant_linears_multiply_the_dequantized_weights(ops, bf16_products, rows, n, k, bias):
    # Row counts within one panel, across panels and past the 512-row pass (600: two passes); output sizes
    # that leave a partial row block (40 and 140 in row tiles too); K within one 256-channel slice and over
    # four (1056). In rows and in row tiles, int8 with groups of 16 and 32, int4 with and without minimums.
    # Without bfloat16 products: float32 arithmetic on the values the dequantize kernels give, so the oracle
    # is F.linear on those, to float rounding. Where the products serve the rows (dot, amx), the weights are
    # made into bfloat16 panels a slice of 512 channels at a time: the oracle is packed_linear on those
    # values rounded to bfloat16 and packed whole, bit for bit within one slice (the same sums in the same
    # order), to float rounding over several.
    torch.manual_seed(rows + n + k)
    x, b = torch.randn(rows, k), torch.randn(n) if bias else None
    products = 0 < bf16_products <= rows

    def check(got, w):
        if products:
            want = ops.packed_linear(x, ops.pack_panels(w.bfloat16()), n, b)
            if k <= 512:
                assert torch.equal(got, want)
            assert not torch.allclose(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5 * want.abs().max().item())
        else:
            want = F.linear(x, w, b)
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())

    for group in (16, 32):
        q, scales = torch.randint(-127, 128, (n, k), dtype=torch.int8), torch.rand(n, k // group) * 0.1
        for t in ({"qweight": q, "scales": scales}, tiles.tile({"qweight": q, "scales": scales})):
            check(ops.int8_dequant_linear(x, t["qweight"], t["scales"], b, group),
                  ops.int8_dequantize(t["qweight"], t["scales"], k, group))
    q = _pack_int4_reference(torch.randint(0, 16, (n, k)))
    scales, mins = torch.rand(n, k // 32) * 0.1, torch.randn(n, k // 32) * 0.2
    for m in (mins, None):
        for t in ({"qweight": q, "scales": scales, "mins": m}, tiles.tile({"qweight": q, "scales": scales, "mins": m})):
            check(ops.int4_dequant_linear(x, t["qweight"], t["scales"], t["mins"], b, 32),
                  ops.int4_dequantize(t["qweight"], t["scales"], t["mins"], k, 32))


@pytest.mark.parametrize("rows", [1, 5, 33, 200])
@pytest.mark.parametrize(("n", "k"), [(12, 128), (13, 96)])
def test_float16_scales_give_the_bits_of_the_same_values_in_float32(ops, bf16_products, rows, n, k):
    # Layers keep their scales (and int4 minimums) in float16 where those are float16 values; every kernel
    # widens them exactly, so its output is the float32 scales' to the bit: the integer kernels, the
    # dequantizing linear (bfloat16 panels past bf16_products' rows) and the dequantize ops, in rows and tiles,
    # int8 groups of 16 / 32, int4 with and without minimums, K with pairs of blocks (128) and without (96).
    torch.manual_seed(rows + n + k)
    x = torch.randn(rows, k)

    def half_values(shape):
        return (torch.randn(shape) * 0.05).half().float()

    def same_bits(run, plain):
        wide = tiles.tile(plain)  # the plain tensors where the shape does not tile
        half = {key: t if key == "qweight" or t is None else t.half() for key, t in wide.items()}
        assert torch.equal(run(**half), run(**wide))

    for group in (16, 32):
        plain = {"qweight": torch.randint(-127, 128, (n, k), dtype=torch.int8), "scales": half_values((n, k // group))}
        same_bits(lambda qweight, scales, g=group: ops.int8_linear(x, qweight, scales, None, g), plain)
        same_bits(lambda qweight, scales, g=group: ops.int8_dequant_linear(x, qweight, scales, None, g), plain)
        same_bits(lambda qweight, scales, g=group: ops.int8_dequantize(qweight, scales, k, g), plain)
    for mins in (half_values((n, k // 32)), None):
        plain = {"qweight": _pack_int4_reference(torch.randint(0, 16, (n, k))), "scales": half_values((n, k // 32)),
                 "mins": mins}
        same_bits(lambda qweight, scales, mins: ops.int4_linear(x, qweight, scales, mins, None, 32), plain)
        same_bits(lambda qweight, scales, mins: ops.int4_dequant_linear(x, qweight, scales, mins, None, 32), plain)
        same_bits(lambda qweight, scales, mins: ops.int4_dequantize(qweight, scales, mins, k, 32), plain)


@pytest.mark.parametrize("rows", [1, 5, 33, 200])
@pytest.mark.parametrize(("n", "k"), [(12, 512), (13, 256)])
def test_k_quant_scales_give_the_bits_of_their_products_in_float32(ops, bf16_products, rows, n, k):
    # GGUF's K-quants keep int8 sub-scales and a float16 factor per 256 weights (Q6_K: int8 groups of 16, Q4_K: int4
    # groups of 32 with minimums); the kernels multiply the two where they read them, exactly, so every kernel's
    # output is the float32 products' to the bit, in rows (13 rows do not tile) and tiles, on the same ops as above.
    from nimblelm.quantization.int8 import plain_scales

    torch.manual_seed(rows + n + k)
    x = torch.randn(rows, k)

    def two_level(group):
        return torch.randint(-64, 64, (n, k // group), dtype=torch.int8), (torch.randn(n, k // 256) * 1e-3).half()

    def same_bits(run, factored):
        tiled = tiles.tile(factored)
        assert torch.equal(run(**tiled), run(**tiles.tile(plain_scales(factored)))), run

    scales, factors = two_level(16)
    q6 = {"qweight": torch.randint(-32, 32, (n, k), dtype=torch.int8), "scales": scales, "scale_factors": factors}
    same_bits(lambda qweight, scales, scale_factors=None: ops.int8_linear(x, qweight, scales, None, 16, scale_factors), q6)
    same_bits(lambda qweight, scales, scale_factors=None: ops.int8_dequant_linear(x, qweight, scales, None, 16,
                                                                                  scale_factors), q6)
    same_bits(lambda qweight, scales, scale_factors=None: ops.int8_dequantize(qweight, scales, k, 16, scale_factors), q6)
    (scales, scale_factors), (mins, min_factors) = two_level(32), two_level(32)
    q4 = {"qweight": _pack_int4_reference(torch.randint(0, 16, (n, k))), "scales": scales.abs(), "mins": mins,
          "scale_factors": scale_factors, "min_factors": min_factors}
    same_bits(lambda qweight, scales, mins, scale_factors=None, min_factors=None: ops.int4_linear(
        x, qweight, scales, mins, None, 32, scale_factors, min_factors), q4)
    same_bits(lambda qweight, scales, mins, scale_factors=None, min_factors=None: ops.int4_dequant_linear(
        x, qweight, scales, mins, None, 32, scale_factors, min_factors), q4)
    same_bits(lambda qweight, scales, mins, scale_factors=None, min_factors=None: ops.int4_dequantize(
        qweight, scales, mins, k, 32, scale_factors, min_factors), q4)


@pytest.mark.parametrize("rows", [1, 5, 33, 200])
@pytest.mark.parametrize(("n", "k", "group"), [(12, 512, 16), (8, 192, 32), (16, 256, 64)])
def test_six_bit_tiles_give_the_bits_of_their_int8_tiles(ops, bf16_products, rows, n, k, group):
    # Tiles of int8 values in [-32, 31] (GGUF's Q6_K) are kept in 6 bits a value; every kernel reads the values
    # of the 8-bit tiles (the 512-bit pair kernels unsigned, with the activations' sums subtracted; the others
    # expanded), so its output is the 8-bit tiles' to the bit, with K-quant scales (groups of 16) and float16 ones.
    torch.manual_seed(rows + n + k)
    x = torch.randn(rows, k)
    q = torch.randint(-32, 32, (n, k), dtype=torch.int8)
    q[0, :4] = torch.tensor([-32, 31, 0, -1])
    if group == 16:
        scales = {"scales": torch.randint(-64, 64, (n, k // 16), dtype=torch.int8),
                  "scale_factors": (torch.randn(n, k // 256) * 1e-3).half()}
    else:
        scales = {"scales": (torch.rand(n, k // group) * 0.05).half(), "scale_factors": None}
    eight = tiles.tile({"qweight": q, **scales})
    six = tiles.six_bit(eight["qweight"])
    assert six.dtype == torch.uint8 and six.shape == (n // 4, 3 * k)
    assert torch.equal(tiles.eight_bit(six), eight["qweight"])
    s, f = eight["scales"], eight["scale_factors"]

    def outputs(w):
        return (ops.int8_linear(x, w, s, None, group, f), ops.int8_dequant_linear(x, w, s, None, group, f),
                ops.int8_dequantize(w, s, k, group, f))

    assert all(torch.equal(a, b) for a, b in zip(outputs(six), outputs(eight["qweight"])))


def test_six_bit_tiles_take_only_values_that_fit():
    q = torch.randint(-32, 32, (4, 256), dtype=torch.int8)
    assert tiles.six_bit(q) is not None
    for outside in (32, -33):
        q[3, 100] = outside
        assert tiles.six_bit(q) is None
    assert tiles.six_bit(torch.zeros(4, 128, dtype=torch.int8)) is None  # K = 32: no whole chunk of 256 bytes


def test_scales_of_another_type_are_refused(ops):
    q, x = _pack_int4_reference(torch.randint(0, 16, (8, 64))), torch.randn(2, 64)
    scales = torch.rand(8, 2)
    with pytest.raises(RuntimeError, match="both of one type"):
        ops.int4_linear(x, q, scales.half(), scales, None, 32)
    with pytest.raises(RuntimeError, match="float32 or float16"):
        ops.int8_linear(x, torch.zeros(8, 64, dtype=torch.int8), scales.bfloat16(), None, 32)
    q8, x8 = torch.zeros(8, 512, dtype=torch.int8), torch.randn(2, 512)
    with pytest.raises(RuntimeError, match="need their float16 factors"):
        ops.int8_linear(x8, q8, torch.ones(8, 16, dtype=torch.int8), None, 32)
    with pytest.raises(RuntimeError, match="factors go with int8 scales only"):
        ops.int8_linear(x8, q8, torch.ones(8, 16), None, 32, torch.ones(8, 2).half())
    with pytest.raises(RuntimeError, match="power of two"):  # 16 groups a row, a factor each
        ops.int8_linear(x8, q8, torch.ones(8, 16, dtype=torch.int8), None, 32, torch.ones(8, 16).half())


# Pairs of blocks in tiles (AVX-512: the 512-bit kernel, rows: the 256-bit one) with groups of 32, 64 and 96 (a
# pair across two groups); 5 activation rows: a call of four and one of one.
@pytest.mark.parametrize(("n", "k", "group"), [(8, 64, 16), (12, 96, 32), (40, 128, 64), (6, 64, 32), (16, 128, 32),
                                            (8, 192, 96)])
def test_int8_linear_in_row_tiles_gives_the_sums_of_rows(ops, n, k, group):
    torch.manual_seed(n * k)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scales, x, b = torch.rand(n, k // group) * 0.1, torch.randn(5, k), torch.randn(n)
    plain = ops.int8_linear(x, q, scales, b, group)
    t = tiles.tile({"qweight": q, "scales": scales})
    assert tiles.tileable(q) == (n % 4 == 0) and t["qweight"].shape == ((n // 4, 4 * k) if n % 4 == 0 else (n, k))
    assert torch.equal(ops.int8_linear(x, t["qweight"], t["scales"], b, group), plain)
    with pytest.raises(RuntimeError, match="tiled weight"):
        ops.int8_linear(x, q.reshape(n // 2, 2 * k), scales, b, group)


# Rows 17 and 33 split across threads; 13 and 37 outputs leave one to three rows after the last tile of
# four (the scalar path), 12 and 40 fill tiles, kept in rows and in row tiles.
@pytest.mark.parametrize("rows", [1, 3, 17, 33])
@pytest.mark.parametrize(("n", "k"), [(13, 64), (37, 96), (12, 128), (40, 96)])
@pytest.mark.parametrize("bias", [False, True])
def test_w8a8_linear_matches_the_integer_matmul(ops, rows, n, k, bias):
    torch.manual_seed(rows * n + k)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    scales, x = torch.rand(n, 1) * 0.01, torch.randn(rows, k) * torch.logspace(-2, 2, rows)[:, None]
    b = torch.randn(n) if bias else None
    got = ops.w8a8_linear(x, q, scales, b)
    # The kernel rounds each activation row to int8 with the float32 arithmetic below, then sums exact
    # integer products, scaled in float32 per block of 32: relative 1e-5 of the outputs' scale.
    amax = x.abs().amax(-1, keepdim=True)
    xq = torch.round(x * (127 / amax))
    dots = xq.double() @ q.double().t()
    want = (dots * (amax / 127).double() * scales.double().t()).float()
    want = want + b if bias else want
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    if tiles.tileable(q):
        t = tiles.tile({"qweight": q, "scales": scales})
        assert torch.equal(ops.w8a8_linear(x, t["qweight"], t["scales"], b), got)


def test_row_tiles_round_trip_and_give_rows_back():
    layer = Linear(128, 12)  # int4: 64 bytes a row
    plain = {"qweight": torch.randint(0, 256, (12, 64), dtype=torch.uint8), "scales": torch.randn(12, 4),
             "mins": None}
    for key, t in tiles.tile(plain).items():
        layer.register_buffer(key, t)
    assert tiles.is_tiled(layer) and layer.qweight.shape == (3, 256) and layer.scales.shape == (3, 16)
    # Unit 1 of row 6 (row 2 of tile 1) is at bytes (4 * 1 + 2) * 32 of the tile's row; its group 3 at 4 * 3 + 2.
    assert torch.equal(layer.qweight[1, 192:224], plain["qweight"][6, 32:64])
    assert layer.scales[1, 14] == plain["scales"][6, 3]
    for key in ("qweight", "scales"):
        assert torch.equal(tiles.untile(layer, key), plain[key])
        ids = torch.tensor([11, 0, 6, 6])
        assert torch.equal(tiles.untile(layer, key, ids), plain[key][ids])
    assert tiles.untile(layer, "mins") is None


def test_the_build_name_hashes_every_source_and_header_and_the_flags(tmp_path):
    for name in ("ops.cpp", "ops.h", "notes.txt"):
        (tmp_path / name).write_text("one")
    first = kernels.build_name(tmp_path)
    (tmp_path / "notes.txt").write_text("two")
    assert kernels.build_name(tmp_path) == first  # not a source
    (tmp_path / "ops.h").write_text("two")
    second = kernels.build_name(tmp_path)
    assert second != first
    (tmp_path / "more.cpp").write_text("")
    assert kernels.build_name(tmp_path) != second
    assert kernels.build_name(tmp_path, ["-mno-avx"]) != kernels.build_name(tmp_path)


def test_a_stale_build_lock_is_removed_and_a_fresh_one_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "some_ops" / "lock"
    lock.parent.mkdir()
    lock.touch()
    kernels._drop_stale_lock("some_ops")  # a build may be running: wait for it
    assert lock.exists()
    old = time.time() - kernels.STALE_LOCK_S - 1
    os.utime(lock, (old, old))
    with pytest.warns(UserWarning, match="interrupted kernel build"):
        kernels._drop_stale_lock("some_ops")
    assert not lock.exists()


def test_the_build_is_the_variant_the_cpu_and_the_cap_allow(ops):
    isa = kernels.kernel_isa_cap()
    features = set(cpu_features())
    widest = "AVX-512" if "avx512f" in features else "AVX2" if {"avx2", "fma"} <= features else "scalar"
    expected = {"native": widest, "avx512": widest, "avx2": "AVX2", "scalar": "scalar"}[isa]
    assert ops.simd().startswith(expected)
    vnni = "avx_vnni" in features or (isa in ("native", "avx512") and "avx512_vnni" in features)
    assert ("VNNI" in ops.simd()) == (vnni and expected != "scalar")
    # bfloat16 products only of a kind the CPU has and the cap allows (which one: choose_bf16_products)
    offered = {"off"}
    if isa in ("native", "avx512") and "avx512_bf16" in features:
        offered.add("dot")
    if isa == "native" and "amx_bf16" in features:
        offered.add("amx")
    assert ops.bf16_products() in offered
    assert kernels.kernels_in_use().startswith(f"C++ kernels, {expected}")


VARIANT_TESTS = ["test_kernels.py", "test_attention.py", "test_half_weights.py", "test_quant_methods.py",
                 "test_kv_lowbit.py::test_greedy_and_prompt_logprobs_match_the_oracle"]


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_the_narrower_variants_pass_the_kernel_tests(isa):
    """The kernels built as for a CPU without AVX-512 (and AMX), or without AVX at all, against the same
    oracles: each variant runs on some CPU the project meets, and this one can run them all. The tiny-model
    tests only: the real-model ones among them (GPTQ and AWQ on SmolLM2's layers) test no kernel."""
    if isa == "avx2" and not {"avx2", "fma"} <= set(cpu_features()):
        pytest.skip("this CPU has no AVX2 with FMA")
    if os.environ.get("NIMBLELM_KERNEL_ISA", "native") != "native":
        pytest.skip("already running a narrower variant")
    here = Path(__file__).parent
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not integration",
                          *VARIANT_TESTS],
                         cwd=here, env=os.environ | {"NIMBLELM_KERNEL_ISA": isa}, capture_output=True, text=True,
                         timeout=1200, check=False)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in run.stdout.splitlines()[-1]
