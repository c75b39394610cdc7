"""int8 weights: the packer round trip, the C++ kernel against an exact torch emulation, and the engine."""

import pytest
import torch
import torch.nn.functional as F
from tiny_models import assert_first_tokens_close

from nimblelm import LLM, SamplingParams
from nimblelm.errors import InvalidRequestError
from nimblelm.kernels import cpu_ops
from nimblelm.layers.linear import Linear
from nimblelm.quantization import int8
from nimblelm.quantization.int8 import Int8WeightOnly, dequantize_int8, integer_kernel_max_rows, quantize_int8


def test_int8_round_trip_is_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(48, 96) * torch.rand(48, 1) * 3
    q, s = quantize_int8(w, 32)
    assert q.dtype == torch.int8 and s.shape == (48, 3)
    assert q.abs().max() <= 127 and (q.abs().amax(-1) == 127).all()  # each row's largest value maps to 127
    step = s.repeat_interleave(32, dim=1)
    assert ((dequantize_int8(q, s) - w).abs() <= step / 2 + 1e-7).all()
    # Values already on the grid come back exactly.
    assert torch.equal(quantize_int8(dequantize_int8(q, s), 32)[0], q)


def test_int8_rejects_a_group_that_does_not_divide_the_inputs():
    with pytest.raises(InvalidRequestError, match="does not divide"):
        quantize_int8(torch.randn(4, 40), 32)


def emulate_kernel(x, q, block_scales, bias):
    """The kernel's arithmetic in torch: activations rounded to int8 per block of 32, integer dots.
    block_scales holds the weight scale of each block of 32 inputs, [n, k / 32]."""
    blocks = x.reshape(x.shape[0], -1, 32)
    dx = blocks.abs().amax(-1) / 127
    xq = torch.round(blocks / dx.clamp_min(1e-30)[..., None])
    qb = q.float().reshape(q.shape[0], -1, 32)
    dots = torch.einsum("mbk,nbk->mnb", xq.double(), qb.double())  # exact integer sums per block
    y = (dots * dx[:, None, :].double() * block_scales[None].double()).sum(-1).float()
    return y + bias if bias is not None else y


@pytest.mark.parametrize("rows", [1, 3, 32, 64])
@pytest.mark.parametrize(("n", "k", "group"), [(8, 64, 32), (37, 128, 32), (70, 256, 64)])
def test_int8_kernel_matches_its_emulation_and_stays_near_fp32(rows, n, k, group):
    ops = cpu_ops()
    assert ops is not None, "the C++ kernels did not build"
    torch.manual_seed(rows * n + k)
    x, w, bias = torch.randn(rows, k), torch.randn(n, k), torch.randn(n)
    q, s = quantize_int8(w, group)
    y = ops.int8_linear(x, q, s, bias, group)
    assert torch.allclose(y, emulate_kernel(x, q, s.repeat_interleave(group // 32, dim=1), bias), atol=1e-4, rtol=1e-5)
    # Against the float product with the same int8 weights: only the activation rounding differs,
    # under 1% of the typical output magnitude for Gaussian data.
    exact = F.linear(x, dequantize_int8(q, s), bias)
    assert (y - exact).abs().max() < 0.01 * exact.abs().mean() * 10


LIMITS_8 = (int8.integer_kernel_max_rows("int8"), int8.SLICED_SMALL_MAX_ROWS, int8.SLICED_MAX_ROWS)


@pytest.mark.parametrize("rows", [limit + extra for limit in LIMITS_8 for extra in (0, 1)])
@pytest.mark.parametrize("large", [False, True])
def test_int8_layers_take_the_kernel_then_the_sliced_float_gemm_up_to_their_row_limits(rows, large, monkeypatch,
                                                                                        record_ops, bf16_products):
    # The integer kernel rounds activations to int8 (under 1% off the float GEMM); the sliced GEMM multiplies
    # the same dequantized values in float32, in another order, up to 128 rows (512 for large layers: this
    # one counts as large when `large`); beyond, torch's GEMM on the layer dequantized whole gives the
    # reference's bits. With bfloat16 products (bf16_products: dot or amx) the sliced GEMM takes every row
    # count past the integer kernel's on bfloat16 panels, weights and activations rounded to bfloat16. The ops
    # the layer calls are recorded.
    if large:
        monkeypatch.setattr(int8, "SLICED_MIN_WEIGHTS", 0)
    called = record_ops(int8)
    torch.manual_seed(3)
    w, x = torch.randn(40, 64), torch.randn(rows, 64)
    layer = Linear(64, 40, bias=False)
    with torch.no_grad():
        layer.weight.copy_(w)
    layer.prepare(Int8WeightOnly(group_size=32))
    ref = F.linear(x, dequantize_int8(*layer.method.stored(layer).values()))  # the float path, exactly
    y = layer(x)
    integer = rows <= LIMITS_8[0]
    bf16 = not integer and 0 < bf16_products <= rows
    sliced = not integer and (bf16 or rows <= (LIMITS_8[2] if large else LIMITS_8[1]))
    assert ("int8_dequant_linear" in called) == sliced and ("int8_linear" in called) == integer
    if not integer and not sliced:
        assert torch.equal(y, ref)
    if bf16:  # the activations rounded to bfloat16 as well as the weights
        rounded = F.linear(x.bfloat16().double(), dequantize_int8(*layer.method.stored(layer).values()).bfloat16().double())
        assert torch.allclose(y.double(), rounded, rtol=1e-5, atol=1e-5) and not torch.allclose(y, ref, rtol=1e-5, atol=1e-5)
    else:
        assert torch.allclose(y, ref, rtol=1e-5, atol=1e-5) == (not integer)
    assert (y - ref).norm() < 0.01 * ref.norm()


def test_bfloat16_products_are_asked_for_only_above_the_decode_step_traces(monkeypatch):
    # A trace cannot record the query of which bfloat16 products are on (an op that returns an int): the
    # dequantizing linear asks only past the rows it takes anyway.
    from nimblelm.engine.step_capture import BUCKETS

    class Ops:
        def bf16_product_rows(self):
            raise AssertionError("asked")

    layer = Linear(64, 40, bias=False)
    assert int8.SLICED_SMALL_MAX_ROWS >= BUCKETS[-1]
    for rows in BUCKETS:
        assert int8.takes_dequant_linear(Ops(), layer, rows)


def test_int8_engine_is_smaller_and_close_to_fp32(tiny_qwen):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)
    prompts = ["Hello world", "The quick brown fox", "1 2 3 4"]
    fp32 = LLM(str(tiny_qwen), dtype="float32", max_model_len=128)
    int8 = LLM(str(tiny_qwen), dtype="float32", max_model_len=128, quantization="int8")
    assert int8.weights_nbytes < 0.75 * fp32.weights_nbytes
    ref = fp32.generate(prompts, params, use_tqdm=False)
    out = int8.generate(prompts, params, use_tqdm=False)
    # int8 rounding moves this tiny model's logits by ~0.5%; the real model is checked in test_real_models.
    assert_first_tokens_close(ref, out)
    # Batched and alone give the same tokens: the integer kernel gives each row the same bits whatever rows share
    # its call. Which kernel a step takes depends on its row count (the integer kernel up to
    # integer_kernel_max_rows, the dequantizing GEMM above, which rounds activations differently, and on AMX
    # tiles not the same bits for every row count), so the steps here stay within the integer kernel's rows.
    chunked = LLM(str(tiny_qwen), dtype="float32", max_model_len=128, quantization="int8",
                  max_num_batched_tokens=integer_kernel_max_rows("int8"), max_num_seqs=4)
    batched = chunked.generate(prompts, params, use_tqdm=False)
    alone = [chunked.generate(p, params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    assert alone == [o.outputs[0].token_ids for o in batched]


def test_unknown_quantization_is_a_clear_error(tiny_qwen):
    with pytest.raises(InvalidRequestError, match="unknown quantization 'int3'"):
        LLM(str(tiny_qwen), quantization="int3")
