// CUDA kernel of distllm_C::restrict_logits_ (declared in sampling.cpp; semantics in
// sampling_select.h). Each row is walked a few times: its maximum, three radix levels for
// top-k, three for top-p, and the final mask. Triton has no shared-memory histograms, warp
// match or block scans to build this from; torch's path sorts the whole row.
//
// Small batches would leave most SMs idle with one block a row, so on sm_90 a row is split
// over a thread-block cluster of up to 8 blocks: each block histograms its slice into its
// own shared memory, and every block sums the cluster's histograms through distributed
// shared memory and takes the same (deterministic) decision.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cooperative_groups.h>
#include <cstdlib>
#include <torch/library.h>

#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "sampling_select.h"

namespace distllm {

void check_restrict_args(const at::Tensor& logits, const at::Tensor& params);

namespace {

namespace cg = cooperative_groups;

constexpr int kThreads = 512;
constexpr int kBinsPerThread = kRadixBins / kThreads;
constexpr int kMaxSplit = 8;  // blocks a row at most (the portable cluster size)

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define DISTLLM_CLUSTERS 1
#else
#define DISTLLM_CLUSTERS 0
#endif

__device__ __forceinline__ uint32_t key_of(float x) { return key_from_bits(__float_as_uint(x)); }
__device__ __forceinline__ float float_of(uint32_t key) { return __uint_as_float(bits_from_key(key)); }

// The blocks that share a row: a cluster on sm_90, else the block alone.
struct RowSplit {
  int rank;
  int size;
  __device__ RowSplit() {
#if DISTLLM_CLUSTERS
    cg::cluster_group cluster = cg::this_cluster();
    rank = static_cast<int>(cluster.block_rank());
    size = static_cast<int>(cluster.num_blocks());
#else
    rank = 0;
    size = 1;
#endif
  }
  // Every block's shared-memory writes before it are visible to the others after it.
  __device__ __forceinline__ void sync() const {
#if DISTLLM_CLUSTERS
    cg::this_cluster().sync();
#else
    __syncthreads();
#endif
  }
  template <typename T>
  __device__ __forceinline__ T* peer(T* p, int r) const {
#if DISTLLM_CLUSTERS
    return cg::this_cluster().map_shared_rank(p, r);
#else
    return p;
#endif
  }
};

// f(value) on this block's slice of the row; VEC reads float4s (rows 16-byte aligned, V % 4 == 0).
template <bool VEC, typename F>
__device__ __forceinline__ void for_each(const float* __restrict__ row, int V, const RowSplit& split, F&& f) {
  if constexpr (VEC) {
    const float4* r4 = reinterpret_cast<const float4*>(row);
    const int n4 = V >> 2;
    const int chunk = (n4 + split.size - 1) / split.size;
    const int end = min(n4, (split.rank + 1) * chunk);
#pragma unroll 4
    for (int i = split.rank * chunk + threadIdx.x; i < end; i += kThreads) {
      const float4 v = r4[i];
      f(v.x);
      f(v.y);
      f(v.z);
      f(v.w);
    }
  } else {
    const int chunk = (V + split.size - 1) / split.size;
    const int end = min(V, (split.rank + 1) * chunk);
#pragma unroll 4
    for (int i = split.rank * chunk + threadIdx.x; i < end; i += kThreads) f(row[i]);
  }
}

struct SelectShared {
  unsigned long long hist[kRadixBins];
  typename cub::BlockScan<unsigned long long, kThreads>::TempStorage scan;
  unsigned long long target;
  int chosen;
};

// Radix select (radix_select in sampling.cpp, which this follows step by step): the key
// where weight(x) summed from the largest key down first reaches the target. top_p < 0 means
// the target is given; otherwise it is top_p of the first level's total. False: none reached.
template <bool VEC, typename Weight>
__device__ bool radix_select(const float* __restrict__ row, int V, const RowSplit& split, unsigned long long target,
                             float top_p, Weight weight, SelectShared& sh, uint32_t* key_out) {
  uint32_t prefix = 0, prefix_mask = 0;
  for (int level = 0; level < kRadixLevels; ++level) {
    const int shift = radix_shift(level);
    const uint32_t digit_mask = radix_digit_mask(level);
    for (int b = threadIdx.x; b < kRadixBins; b += kThreads) sh.hist[b] = 0;
    if (threadIdx.x == 0) sh.chosen = -1;
    __syncthreads();
    // Plain shared-memory atomics: aggregating a warp's equal bins first (match + reduce)
    // measured 2.5x slower on an H200 than the contention it saves.
    for_each<VEC>(row, V, split, [&](float v) {
      const uint32_t key = key_of(v);
      if ((key & prefix_mask) != prefix) return;
      const unsigned long long w = weight(v);
      if (w) atomicAdd(&sh.hist[(key >> shift) & digit_mask], w);
    });
    split.sync();  // every block's histogram is complete
    // Thread t owns bins hi - t * kBinsPerThread ... downwards, so the exclusive scan over the
    // threads gives the weight of every bin above a thread's first one.
    const int hi = static_cast<int>(digit_mask) - threadIdx.x * kBinsPerThread;
    unsigned long long mine[kBinsPerThread];
    unsigned long long local = 0;
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      mine[j] = 0;
      if (hi - j >= 0)
        for (int r = 0; r < split.size; ++r) mine[j] += split.peer(sh.hist, r)[hi - j];
      local += mine[j];
    }
    unsigned long long above, total;
    cub::BlockScan<unsigned long long, kThreads>(sh.scan).ExclusiveSum(local, above, total);
    if (level == 0 && top_p >= 0.0f) target = top_p_target(top_p, total);
#pragma unroll
    for (int j = 0; j < kBinsPerThread; ++j) {
      if (above < target && target <= above + mine[j]) {
        sh.chosen = hi - j;
        sh.target = target - above;
      }
      above += mine[j];
    }
    __syncthreads();
    const int chosen = sh.chosen;
    target = sh.target;
    split.sync();  // no block clears its histogram (or exits) while another still reads it
    if (chosen < 0) return false;
    prefix |= static_cast<uint32_t>(chosen) << shift;
    prefix_mask |= digit_mask << shift;
  }
  *key_out = prefix;
  return true;
}

template <bool VEC>
__global__ void __launch_bounds__(kThreads) restrict_logits_kernel(float* __restrict__ logits, int64_t stride, int V,
                                                                   const float* __restrict__ params, int B) {
  __shared__ SelectShared sh;
  __shared__ typename cub::BlockReduce<float, kThreads>::TempStorage reduce;
  __shared__ float part_max, row_max;
  const RowSplit split;
  const int r = blockIdx.x / split.size;
  float* row = logits + r * stride;
  const float kf = params[r];
  const float p = params[B + r];
  const float mp = params[2 * B + r];
  const bool use_k = kf > 0.0f && kf < static_cast<float>(V);
  const bool use_p = p < 1.0f;
  const bool use_mp = mp > 0.0f;
  if (!use_k && !use_p && !use_mp) return;  // the same for every block of the row
  const float ninf = -INFINITY;

  float m = ninf;
  if (use_p || use_mp) {
    float local = ninf;
    for_each<VEC>(row, V, split, [&](float v) { local = fmaxf(local, v); });
    const float mx = cub::BlockReduce<float, kThreads>(reduce).Reduce(local, [](float a, float b) { return fmaxf(a, b); });
    if (threadIdx.x == 0) part_max = mx;
    split.sync();
    if (threadIdx.x == 0) {
      float all = ninf;
      for (int q = 0; q < split.size; ++q) all = fmaxf(all, *split.peer(&part_max, q));
      row_max = all;
    }
    split.sync();  // row_max is read below; the peers' part_max no longer
    m = row_max;
    if (m == ninf) return;  // nothing finite: leave the row as it is
  }

  float kth = ninf;
  if (use_k) {
    uint32_t key;
    if (radix_select<VEC>(row, V, split, static_cast<unsigned long long>(kf), -1.0f, [](float) { return 1ull; }, sh,
                          &key))
      kth = float_of(key);
  }
  auto min_p_keeps = [&](float v) { return !use_mp || expf(v - m) >= mp; };

  float cut = ninf;
  if (use_p) {
    auto mass = [&](float v) -> unsigned long long {
      if (!(v >= kth) || !min_p_keeps(v)) return 0ull;
      return mass_units(expf(v - m));
    };
    uint32_t key;
    if (radix_select<VEC>(row, V, split, 0ull, p, mass, sh, &key)) cut = float_of(key);
  }

  auto keep = [&](float v) { return v >= kth && v >= cut && min_p_keeps(v); };
  if constexpr (VEC) {
    float4* r4 = reinterpret_cast<float4*>(row);
    const int n4 = V >> 2;
    const int chunk = (n4 + split.size - 1) / split.size;
    const int end = min(n4, (split.rank + 1) * chunk);
    for (int i = split.rank * chunk + threadIdx.x; i < end; i += kThreads) {
      float4 v = r4[i];
      v.x = keep(v.x) ? v.x : ninf;
      v.y = keep(v.y) ? v.y : ninf;
      v.z = keep(v.z) ? v.z : ninf;
      v.w = keep(v.w) ? v.w : ninf;
      r4[i] = v;
    }
  } else {
    const int chunk = (V + split.size - 1) / split.size;
    const int end = min(V, (split.rank + 1) * chunk);
    for (int i = split.rank * chunk + threadIdx.x; i < end; i += kThreads)
      if (!keep(row[i])) row[i] = ninf;
  }
}

// Blocks a row: enough to give every SM two blocks, at most kMaxSplit, a power of two.
int split_for(int64_t B, const cudaDeviceProp& prop) {
  if (prop.major < 9) return 1;
  int split = 1;
  while (split < kMaxSplit && B * split * 2 <= 2 * prop.multiProcessorCount) split *= 2;
  return split;
}

template <bool VEC>
void launch(float* x, int64_t stride, int V, const float* params, int64_t B, int split, cudaStream_t stream) {
  if (split == 1) {
    restrict_logits_kernel<VEC><<<B, kThreads, 0, stream>>>(x, stride, V, params, static_cast<int>(B));
    return;
  }
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(static_cast<unsigned>(B * split));
  cfg.blockDim = dim3(kThreads);
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeClusterDimension;
  attr[0].val.clusterDim.x = split;
  attr[0].val.clusterDim.y = 1;
  attr[0].val.clusterDim.z = 1;
  cfg.attrs = attr;
  cfg.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&cfg, restrict_logits_kernel<VEC>, x, stride, V, params, static_cast<int>(B)));
}

void restrict_logits_cuda(at::Tensor logits, const at::Tensor& params) {
  check_restrict_args(logits, params);
  const int64_t B = logits.size(0);
  if (B == 0) return;
  const int V = static_cast<int>(logits.size(1));
  const int64_t stride = logits.stride(0);
  const c10::cuda::CUDAGuard guard(logits.device());
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  static thread_local int cached_device = -1;
  static thread_local cudaDeviceProp prop;
  if (cached_device != logits.get_device()) {
    C10_CUDA_CHECK(cudaGetDeviceProperties(&prop, logits.get_device()));
    cached_device = logits.get_device();
  }
  int split = split_for(B, prop);
  if (const char* env = std::getenv("DISTLLM_SAMPLING_SPLIT")) {  // blocks a row, for benchmarks
    const int forced = std::atoi(env);
    if (prop.major >= 9 && forced >= 1 && forced <= kMaxSplit && (forced & (forced - 1)) == 0) split = forced;
  }
  const bool vec = V % 4 == 0 && stride % 4 == 0 && reinterpret_cast<uintptr_t>(logits.data_ptr()) % 16 == 0;
  float* x = logits.data_ptr<float>();
  const float* ps = params.data_ptr<float>();
  if (vec)
    launch<true>(x, stride, V, ps, B, split, stream);
  else
    launch<false>(x, stride, V, ps, B, split, stream);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace
}  // namespace distllm

TORCH_LIBRARY_IMPL(distllm_C, CUDA, m) { m.impl("restrict_logits_", &distllm::restrict_logits_cuda); }
