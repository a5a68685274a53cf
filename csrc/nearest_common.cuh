// Device helpers of the nearest-code kernels (nearest_code.cu, nearest_code_sm90.cu): the rule for
// non-finite values and the overflow-free cos norms (lgvq_fast.ops.nearest_code's docstring).
#pragma once

#include "common.cuh"

namespace lgvq {

__device__ __forceinline__ float neg_inf() { return __int_as_float(static_cast<int>(0xff800000u)); }
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fffffff); }

// A cos vector whose norm reaches 2^126 counts as non-finite.
constexpr float kCosNormLimit = 8.507059173023462e37f;

// 2^-64 and 2^64: a second sum of squares, of x * 2^-64, stands in where the
// plain one overflows (||x|| >~ 1.8e19).
constexpr float kTwoM64 = 5.421010862427522e-20f;
constexpr float kTwoP64 = 1.8446744073709552e19f;

// 1 / max(||x||, eps) from the two sums of squares, or NaN where ||x|| >= 2^126
// (the rule: such a cos vector counts as non-finite). Below the limit the result
// is a normal fp32 (>= 2^-126), so x * inv never meets a subnormal and |x * inv| <= 1.
__device__ __forceinline__ float cos_inv_norm(float sq, float sq_lo, float eps) {
  // A NaN sq (a row holding NaN) takes the second branch and stays NaN.
  const float norm = sq < pos_inf() ? sqrtf(sq) : sqrtf(sq_lo) * kTwoP64;
  return norm >= kCosNormLimit ? quiet_nan() : 1.f / fmaxf(norm, eps);
}

// cos_inv_norm of one row, read by a whole warp in one pass.
template <typename T>
__device__ __forceinline__ float warp_cos_inv_norm(const T* __restrict__ x, int d, bool valid, int lane, float eps) {
  float sq = 0.f, sq_lo = 0.f;
  if (valid) {
    for (int c = lane; c < d; c += 32) {
      float v = to_float(x[c]);
      sq = fmaf(v, v, sq);
      v *= kTwoM64;
      sq_lo = fmaf(v, v, sq_lo);
    }
  }
  return cos_inv_norm(warp_sum(sq), warp_sum(sq_lo), eps);
}

// ||x||^2 of one row in fp32 (it may overflow to +inf: the l2 rule handles that), read by a whole warp in one
// pass; 0 for a row that is not valid.
template <typename T>
__device__ __forceinline__ float warp_sum_squares(const T* __restrict__ x, int d, bool valid, int lane) {
  float sq = 0.f;
  if (valid) {
    for (int c = lane; c < d; c += 32) {
      const float v = to_float(x[c]);
      sq = fmaf(v, v, sq);
    }
  }
  return warp_sum(sq);
}

// A candidate replaces the running best only if it is smaller and above -inf:
// NaN, +inf (best starts at +inf) and -inf never win.
__device__ __forceinline__ bool wins(float sc, float best) { return sc < best && sc > neg_inf(); }

// Rounding can leave a distance slightly below 0: clamp it, but keep a NaN (fmaxf would turn it into 0, which
// reads as an exact match for a row holding NaN).
__device__ __forceinline__ float clamp_dist(float d) { return d < 0.f ? 0.f : d; }

// The 4 threads of a quad (lanes 4g .. 4g + 3, the m16n8 / wgmma accumulator layout) hold interleaved codes of
// the same row: merge their running (score, index), equal scores going to the lower index.
__device__ __forceinline__ void quad_merge(float& v, int& i) {
#pragma unroll
  for (int off = 1; off < 4; off <<= 1) {
    const float v2 = __shfl_xor_sync(kFullMask, v, off);
    const int i2 = __shfl_xor_sync(kFullMask, i, off);
    if (v2 < v || (v2 == v && i2 < i)) {
      v = v2;
      i = i2;
    }
  }
}

// A row's outputs from its best score v and index i: the distance ||z||^2 + v (l2, z_sq = ||z||^2) or
// 1 + v / 2 (cos, both sides normalised), clamped at 0; a row with no finite score (i never moved from 0) gets NaN.
__device__ __forceinline__ void store_row(int64_t* __restrict__ indices, float* __restrict__ distances, int64_t row,
                                          int metric, float z_sq, float v, int i) {
  indices[row] = i;
  const float dist = metric == kL2 ? z_sq + v : 1.f + 0.5f * v;
  distances[row] = v < pos_inf() ? clamp_dist(dist) : quiet_nan();
}

}  // namespace lgvq
