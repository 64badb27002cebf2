// Shared by the CPU and CUDA builds of distllm_C::restrict_logits_: the order-preserving
// float key, the radix digits and the fixed-point probability mass.
//
// The op keeps, in each row of float32 logits x, the tokens that vLLM's min-p, top-k and top-p
// (applied in that order) keep, and sets the others to -inf, without sorting the row:
//   m = max(x); min-p keeps exp(x - m) >= min_p;
//   top-k keeps x >= the k-th largest x (ties at the k-th value kept);
//   top-p keeps x_i when the mass of the kept tokens strictly above x_i is below top_p times
//   the mass of all kept tokens (every token tied with the last one kept is kept too).
// Both selections are radix selects over 32-bit keys in three digits (11, 11 and 10 bits,
// most significant first): a histogram of the digit over the elements that match the
// prefix chosen so far, then the bin where the count (top-k) or the mass (top-p) summed from
// the largest bin down first reaches its target. Masses are integers (exp(x - m) in 2^-40
// units), so the sums do not depend on the order the elements are added in.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define DISTLLM_HD __host__ __device__ __forceinline__
#else
#define DISTLLM_HD inline
#endif

namespace distllm {

constexpr int kRadixLevels = 3;
constexpr int kRadixBins = 2048;  // bins of the widest digit (11 bits)
constexpr double kMassScale = 1099511627776.0;  // 2^40: a row of 2^20 weights <= 1 stays < 2^61

DISTLLM_HD int radix_shift(int level) { return level == 0 ? 21 : (level == 1 ? 10 : 0); }
DISTLLM_HD uint32_t radix_digit_mask(int level) { return level == 2 ? 0x3FFu : 0x7FFu; }

// x < y as floats  <=>  float_key(x) < float_key(y) as unsigned integers.
DISTLLM_HD uint32_t key_from_bits(uint32_t bits) {
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}
DISTLLM_HD uint32_t bits_from_key(uint32_t key) {
  return (key & 0x80000000u) ? (key & 0x7FFFFFFFu) : ~key;
}

// Mass of one token in fixed point: e = exp(x - row max), in [0, 1].
DISTLLM_HD unsigned long long mass_units(float e) {
  return static_cast<unsigned long long>(static_cast<double>(e) * kMassScale);
}

// Target of the top-p select: the smallest integer mass T with (mass above x_i < T) <=>
// (mass above x_i < top_p * total); at least 1 so that the largest token is always kept.
DISTLLM_HD unsigned long long top_p_target(float top_p, unsigned long long total) {
  double t = static_cast<double>(top_p) * static_cast<double>(total);
  unsigned long long ti = static_cast<unsigned long long>(t);
  if (static_cast<double>(ti) < t) ti += 1;
  if (ti < 1) ti = 1;
  if (ti > total) ti = total;
  return ti;
}

}  // namespace distllm
