// distllm_C::restrict_logits_: min-p, top-k and top-p on float32 logits without a sort
// (the semantics are in sampling_select.h). This file declares the op and holds its CPU
// kernel; sampling_cuda.cu holds the CUDA one. distllm/ops/csrc_ext.py builds both just in
// time; distllm/ops/sampling_ref.py is the torch path used when they are not built.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "sampling_select.h"

namespace distllm {

void check_restrict_args(const at::Tensor& logits, const at::Tensor& params) {
  TORCH_CHECK(logits.dim() == 2, "restrict_logits_: logits must be [batch, vocab], got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat, "restrict_logits_: logits must be float32, got ",
              logits.scalar_type());
  TORCH_CHECK(logits.stride(1) == 1, "restrict_logits_: logits rows must be contiguous");
  TORCH_CHECK(logits.size(1) < (1 << 20), "restrict_logits_: vocab must be below 2^20, got ", logits.size(1));
  const int64_t B = logits.size(0);
  TORCH_CHECK(params.scalar_type() == at::kFloat && params.dim() == 2 && params.size(0) == 3 && params.size(1) == B,
              "restrict_logits_: params must be float32 [3, ", B, "] (rows: top_k, top_p, min_p), got ",
              params.scalar_type(), " ", params.sizes());
  TORCH_CHECK(params.is_contiguous(), "restrict_logits_: params must be contiguous");
  TORCH_CHECK(params.device() == logits.device(), "restrict_logits_: params must be on ", logits.device());
}

namespace {

inline uint32_t key_of(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  return key_from_bits(bits);
}

inline float float_of(uint32_t key) {
  uint32_t bits = bits_from_key(key);
  float x;
  std::memcpy(&x, &bits, sizeof(x));
  return x;
}

// Radix select over one row: the key of the element where the weight summed from the largest
// key down first reaches target; weight(x) is 0 for elements that do not take part.
// Returns false when no element reaches it (then nothing is cut).
template <typename Weight>
bool radix_select(const float* x, int64_t V, unsigned long long target, Weight weight,
                  std::vector<unsigned long long>& hist, uint32_t* key_out,
                  unsigned long long* level0_total, float top_p) {
  uint32_t prefix = 0, prefix_mask = 0;
  for (int level = 0; level < kRadixLevels; ++level) {
    const int shift = radix_shift(level);
    const uint32_t digit_mask = radix_digit_mask(level);
    std::fill(hist.begin(), hist.end(), 0ull);
    for (int64_t i = 0; i < V; ++i) {
      const uint32_t key = key_of(x[i]);
      if ((key & prefix_mask) != prefix) continue;
      hist[(key >> shift) & digit_mask] += weight(x[i]);
    }
    if (level == 0 && level0_total != nullptr) {
      unsigned long long total = 0;
      for (auto h : hist) total += h;
      *level0_total = total;
      target = top_p_target(top_p, total);
    }
    unsigned long long above = 0;
    int64_t chosen = -1;
    for (int64_t b = static_cast<int64_t>(digit_mask); b >= 0; --b) {
      if (above < target && target <= above + hist[b]) {
        chosen = b;
        break;
      }
      above += hist[b];
    }
    if (chosen < 0) return false;
    target -= above;
    prefix |= static_cast<uint32_t>(chosen) << shift;
    prefix_mask |= digit_mask << shift;
  }
  *key_out = prefix;
  return true;
}

void restrict_row(float* x, int64_t V, int k, float p, float mp, std::vector<unsigned long long>& hist) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const bool use_k = k > 0 && k < V;
  const bool use_p = p < 1.0f;
  const bool use_mp = mp > 0.0f;
  if (!use_k && !use_p && !use_mp) return;

  float m = kNegInf;
  if (use_p || use_mp) {
    for (int64_t i = 0; i < V; ++i) m = std::fmax(m, x[i]);
    if (m == kNegInf) return;  // nothing finite: leave the row as it is
  }

  float kth = kNegInf;
  if (use_k) {
    uint32_t key;
    if (radix_select(x, V, static_cast<unsigned long long>(k), [](float) { return 1ull; }, hist, &key, nullptr, 1.0f))
      kth = float_of(key);
  }
  auto min_p_keeps = [&](float v) { return !use_mp || std::exp(v - m) >= mp; };

  float cut = kNegInf;
  if (use_p) {
    auto mass = [&](float v) -> unsigned long long {
      if (!(v >= kth) || !min_p_keeps(v)) return 0ull;
      return mass_units(std::exp(v - m));
    };
    uint32_t key;
    unsigned long long total = 0;
    if (radix_select(x, V, 0ull, mass, hist, &key, &total, p)) cut = float_of(key);
  }

  for (int64_t i = 0; i < V; ++i) {
    const float v = x[i];
    if (!(v >= kth && v >= cut && min_p_keeps(v))) x[i] = kNegInf;
  }
}

void restrict_logits_cpu(at::Tensor logits, const at::Tensor& params) {
  check_restrict_args(logits, params);
  const int64_t B = logits.size(0), V = logits.size(1), stride = logits.stride(0);
  float* base = logits.data_ptr<float>();
  const float* ks = params.data_ptr<float>();
  const float* ps = ks + B;
  const float* mps = ks + 2 * B;
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    std::vector<unsigned long long> hist(kRadixBins);
    for (int64_t r = begin; r < end; ++r)
      restrict_row(base + r * stride, V, static_cast<int>(ks[r]), ps[r], mps[r], hist);
  });
}

}  // namespace
}  // namespace distllm

TORCH_LIBRARY(distllm_C, m) {
  // params: float32 [3, batch], rows top_k (<= 0 or >= vocab: off), top_p (>= 1: off) and
  // min_p (<= 0: off); one tensor, so the host copies them to the device in one go.
  m.def("restrict_logits_(Tensor(a!) logits, Tensor params) -> ()");
}

TORCH_LIBRARY_IMPL(distllm_C, CPU, m) { m.impl("restrict_logits_", &distllm::restrict_logits_cpu); }
