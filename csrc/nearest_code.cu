// Nearest-code search with the argmin fused into the product's epilogue.
//
// score(k) = c_k - 2 z.e_k, with c_k = ||e_k||^2 for l2 and 0 for cos (z and e
// normalised first); the reported distance is max(||z||^2 + score, 0) for l2
// and max(1 + score / 2, 0) = 1 - cos for cos. No N x K tensor exists: each
// block keeps 64 rows of z in shared memory and streams the codebook past them
// in tiles of 64 codes, in increasing code order, keeping a running minimum.
//
// Non-finite values (the rule of lgvq_fast.ops.nearest_code): a score that is
// not finite never wins -- the running minimum starts at +inf and takes a score
// only if it is smaller and above -inf, so NaN, +inf and -inf all lose. A row
// with no finite score (one holding NaN or inf, or every code excluded) keeps
// index 0 and stores distance NaN. Cos norms come from two sums of squares, of x
// and of x * 2^-64 (used where the first overflows), so norms of 1e19 and far
// beyond normalise; a vector whose norm reaches 2^126 counts as non-finite
// (staged as NaN).
//
// Precision. kFast rounds both operands to bf16 (one tensor-core product).
// kExact splits each fp32 operand as x = hi + lo + r with bf16 hi, lo and
// |r| <= 2^-18 |x|, and sums hi.hi + hi.lo + lo.hi (lo.lo <= 2^-18 |z||e| is
// dropped), all accumulated in fp32; so each product z_i e_i carries an error
// of at most ~3 * 2^-18 |z_i e_i| (~1.2e-5) before fp32 accumulation, i.e.
// |score error| <~ 2.4e-5 sum_i |z_i e_i| + the fp32 accumulation error,
// comparable to an fp32 dot product's worst-case bound for D >= 256.
#include "nearest_common.cuh"

namespace lgvq {
namespace {

constexpr int kThreads = 128;         // 4 warps, 16 rows each
constexpr int kBlockN = 64;           // rows of z per block
constexpr int kBlockK = 64;           // codes per tile: 8 n8 fragments per warp
constexpr int kChunk = 64;            // dims of a codebook tile staged at once
constexpr int kBStride = kChunk + 8;  // padded row (bf16): conflict-free fragment loads
constexpr int kPrepWarps = 4;

__host__ __device__ constexpr int a_stride(int dp) { return dp + 8; }

size_t mma_smem_bytes(int dp, bool exact) {
  const size_t arrays = exact ? 2 : 1;
  const size_t a = arrays * kBlockN * a_stride(dp) * sizeof(__nv_bfloat16);
  const size_t b = 2 * arrays * kBlockK * kBStride * sizeof(__nv_bfloat16);
  return a + b + kBlockN * sizeof(float);
}

// One warp per code: ||e||^2 (l2) or inv = 1 / max(||e||, eps) (cos; NaN for a
// code counted as non-finite), fp32 from the fp32 codebook, into e_norm2; and,
// when e_hi is given, the bf16 pieces of e (or of e * inv for cos), zero-padded
// to dp columns so the search kernel never reads past a row.
__global__ void _codebook_prep_kernel(const float* __restrict__ e, int k_codes, int d, int dp, int metric, float eps,
                                      __nv_bfloat16* __restrict__ e_hi, __nv_bfloat16* __restrict__ e_lo,
                                      float* __restrict__ e_norm2) {
  const int code = blockIdx.x * kPrepWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (code >= k_codes) return;
  const float* er = e + static_cast<int64_t>(code) * d;
  float inv = 1.f;
  if (metric == kCos) {
    inv = warp_cos_inv_norm(er, d, true, lane, eps);
    if (lane == 0) e_norm2[code] = inv;
  } else {
    const float sq = warp_sum_squares(er, d, true, lane);
    if (lane == 0) e_norm2[code] = sq;
  }
  if (e_hi == nullptr) return;
  const int64_t base = static_cast<int64_t>(code) * dp;
  for (int c = lane; c < dp; c += 32) {
    const float v = c < d ? er[c] * inv : 0.f;
    __nv_bfloat16 hi, lo;
    split_bf16(v, hi, lo);
    e_hi[base + c] = hi;
    if (e_lo != nullptr) e_lo[base + c] = lo;
  }
}

template <typename ZT, bool EXACT>
__global__ void __launch_bounds__(kThreads) _nearest_code_mma_kernel(
    const ZT* __restrict__ z, int64_t n_rows, int d, int64_t z_stride, int dp, const __nv_bfloat16* __restrict__ e_hi,
    const __nv_bfloat16* __restrict__ e_lo, const float* __restrict__ e_norm2, int k_codes, int metric, float eps,
    int64_t* __restrict__ indices, float* __restrict__ distances) {
  constexpr int kArrays = EXACT ? 2 : 1;
  constexpr int kStageElems = kArrays * kBlockK * kBStride;
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int as = a_stride(dp);
  __nv_bfloat16* a_hi = reinterpret_cast<__nv_bfloat16*>(smem_raw);
  __nv_bfloat16* a_lo = a_hi + kBlockN * as;
  __nv_bfloat16* b_base = a_hi + kArrays * kBlockN * as;
  float* z_sq = reinterpret_cast<float*>(b_base + 2 * kStageElems);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int g = lane / 4;
  const int tig = lane % 4;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kBlockN;

  // Stage this block's rows as bf16 pieces (zero rows past n_rows, zero
  // columns past d); each warp converts its own 16 rows.
  for (int r = warp * 16; r < warp * 16 + 16; ++r) {
    const int64_t row = row0 + r;
    const bool valid = row < n_rows;
    const ZT* zr = z + (valid ? row : 0) * z_stride;
    float inv = 1.f;
    if (metric == kCos) {
      inv = warp_cos_inv_norm(zr, d, valid, lane, eps);
    } else {
      const float sq = warp_sum_squares(zr, d, valid, lane);
      if (lane == 0) z_sq[r] = sq;
    }
    for (int c = lane; c < dp; c += 32) {
      const float v = (valid && c < d) ? to_float(zr[c]) * inv : 0.f;
      __nv_bfloat16 hi, lo;
      split_bf16(v, hi, lo);
      a_hi[r * as + c] = hi;
      if (EXACT) a_lo[r * as + c] = lo;
    }
  }

  const int nchunk = (dp + kChunk - 1) / kChunk;
  const int ntiles = (k_codes + kBlockK - 1) / kBlockK;
  const int nstages = ntiles * nchunk;

  // Stage s = (tile s / nchunk, chunk s % nchunk) into buffer s % 2: codes past
  // k_codes and columns past dp are zero-filled by cp.async (src size 0).
  auto load_stage = [&](int s) {
    const int t = s / nchunk;
    const int k0 = t * kBlockK;
    const int dc = (s - t * nchunk) * kChunk;
    __nv_bfloat16* dst = b_base + (s % 2) * kStageElems;
#pragma unroll
    for (int i = 0; i < kBlockK * kChunk / 8 / kThreads; ++i) {
      const int idx = tid + i * kThreads;
      const int code = idx / (kChunk / 8);
      const int col = dc + (idx % (kChunk / 8)) * 8;
      const bool ok = (k0 + code < k_codes) && (col < dp);
      const int64_t off = ok ? static_cast<int64_t>(k0 + code) * dp + col : 0;
      const int so = code * kBStride + (col - dc);
      cp_async_16(dst + so, e_hi + off, ok ? 16 : 0);
      if (EXACT) cp_async_16(dst + kBlockK * kBStride + so, e_lo + off, ok ? 16 : 0);
    }
    cp_async_commit();
  };

  float acc[8][4];
#pragma unroll
  for (int j = 0; j < 8; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
  // Per thread: running best of rows g (h = 0) and g + 8 (h = 1) over the codes
  // this thread sees, which arrive in increasing order: strict < keeps the lowest.
  float best_v[2] = {pos_inf(), pos_inf()};
  int best_i[2] = {0, 0};
  const int arow = warp * 16 + g;

  load_stage(0);
  for (int s = 0; s < nstages; ++s) {
    if (s + 1 < nstages) {
      load_stage(s + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    // Makes every thread's copies of stage s (and, at s = 0, the A tile) visible.
    __syncthreads();
    const int t = s / nchunk;
    const int dc = (s - t * nchunk) * kChunk;
    const __nv_bfloat16* bh = b_base + (s % 2) * kStageElems;
    const __nv_bfloat16* bl = bh + kBlockK * kBStride;
#pragma unroll
    for (int ks = 0; ks < kChunk / 16; ++ks) {
      if (dc + ks * 16 < dp) {
        const int acol = dc + ks * 16 + tig * 2;
        uint32_t ah[4], al[4];
        ah[0] = lds_u32(a_hi + arow * as + acol);
        ah[1] = lds_u32(a_hi + (arow + 8) * as + acol);
        ah[2] = lds_u32(a_hi + arow * as + acol + 8);
        ah[3] = lds_u32(a_hi + (arow + 8) * as + acol + 8);
        if (EXACT) {
          al[0] = lds_u32(a_lo + arow * as + acol);
          al[1] = lds_u32(a_lo + (arow + 8) * as + acol);
          al[2] = lds_u32(a_lo + arow * as + acol + 8);
          al[3] = lds_u32(a_lo + (arow + 8) * as + acol + 8);
        }
#pragma unroll
        for (int j = 0; j < 8; ++j) {
          const int bo = (j * 8 + g) * kBStride + ks * 16 + tig * 2;
          uint32_t bhf[2] = {lds_u32(bh + bo), lds_u32(bh + bo + 8)};
          if (EXACT) {
            uint32_t blf[2] = {lds_u32(bl + bo), lds_u32(bl + bo + 8)};
            // Small cross terms first, then the large hi.hi term.
            mma_bf16_16816(acc[j], al, bhf);
            mma_bf16_16816(acc[j], ah, blf);
          }
          mma_bf16_16816(acc[j], ah, bhf);
        }
      }
    }
    if (dc + kChunk >= dp) {
      const int k0 = t * kBlockK;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
#pragma unroll
        for (int q = 0; q < 2; ++q) {
          const int code = k0 + j * 8 + tig * 2 + q;
          // Codes past k_codes score +inf and never win (their products are 0).
          const float c = code < k_codes ? (metric == kL2 ? e_norm2[code] : 0.f) : pos_inf();
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const float sc = c - 2.f * acc[j][h * 2 + q];
            if (wins(sc, best_v[h])) {
              best_v[h] = sc;
              best_i[h] = code;
            }
          }
        }
        acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
      }
    }
    // Buffer s % 2 is refilled by the copies issued at iteration s + 1.
    __syncthreads();
  }

  // The 4 threads of a group cover interleaved codes of the same two rows: merge them, then one stores.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float v = best_v[h];
    int i = best_i[h];
    quad_merge(v, i);
    const int r = arow + h * 8;
    const int64_t row = row0 + r;
    // No finite score: i is still 0 (best_i starts at 0 in every thread), the distance is NaN.
    if (tig == 0 && row < n_rows) store_row(indices, distances, row, metric, z_sq[r], v, i);
  }
}

// Independent fp32 path: one thread per row, plain FMA loop over every code.
template <typename ZT>
__global__ void _nearest_code_scalar_kernel(const ZT* __restrict__ z, int64_t n_rows, int d, int64_t z_stride,
                                            const float* __restrict__ e, const float* __restrict__ e_norm2,
                                            int k_codes, int metric, float eps, int64_t* __restrict__ indices,
                                            float* __restrict__ distances) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (row >= n_rows) return;
  const ZT* zr = z + row * z_stride;
  const bool cos = metric == kCos;
  // l2: zsq = ||z||^2. cos: zinv = cos_inv_norm of z.
  float zsq = 0.f, zsq_lo = 0.f;
  for (int c = 0; c < d; ++c) {
    float v = to_float(zr[c]);
    zsq = fmaf(v, v, zsq);
    v *= kTwoM64;
    zsq_lo = fmaf(v, v, zsq_lo);
  }
  const float zinv = cos_inv_norm(zsq, zsq_lo, eps);
  float best = pos_inf();
  int best_k = 0;
  for (int k = 0; k < k_codes; ++k) {
    const float* er = e + static_cast<int64_t>(k) * d;
    float sc;
    if (cos) {
      // e_norm2[k] holds the code's cos_inv_norm: the product of unit vectors cannot overflow.
      const float einv = e_norm2[k];
      float dot = 0.f;
      for (int c = 0; c < d; ++c) dot = fmaf(to_float(zr[c]) * zinv, er[c] * einv, dot);
      sc = -2.f * dot;
    } else {
      float dot = 0.f;
      for (int c = 0; c < d; ++c) dot = fmaf(to_float(zr[c]), er[c], dot);
      sc = e_norm2[k] - 2.f * dot;
    }
    if (wins(sc, best)) {
      best = sc;
      best_k = k;
    }
  }
  indices[row] = best_k;
  const float dist = cos ? 1.f + 0.5f * best : zsq + best;
  distances[row] = best < pos_inf() ? clamp_dist(dist) : quiet_nan();
}

template <typename ZT>
void launch_search(const NearestArgs& a, int dp, bool tensor_cores, cudaStream_t stream) {
  const ZT* z = static_cast<const ZT*>(a.z);
  const int d = static_cast<int>(a.d);
  const int k = static_cast<int>(a.k);
  if (!tensor_cores) {
    const int threads = 128;
    const int64_t blocks = (a.n + threads - 1) / threads;
    _nearest_code_scalar_kernel<ZT><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
        z, a.n, d, a.z_row_stride, a.codebook, a.e_norm2, k, a.metric, a.eps, a.indices, a.distances);
    check_launch("_nearest_code_scalar_kernel");
    return;
  }
  const bool exact = a.algo == kExact;
  const size_t smem = mma_smem_bytes(dp, exact);
  auto kernel = exact ? _nearest_code_mma_kernel<ZT, true> : _nearest_code_mma_kernel<ZT, false>;
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)),
             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  const int64_t blocks = (a.n + kBlockN - 1) / kBlockN;
  kernel<<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
      z, a.n, d, a.z_row_stride, dp, static_cast<const __nv_bfloat16*>(a.e_hi),
      static_cast<const __nv_bfloat16*>(a.e_lo), a.e_norm2, k, a.metric, a.eps, a.indices, a.distances);
  check_launch("_nearest_code_mma_kernel");
}

}  // namespace

int64_t padded_dim(int64_t d) { return (d + 15) / 16 * 16; }

bool nearest_code_uses_tensor_cores(int64_t d, int algo, int device) {
  if (algo == kScalar) return false;
  if (algo == kFastTma) return nearest_code_tma_supported(d, device);
  use_device(device);
  return mma_smem_bytes(static_cast<int>(padded_dim(d)), algo == kExact) <=
         static_cast<size_t>(max_shared_per_block(device));
}

int nearest_code_binary_version(int device) {
  use_device(device);
  cudaFuncAttributes attr;
  check_cuda(cudaFuncGetAttributes(&attr, _nearest_code_mma_kernel<float, true>), "cudaFuncGetAttributes");
  return attr.binaryVersion;
}

void nearest_code(const NearestArgs& a) {
  use_device(a.device);
  if (a.n == 0) return;
  if (a.algo == kFastTma) {
    nearest_code_sm90(a);
    return;
  }
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  const int dp = static_cast<int>(padded_dim(a.d));
  const bool tensor_cores = nearest_code_uses_tensor_cores(a.d, a.algo, a.device);
  const int k = static_cast<int>(a.k);
  const int prep_blocks = (k + kPrepWarps - 1) / kPrepWarps;
  _codebook_prep_kernel<<<prep_blocks, kPrepWarps * 32, 0, stream>>>(
      a.codebook, k, static_cast<int>(a.d), dp, a.metric, a.eps,
      tensor_cores ? static_cast<__nv_bfloat16*>(a.e_hi) : nullptr,
      tensor_cores && a.algo == kExact ? static_cast<__nv_bfloat16*>(a.e_lo) : nullptr, a.e_norm2);
  check_launch("_codebook_prep_kernel");
  switch (a.z_dtype) {
    case kFloat32: launch_search<float>(a, dp, tensor_cores, stream); break;
    case kBFloat16: launch_search<__nv_bfloat16>(a, dp, tensor_cores, stream); break;
    default: launch_search<__half>(a, dp, tensor_cores, stream); break;
  }
}

}  // namespace lgvq
