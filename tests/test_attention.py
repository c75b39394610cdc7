"""The C++ attention kernels (paged decode, prefill) against SDPA over the same keys and values."""

import pytest
import torch
import torch.nn.functional as F

from nimblelm.kernels import cpu_ops
from nimblelm.layers.attention import dequantize_kv, quantize_kv


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


def random_paged_cache(seed, dim, num_blocks=200, block_size=4, kv_heads=2, heads=6):
    """Random K/V pages and queries; four sequences on scattered pages, as a long-running cache has them."""
    torch.manual_seed(seed)
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    lens = torch.tensor([15, 6, 1, 700])
    tables = torch.zeros(4, 175, dtype=torch.long)
    free = torch.randperm(num_blocks).tolist()
    for b, n in enumerate(lens.tolist()):
        for j in range((n + block_size - 1) // block_size):
            tables[b, j] = free.pop()
    return torch.randn(4, heads, dim), k_cache, v_cache, tables, lens


def int8_decode(ops, q, k_cache, v_cache, tables, lens, window):
    """The int8 kernel over k_cache, v_cache quantized; also returns the dequantized caches it saw."""
    (kq, ks), (vq, vs) = quantize_kv(k_cache), quantize_kv(v_cache)
    out = torch.empty_like(q)
    ops.paged_decode_attention_int8(out, q, kq, vq, ks, vs, tables, lens, q.shape[-1] ** -0.5, window)
    return out, dequantize_kv(kq, ks, torch.float32), dequantize_kv(vq, vs, torch.float32)


@pytest.mark.parametrize("kv", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("window", [0, 5, 300])
@pytest.mark.parametrize("dim", [16, 64, 72, 128])
@pytest.mark.parametrize("only_longest", [False, True])
def test_paged_decode_kernel_matches_sdpa(window, dim, kv, only_longest):
    # Head sizes with and without the 8-key and 64-value vector paths; contexts over the kernel's 256-position
    # chunk (split and merged softmax), shorter than one chunk, of one token; one long sequence alone, which
    # the kernel cuts into shorter chunks to give every thread work; windows inside one chunk and across
    # chunks. The float16 and int8 kernels' oracle is SDPA over the cache they read, widened to float32.
    # A bfloat16 cache on the float path here; its bfloat16 products are tested below.
    ops = cpu_ops()
    assert ops is not None, "the C++ kernels did not build"
    q, k_cache, v_cache, tables, lens = random_paged_cache(dim + window, dim)
    if only_longest:
        q, tables, lens = q[3:], tables[3:], lens[3:]
    before = ops.bf16_products()
    ops.set_bf16_products("off")
    try:
        if kv == "int8":
            out, k_cache, v_cache = int8_decode(ops, q, k_cache, v_cache, tables, lens, window)
        else:
            k_cache, v_cache = k_cache.to(getattr(torch, kv)), v_cache.to(getattr(torch, kv))
            out = torch.empty_like(q)
            ops.paged_decode_attention(out, q, k_cache, v_cache, tables, lens, dim**-0.5, window)
            k_cache, v_cache = k_cache.float(), v_cache.float()
    finally:
        ops.set_bf16_products(before)
    assert torch.allclose(out, reference(q, k_cache, v_cache, tables, lens, window), atol=1e-5)


@pytest.mark.parametrize("ranked", [False, True], ids=["region0", "ranked"])
@pytest.mark.parametrize("kv", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize("dim", [16, 64, 72])
def test_paged_decode_received_adds_each_rows_softmax_weights_at_its_keys_slots(dim, kv, ranked):
    """H2O's pass: per row and KV head, the softmax weights over the row's keys summed over the head's query
    heads, added to what every slot had received (a slot no row reads keeps its own); ranked, into the region
    of the row's draft rank."""
    ops = cpu_ops()
    q, k_cache, _, tables, lens = random_paged_cache(dim, dim)
    blocks, block_size, kv_heads, _ = k_cache.shape
    regions = torch.rand(3, blocks, block_size, kv_heads)
    ranks = torch.randint(0, 3, (len(lens),)) if ranked else torch.zeros(len(lens), dtype=torch.long)
    received = regions if ranked else regions[0]
    expected = regions.clone()
    scales = None
    if kv == "int8":
        k_cache, scales = quantize_kv(k_cache)
        keys = dequantize_kv(k_cache, scales, torch.float32)
    else:
        k_cache = k_cache.to(getattr(torch, kv))
        keys = k_cache.float()
    group = q.shape[1] // kv_heads
    for b, n in enumerate(lens.tolist()):
        slots = (tables[b][:, None] * block_size + torch.arange(block_size)).flatten()[:n]
        k = keys.flatten(0, 1)[slots]  # [n, kv_heads, dim]
        logits = torch.einsum("hgd,nhd->hgn", q[b].view(kv_heads, group, dim), k) * dim**-0.5
        expected[ranks[b]].view(-1, kv_heads)[slots] += logits.softmax(-1).sum(1).T
    ops.paged_decode_received_(received, q, k_cache, scales, tables, lens, dim**-0.5, ranks if ranked else None)
    assert torch.allclose(regions, expected, atol=1e-5)


@pytest.mark.parametrize(("dim", "block_size", "heads"), [(64, 16, 6), (32, 16, 8), (128, 16, 32), (64, 8, 6),
                                                    (72, 16, 6), (64, 16, 34), (64, 4, 14)])
@pytest.mark.parametrize("window", [0, 5])
def test_a_bfloat16_cache_decodes_on_each_product_path(bf16_products, dim, block_size, heads, window):
    """A bfloat16 cache is widened to float, as float16's, except where bfloat16 products are on and the head size
    is a multiple of 32: AMX tiles score 16-key blocks (at most 16 query heads a KV head) and dot products score
    any page, both from the query (softmax scale folded in) rounded to bfloat16, the oracle's query here. Dot
    products also weigh the values by the softmax weights rounded to bfloat16: each weight moves by at most 2^-9
    of itself, so each output by at most 2^-9 of the largest value it averages. Windows start pages inside a block,
    and pages of odd lengths pair their last value with nothing."""
    ops = cpu_ops()
    q, k_cache, v_cache, tables, lens = random_paged_cache(dim + block_size, dim, block_size=block_size, heads=heads)
    k_cache, v_cache = k_cache.bfloat16(), v_cache.bfloat16()
    out = torch.empty_like(q)
    ops.paged_decode_attention(out, q, k_cache, v_cache, tables, lens, dim**-0.5, window)
    products = ops.bf16_products() if dim % 32 == 0 else "off"
    tiles = products == "amx" and block_size == 16 and heads // 2 <= 16
    rounded = tiles or products == "dot"
    scale = dim**-0.5
    seen = (q * scale).bfloat16().float() / scale if rounded else q
    k_cache, v_cache = k_cache.float(), v_cache.float()
    atol = 2**-9 * v_cache.abs().max().item() + 1e-5 if products == "dot" else 1e-5
    assert torch.allclose(out, reference(seen, k_cache, v_cache, tables, lens, window), atol=atol)
    if rounded:  # the rounding shows: the products did multiply
        assert not torch.allclose(out, reference(q, k_cache, v_cache, tables, lens, window), atol=1e-5)


def shared_prefix_cache(seed, dim, block_size, heads=9, kv_heads=3):
    """Nineteen sequences: eleven behind one 600-token prefix (as many rows share a system prompt), three
    behind a 300-token one, five alone; contexts from one token past the prefix to several chunks past it,
    one ending on a chunk boundary."""
    torch.manual_seed(seed)
    num_blocks = 16000 // block_size
    k_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, dim)
    free = torch.randperm(num_blocks).tolist()
    prefixes = {n: [free.pop() for _ in range(n // block_size)] for n in (600, 300)}
    groups = [600] * 11 + [300] * 3 + [0] * 5
    lens = [601, 700, 1024, 655, 612, 900, 601, 640, 777, 1000, 603, 301, 512, 350, 9, 1, 300, 768, 256]
    tables = torch.zeros(len(lens), -(-max(lens) // block_size), dtype=torch.long)
    for b, (shared, n) in enumerate(zip(groups, lens)):
        blocks = prefixes.get(shared, [])
        blocks = blocks + [free.pop() for _ in range(-(-n // block_size) - len(blocks))]
        tables[b, : len(blocks)] = torch.tensor(blocks)
    return torch.randn(len(lens), heads, dim), k_cache, v_cache, tables, torch.tensor(lens)


@pytest.mark.parametrize("kv", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize(("dim", "block_size"), [(64, 16), (32, 4), (128, 8), (64, 12)])
def test_paged_decode_kernel_over_shared_prefixes_matches_sdpa(kv, dim, block_size):
    """Rows whose tables share blocks attend to them together (one small GEMM per shared chunk). A bfloat16
    cache on the float path: its tile scores round the query (above)."""
    ops = cpu_ops()
    q, k_cache, v_cache, tables, lens = shared_prefix_cache(dim + block_size, dim, block_size)
    before = ops.bf16_products()
    ops.set_bf16_products("off")
    try:
        if kv == "int8":
            out, k_cache, v_cache = int8_decode(ops, q, k_cache, v_cache, tables, lens, 0)
        else:
            k_cache, v_cache = k_cache.to(getattr(torch, kv)), v_cache.to(getattr(torch, kv))
            out = torch.empty_like(q)
            ops.paged_decode_attention(out, q, k_cache, v_cache, tables, lens, dim**-0.5, 0)
            k_cache, v_cache = k_cache.float(), v_cache.float()
    finally:
        ops.set_bf16_products(before)
    assert torch.allclose(out, reference(q, k_cache, v_cache, tables, lens, 0), atol=1e-5)


def prefill_inputs(t, c, heads, kv_heads, dim):
    """The kernels, and t queries over c keys and values; q's rows are strided, as views of the fused qkv."""
    ops = cpu_ops()
    assert ops is not None, "the C++ kernels did not build"
    torch.manual_seed(t * c + dim)
    qkv = torch.randn(t, (heads + 2 * kv_heads) * dim)
    q = qkv[:, : heads * dim].view(t, heads, dim)
    return ops, q, torch.randn(c, kv_heads, dim), torch.randn(c, kv_heads, dim)


def prefill_reference(q, k, v, window):
    t, c = q.shape[0], k.shape[0]
    q_pos, k_pos = torch.arange(c - t, c)[:, None], torch.arange(c)[None]
    mask = k_pos <= q_pos
    if window:
        mask &= k_pos > q_pos - window
    o = F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in (q, k, v)), attn_mask=mask, enable_gqa=True)
    return o[0].transpose(0, 1)


@pytest.mark.parametrize(("t", "c", "heads", "kv_heads", "dim", "window"), [
    (1, 1, 2, 1, 16, 0), (5, 5, 4, 2, 32, 0), (37, 37, 9, 3, 64, 0), (100, 100, 4, 4, 64, 7),
    (50, 130, 9, 3, 64, 0), (70, 300, 6, 2, 128, 40), (200, 200, 2, 1, 48, 0), (97, 97, 3, 1, 16, 96),
])
def test_prefill_attention_kernel_matches_sdpa(t, c, heads, kv_heads, dim, window):
    # Whole prompts and later chunks of one (c > t: the queries are the last t positions), GQA and plain
    # multi-head, head sizes of one to eight 16-wide panels, query blocks of one row and several 48-row
    # blocks, windows inside a block and across blocks. q's rows are strided, as views of the fused qkv.
    ops, q, k, v = prefill_inputs(t, c, heads, kv_heads, dim)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    ops.prefill_attention(out, q, k, v, dim**-0.5, window)
    torch.testing.assert_close(out, prefill_reference(q, k, v, window), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("t", "c", "heads", "kv_heads", "dim"), [
    (1, 1, 2, 1, 16), (37, 37, 9, 3, 64), (50, 130, 9, 3, 64), (100, 300, 4, 4, 32), (200, 200, 6, 2, 64),
])
def test_prefill_attention_adds_each_rows_weights_to_what_its_keys_received(t, c, heads, kv_heads, dim):
    """H2O's sums: every row's softmax weights over its keys, summed over the rows and each KV head's query heads,
    added to what `received` held."""
    ops, q, k, v = prefill_inputs(t, c, heads, kv_heads, dim)
    before = torch.rand(kv_heads, c)
    received = before.clone()
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    ops.prefill_attention(out, q, k, v, dim**-0.5, 0, received)
    torch.testing.assert_close(out, prefill_reference(q, k, v, 0), rtol=1e-4, atol=1e-5)
    q_pos, k_pos = torch.arange(c - t, c)[:, None], torch.arange(c)[None]
    logits = torch.einsum("thd,chd->htc", q, k.repeat_interleave(heads // kv_heads, 1)) * dim**-0.5
    weights = logits.masked_fill(k_pos > q_pos, float("-inf")).softmax(-1)  # [heads, t, c]
    expected = before + weights.view(kv_heads, -1, t, c).sum((1, 2))
    torch.testing.assert_close(received, expected, rtol=1e-4, atol=1e-5)

def paged_prefill(ops, kv, heads, kv_heads, dim, window):
    """A step's prompt chunks in one call: whole prompts (c == t) and later chunks (c > t), of one row and of
    several 48-row blocks, on scattered pages of 4 entries, the rows one after another in q. Returns the kernel's
    output and each chunk's queries, keys and values as the cache holds them, widened to float32 (int8 times its
    scales)."""
    torch.manual_seed(dim + window)
    chunks = [(5, 5), (1, 9), (60, 60), (30, 130), (1, 1), (100, 101)]  # (t, c)
    block_size, num_blocks = 4, 200
    k_cache, v_cache = torch.randn(2, num_blocks, block_size, kv_heads, dim)
    scales = None
    if kv == "int8":
        (k_cache, k_scales), (v_cache, v_scales) = quantize_kv(k_cache), quantize_kv(v_cache)
        scales = (k_scales, v_scales)
        k_seen, v_seen = dequantize_kv(k_cache, k_scales, torch.float32), dequantize_kv(v_cache, v_scales, torch.float32)
    else:
        k_cache, v_cache = k_cache.to(getattr(torch, kv)), v_cache.to(getattr(torch, kv))
        k_seen, v_seen = k_cache.float(), v_cache.float()
    free = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(len(chunks), 40, dtype=torch.long)
    for i, (_, c) in enumerate(chunks):
        for j in range(-(-c // block_size)):
            tables[i, j] = free.pop()
    rows = sum(t for t, _ in chunks)
    q = torch.randn(rows, heads + 2 * kv_heads, dim)[:, :heads]  # strided rows, as views of the fused qkv
    out = torch.empty(rows, heads, dim)
    ops.paged_prefill_attention(out, q, k_cache, v_cache, *(scales or (None, None)), tables,
                                torch.tensor([t for t, _ in chunks]), torch.tensor([c for _, c in chunks]), dim**-0.5,
                                window)
    start, seen = 0, []
    for i, (t, c) in enumerate(chunks):
        seen.append((q[start : start + t], *(x[tables[i]].flatten(0, 1)[:c] for x in (k_seen, v_seen))))
        start += t
    return out, seen


@pytest.mark.parametrize("kv", ["float32", "float16", "bfloat16", "int8"])
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "window"), [(9, 3, 64, 0), (4, 4, 16, 0), (6, 2, 32, 7)])
def test_paged_prefill_attention_attends_every_chunk_from_its_pages(kv, heads, kv_heads, dim, window):
    # The oracle is each chunk alone in SDPA over its pages as the cache holds them. A bfloat16 cache on the float
    # path here; its bfloat16 products are tested below.
    ops = cpu_ops()
    assert ops is not None, "the C++ kernels did not build"
    before = ops.bf16_products()
    ops.set_bf16_products("off")
    try:
        out, seen = paged_prefill(ops, kv, heads, kv_heads, dim, window)
    finally:
        ops.set_bf16_products(before)
    start = 0
    for q, k, v in seen:
        torch.testing.assert_close(out[start : start + len(q)], prefill_reference(q, k, v, window), rtol=1e-4, atol=1e-5)
        start += len(q)


@pytest.mark.parametrize(("heads", "kv_heads", "dim", "window"), [(9, 3, 64, 0), (6, 2, 32, 7), (4, 1, 128, 50),
                                                                  (4, 2, 48, 0)])
def test_a_bfloat16_cache_prefills_on_each_product_path(bf16_products, heads, kv_heads, dim, window):
    """Where the linears take bfloat16 products (AVX-512 BF16 dot products or AMX tiles) and the head size is a
    multiple of 32, a bfloat16 cache's keys and values are multiplied as stored, by the queries rounded to bfloat16
    (the oracle's queries here) and by the softmax weights rounded to bfloat16, each of which moves by at most 2^-9
    of itself: each output by at most 2^-9 of the largest value it averages. Elsewhere (the panel kernel, other
    head sizes) the cache is widened to float32."""
    ops = cpu_ops()
    out, seen = paged_prefill(ops, "bfloat16", heads, kv_heads, dim, window)
    dot = ops.bf16_products() in ("dot", "amx") and dim % 32 == 0
    start = 0
    for q, k, v in seen:
        got = out[start : start + len(q)]
        if dot:
            atol = 2**-9 * v.abs().max().item() + 1e-5
            torch.testing.assert_close(got, prefill_reference(q.bfloat16().float(), k, v, window), rtol=0, atol=atol)
            if len(q) > 1:  # the rounding shows: the products did multiply
                assert not torch.allclose(got, prefill_reference(q, k, v, window), atol=1e-5)
        else:
            torch.testing.assert_close(got, prefill_reference(q, k, v, window), rtol=1e-4, atol=1e-5)
        start += len(q)


def lowbit_prefill_reference(q, k, v, k_full, v_full, block_size, residual_blocks, window):
    """Both copies as keys, each query reading the full-precision one in its residual (its own block and the
    residual_blocks - 1 before it) and the other before that."""
    t, c = q.shape[0], k.shape[0]
    q_pos = torch.arange(c - t, c)[:, None]
    quantized, full = torch.arange(c)[None], torch.arange(c - len(k_full), c)[None]
    first = (q_pos // block_size - residual_blocks + 1).clamp(min=0) * block_size
    mask = torch.cat([quantized < first, (full >= first) & (full <= q_pos)], 1)
    if window:
        mask &= torch.cat([quantized, full], 1) > q_pos - window
    keys, values = torch.cat([k, k_full]), torch.cat([v, v_full])
    o = F.scaled_dot_product_attention(*(x.transpose(0, 1)[None] for x in (q, keys, values)), attn_mask=mask,
                                       enable_gqa=True)
    return o[0].transpose(0, 1)


@pytest.mark.parametrize(("t", "c", "heads", "kv_heads", "dim", "block_size", "residual_blocks", "window"), [
    (1, 33, 2, 1, 16, 16, 1, 0), (40, 40, 4, 2, 16, 16, 1, 0), (37, 100, 6, 2, 32, 16, 1, 0),
    (100, 300, 4, 1, 64, 8, 1, 0), (64, 200, 4, 4, 16, 16, 1, 50), (130, 130, 4, 2, 64, 32, 1, 20),
    (60, 90, 9, 3, 64, 16, 1, 5), (1, 90, 2, 1, 16, 16, 3, 0), (37, 100, 6, 2, 32, 16, 3, 0),
    (100, 300, 4, 1, 64, 8, 8, 0), (64, 200, 4, 4, 16, 16, 4, 50), (60, 90, 9, 3, 64, 16, 2, 5),
    (20, 40, 4, 2, 16, 16, 8, 0),
])
def test_lowbit_prefill_attention_reads_each_querys_residual_at_full_precision(t, c, heads, kv_heads, dim,
                                                                               block_size, residual_blocks, window):
    # Chunks that start mid-block (the full-precision entries start at the first query's residual), whole
    # prompts, residuals of one block and of several (longer than the context, too), windows narrower than a block
    # and wider; the two copies of each entry differ entirely, so a query that read the wrong one would show.
    ops, q, k, v = prefill_inputs(t, c, heads, kv_heads, dim)
    first = max(0, ((c - t) // block_size - residual_blocks + 1) * block_size)
    k_full, v_full = torch.randn(c - first, kv_heads, dim), torch.randn(c - first, kv_heads, dim)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    ops.lowbit_prefill_attention(out, q, k, v, k_full, v_full, dim**-0.5, window, block_size,
                                 residual_blocks * block_size)
    expected = lowbit_prefill_reference(q, k, v, k_full, v_full, block_size, residual_blocks, window)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
