// The decode stack (ops.h): every decoder layer of a decode step in one call, composed of the other files' ops.
#include <ATen/ops/empty_like.h>
#include <cmath>

#include "ops.h"

// A decode step's attention for one layer: the new k, v into the cache, then q against it into out.
static void attend_decodes(const KVCache& cache, at::Tensor out, at::Tensor q, at::Tensor k, at::Tensor v,
                           at::Tensor slots, at::Tensor block_tables, at::Tensor context_lens, double scale,
                           int64_t window) {
  const auto& [kv, scales] = cache;
  if (scales) {
    write_kv_cache_int8_(kv[0], kv[1], (*scales)[0], (*scales)[1], k, v, slots);
    paged_decode_attention_int8(out, q, kv[0], kv[1], (*scales)[0], (*scales)[1], block_tables, context_lens, scale,
                                window);
  } else {
    write_kv_cache_(kv[0], kv[1], k, v, slots);
    paged_decode_attention(out, q, kv[0], kv[1], block_tables, context_lens, scale, window);
  }
}

static at::Tensor apply_linear(const LinearSpec& spec, const at::Tensor& x) {
  const auto& [weight, scales, mins, bias, group, out_features] = spec;
  if (group == 0) return packed_linear(x, weight, out_features, bias);
  if (weight.scalar_type() == at::kByte) return int4_linear(x, weight, *scales, mins, bias, group);
  if (group < 0) return w8a8_linear(x, weight, *scales, bias);
  return int8_linear(x, weight, *scales, bias, group);
}

at::Tensor DecodeStack::forward(at::Tensor x, at::Tensor cos, at::Tensor sin, std::vector<KVCache> kv_caches,
                                at::Tensor slots, at::Tensor block_tables, at::Tensor context_lens,
                                int64_t window) {
  TORCH_CHECK(kv_caches.size() == layers_.size(), "DecodeStack: one KV cache per layer");
  const int64_t B = x.size(0), q_size = heads_ * head_dim_, kv_size = kv_heads_ * head_dim_;
  const double scale = 1.0 / std::sqrt(double(head_dim_));
  x = x.contiguous();
  at::Tensor residual;
  for (size_t l = 0; l < layers_.size(); ++l) {
    const auto& [in_norm, post_norm, qkv_proj, o_proj, gate_up_proj, down_proj] = layers_[l];
    if (l == 0) {
      residual = x;
      x = rms_norm(x, in_norm, eps_);
    } else {
      add_rms_norm_(x, residual, in_norm, eps_);
    }
    auto qkv = apply_linear(qkv_proj, x);
    rope_(qkv, cos, sin, heads_ + kv_heads_, head_dim_);
    auto q = qkv.narrow(1, 0, q_size).contiguous().view({B, heads_, head_dim_});
    auto attn = at::empty_like(q);
    attend_decodes(kv_caches[l], attn, q, qkv.narrow(1, q_size, kv_size).view({B, kv_heads_, head_dim_}),
                   qkv.narrow(1, q_size + kv_size, kv_size).view({B, kv_heads_, head_dim_}), slots, block_tables,
                   context_lens, scale, window);
    x = apply_linear(o_proj, attn.view({B, q_size}));
    add_rms_norm_(x, residual, post_norm, eps_);
    x = apply_linear(down_proj, silu_mul(apply_linear(gate_up_proj, x)));
  }
  return x.add_(residual);
}
