// The small per-layer steps of decoding one token (rlhf_fast/models/fast_decoder.py), each one
// op instead of 5-15 torch calls: at decode every tensor here holds a few hundred numbers, so
// the cost of a step is its dispatch, not its arithmetic (~3 us a call against ~80 us for the
// torch composition of rope + cache write + attention).
//
//   decode_add_rms_norm  x += delta (in place, optional), then RMSNorm(x) * weight, as HF's
//                        LlamaRMSNorm: normalised in fp32, rounded to x's dtype, then scaled.
//   decode_attention     one query row: RoPE on q and k, k and v written to the caches at
//                        `position`, attention of every q head over its KV head's positions
//                        [max(0, position - window + 1), position] (window <= 0: all), fp32.
//   decode_attention_rows  the attention alone for B rows of one query each (batched rollout
//                        decoding, rlhf_fast/train/rollout_decoder.py): q already rotated, the
//                        caches already written, each row's visible keys given by a mask.
//   decode_silu_mul      silu(gate) * up of [M, 2I] = [gate | up] (rounded as the torch pair).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/decode_ops.h"
#include "cpu/op_checks.h"

namespace rlhf_fast {
namespace {

void check_same_dtype(const at::Tensor& t, const char* name, const at::Tensor& like) {
  TORCH_CHECK_TYPE(t.scalar_type() == like.scalar_type(), name, " must be ", like.scalar_type(),
                   " (the activations' dtype), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
}

void check_float(const at::Tensor& t, const char* name) {
  const auto dtype = t.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf, name,
                   " must be float32, bfloat16 or float16, got ", dtype);
  TORCH_CHECK_VALUE(t.device().is_cpu(), name, " must be on the CPU, got ", t.device());
}

}  // namespace

at::Tensor decode_add_rms_norm_cpu(at::Tensor& x, const std::optional<at::Tensor>& delta,
                                   const at::Tensor& weight, double eps) {
  check_float(x, "x");
  TORCH_CHECK_VALUE(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous [M, H], got ",
                    x.sizes());
  const int64_t M = x.size(0), H = x.size(1);
  check_same_dtype(weight, "weight", x);
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == H, "weight must have shape [", H,
                    "], got ", weight.sizes());
  at::Tensor d;
  if (delta.has_value()) {
    check_same_dtype(*delta, "delta", x);
    TORCH_CHECK_VALUE(delta->sizes() == x.sizes(), "delta must have shape ", x.sizes(), ", got ",
                      delta->sizes());
    d = delta->contiguous();
  }
  const at::Tensor w = weight.contiguous();
  at::Tensor out = at::empty({M, H}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_rms_norm", [&] {
    scalar_t* xs = x.data_ptr<scalar_t>();
    const scalar_t* ds = d.defined() ? d.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* ws = w.const_data_ptr<scalar_t>();
    scalar_t* os = out.data_ptr<scalar_t>();
    for (int64_t m = 0; m < M; ++m) {
      scalar_t* row = xs + m * H;
      float sum_squares = 0.0f;
      for (int64_t i = 0; i < H; ++i) {
        if (ds) row[i] = static_cast<scalar_t>(float(row[i]) + float(ds[m * H + i]));
        const float v = float(row[i]);
        sum_squares += v * v;
      }
      const float inverse = 1.0f / std::sqrt(sum_squares / float(H) + float(eps));
      for (int64_t i = 0; i < H; ++i) {
        const scalar_t normed = static_cast<scalar_t>(float(row[i]) * inverse);
        os[m * H + i] = static_cast<scalar_t>(float(ws[i]) * float(normed));
      }
    }
  });
  return out;
}

at::Tensor decode_attention_cpu(const at::Tensor& qkv, const at::Tensor& cos,
                                const at::Tensor& sin, at::Tensor& keys, at::Tensor& values,
                                int64_t position, int64_t heads, int64_t kv_heads,
                                int64_t window, double scale) {
  check_float(qkv, "qkv");
  TORCH_CHECK_VALUE(heads > 0 && kv_heads > 0 && heads % kv_heads == 0,
                    "heads must be a positive multiple of kv_heads, got ", heads, " and ",
                    kv_heads);
  TORCH_CHECK_VALUE(qkv.dim() == 2 && qkv.size(0) == 1 && qkv.is_contiguous(),
                    "qkv must be a contiguous [1, (heads + 2 kv_heads) head_dim], got ",
                    qkv.sizes());
  const int64_t D = qkv.size(1) / (heads + 2 * kv_heads);
  TORCH_CHECK_VALUE(D > 0 && D % 2 == 0 && D * (heads + 2 * kv_heads) == qkv.size(1),
                    "qkv's width ", qkv.size(1), " is not (heads + 2 kv_heads) x an even head_dim");
  for (auto* cache : {&keys, &values}) {
    check_same_dtype(*cache, cache == &keys ? "keys" : "values", qkv);
    TORCH_CHECK_VALUE(cache->dim() == 4 && cache->size(0) == 1 && cache->size(1) == kv_heads &&
                          cache->size(3) == D && cache->is_contiguous(),
                      "caches must be contiguous [1, kv_heads, capacity, head_dim], got ",
                      cache->sizes());
  }
  TORCH_CHECK_VALUE(values.sizes() == keys.sizes(), "values must have the shape of keys");
  const int64_t capacity = keys.size(2);
  TORCH_CHECK_VALUE(position >= 0 && position < capacity, "position ", position,
                    " is outside the cache of ", capacity, " positions");
  for (auto* table : {&cos, &sin}) {
    check_same_dtype(*table, "cos and sin", qkv);
    TORCH_CHECK_VALUE(table->dim() == 2 && table->size(0) > position && table->size(1) == D &&
                          table->is_contiguous(),
                      "cos and sin must be contiguous [> position, head_dim], got ",
                      table->sizes());
  }
  const int64_t first = window > 0 ? std::max<int64_t>(0, position - window + 1) : 0;
  const int64_t length = position + 1 - first, group = heads / kv_heads, half = D / 2;
  at::Tensor out = at::empty({1, heads * D}, qkv.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, qkv.scalar_type(), "attention", [&] {
    const scalar_t* in = qkv.const_data_ptr<scalar_t>();
    const scalar_t* c = cos.const_data_ptr<scalar_t>() + position * D;
    const scalar_t* s = sin.const_data_ptr<scalar_t>() + position * D;  // sign folded in
    // RoPE: x * cos + [x2, x1] * signed_sin, on q (fp32 here) and k (into the cache).
    std::vector<float> q(heads * D);
    auto rotate = [&](const scalar_t* x, int64_t i) {
      const float partner = float(x[i < half ? i + half : i - half]);
      return float(x[i]) * float(c[i]) + partner * float(s[i]);
    };
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t i = 0; i < D; ++i) q[h * D + i] = float(static_cast<scalar_t>(rotate(in + h * D, i)));
    scalar_t* ks = keys.data_ptr<scalar_t>();
    scalar_t* vs = values.data_ptr<scalar_t>();
    for (int64_t g = 0; g < kv_heads; ++g) {
      const scalar_t* k_in = in + (heads + g) * D;
      const scalar_t* v_in = in + (heads + kv_heads + g) * D;
      scalar_t* k_out = ks + (g * capacity + position) * D;
      scalar_t* v_out = vs + (g * capacity + position) * D;
      for (int64_t i = 0; i < D; ++i) {
        k_out[i] = static_cast<scalar_t>(rotate(k_in, i));
        v_out[i] = v_in[i];
      }
    }
    scalar_t* o = out.data_ptr<scalar_t>();
    const float softmax_scale = static_cast<float>(scale);
    const DecodeAttendFn attend = active_kernels().decode_attend[float_dtype_index(qkv, "qkv")];
    // Heads in parallel once the context is long enough to pay for the threads.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, length * D));
    at::parallel_for(0, heads, grain, [&](int64_t h_begin, int64_t h_end) {
      std::vector<float> scores(2 * length), acc(D);  // see DecodeAttendFn
      for (int64_t h = h_begin; h < h_end; ++h) {
        const int64_t g = h / group;
        const float* qh = q.data() + h * D;
        const scalar_t* kg = ks + (g * capacity + first) * D;
        const scalar_t* vg = vs + (g * capacity + first) * D;
        const float total = attend(qh, kg, vg, nullptr, length, D, softmax_scale,
                                   scores.data(), acc.data());
        for (int64_t i = 0; i < D; ++i) o[h * D + i] = static_cast<scalar_t>(acc[i] / total);
      }
    });
  });
  return out;
}

at::Tensor decode_attention_rows_cpu(const at::Tensor& q, const at::Tensor& keys,
                                     const at::Tensor& values, const at::Tensor& key_mask,
                                     int64_t first, double scale) {
  check_float(q, "q");
  TORCH_CHECK_VALUE(q.dim() == 3 && q.size(0) > 0 && q.size(1) > 0 && q.size(2) > 0,
                    "q must be [B, heads, head_dim], got ", q.sizes());
  const int64_t B = q.size(0), heads = q.size(1), D = q.size(2);
  for (auto* cache : {&keys, &values}) {
    const char* name = cache == &keys ? "keys" : "values";
    check_same_dtype(*cache, name, q);
    TORCH_CHECK_VALUE(cache->dim() == 4 && cache->size(0) == B && cache->size(3) == D &&
                          cache->is_contiguous(),
                      name, " must be a contiguous [", B, ", kv_heads, capacity, ", D,
                      "], got ", cache->sizes());
  }
  TORCH_CHECK_VALUE(values.sizes() == keys.sizes(), "values must have the shape of keys ",
                    keys.sizes(), ", got ", values.sizes());
  const int64_t kv_heads = keys.size(1), capacity = keys.size(2);
  TORCH_CHECK_VALUE(kv_heads > 0 && heads % kv_heads == 0, "q's heads (", heads,
                    ") must be a multiple of the caches' kv_heads (", kv_heads, ")");
  TORCH_CHECK_TYPE(key_mask.scalar_type() == at::kBool, "key_mask must be bool, got ",
                   key_mask.scalar_type());
  TORCH_CHECK_VALUE(key_mask.device().is_cpu(), "key_mask must be on the CPU, got ",
                    key_mask.device());
  TORCH_CHECK_VALUE(key_mask.dim() == 2 && key_mask.size(0) == B && key_mask.size(1) > 0,
                    "key_mask must be [", B, ", keys] with keys >= 1, got ", key_mask.sizes());
  const int64_t length = key_mask.size(1);
  TORCH_CHECK_VALUE(first >= 0 && first + length <= capacity, "key columns [", first, ", ",
                    first + length, ") are outside the cache of ", capacity, " positions");
  // The rollout's query is a strided view of the rotated q/k block; only its rows need unit
  // stride. The mask is a few hundred bytes: a copy costs nothing.
  const at::Tensor query = q.stride(2) == 1 ? q : q.contiguous();
  const at::Tensor visible = key_mask.contiguous();
  const int64_t q_row = query.stride(0), q_head = query.stride(1), group = heads / kv_heads;
  at::Tensor out = new_output({B, heads * D}, q.scalar_type());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), "attention_rows", [&] {
    const scalar_t* qs = query.const_data_ptr<scalar_t>();
    const scalar_t* ks = keys.const_data_ptr<scalar_t>();
    const scalar_t* vs = values.const_data_ptr<scalar_t>();
    const bool* mask = visible.const_data_ptr<bool>();
    scalar_t* o = out.data_ptr<scalar_t>();
    const float softmax_scale = static_cast<float>(scale);
    const DecodeAttendFn attend = active_kernels().decode_attend[float_dtype_index(q, "q")];
    // One (row, head) pair is ~4 length x D flops: at the PPO bench's 8 rows x 4 heads and 16-64
    // keys the whole call is 30-130 kflop, a few microseconds, so pairs are only split across
    // threads in chunks of >= ~64 kflop.
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, length * D));
    at::parallel_for(0, B * heads, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> qh(D), scores(2 * length), acc(D);  // see DecodeAttendFn
      for (int64_t pair = begin; pair < end; ++pair) {
        const int64_t b = pair / heads, h = pair % heads, g = h / group;
        const bool* row_mask = mask + b * length;
        const scalar_t* kg = ks + ((b * kv_heads + g) * capacity + first) * D;
        const scalar_t* vg = vs + ((b * kv_heads + g) * capacity + first) * D;
        for (int64_t i = 0; i < D; ++i) qh[i] = float(qs[b * q_row + h * q_head + i]);
        const float total = attend(qh.data(), kg, vg, row_mask, length, D, softmax_scale,
                                   scores.data(), acc.data());
        // A row that sees no key attends to nothing: zeros, where softmax over an empty set
        // would give 0/0 (SDPA returns NaN there).
        const float inverse = total > 0.0f ? 1.0f / total : 0.0f;
        scalar_t* oh = o + b * heads * D + h * D;
        for (int64_t i = 0; i < D; ++i) oh[i] = static_cast<scalar_t>(acc[i] * inverse);
      }
    });
  });
  return out;
}

at::Tensor decode_silu_mul_cpu(const at::Tensor& gate_up) {
  check_float(gate_up, "gate_up");
  TORCH_CHECK_VALUE(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0,
                    "gate_up must be [M, 2 I] ([gate | up]), got ", gate_up.sizes());
  const at::Tensor in = gate_up.contiguous();
  const int64_t M = in.size(0), I = in.size(1) / 2;
  at::Tensor out = at::empty({M, I}, in.options());
  // one vectorized pass per row (the table's ISA): the scalar loop's std::exp made this ~34 us
  // at [8, 2 x 688] bf16, a tenth of a rollout's decode step
  const SiluMulFn kernel =
      active_kernels().silu_mul_forward_as_torch[float_dtype_index(in, "gate_up")];
  const int64_t element = in.element_size();
  const char* src = static_cast<const char*>(in.const_data_ptr());
  char* dst = static_cast<char*>(out.data_ptr());
  for (int64_t m = 0; m < M; ++m) {
    SiluMulArgs args{};
    args.gate = src + m * 2 * I * element;
    args.up = src + (m * 2 * I + I) * element;
    args.out = dst + m * I * element;
    kernel(args, 0, I);
  }
  return out;
}

}  // namespace rlhf_fast
