// Codebook EMA update in two launches, deterministic (no float atomics).
//
// The caller groups the rows by code (a stable sort of the indices: perm) and
// gives each code's segment [offsets[k], offsets[k+1]). Kernel 1: one block per
// code sums its segment in a fixed order and applies the decay to cluster_size
// and embed_avg. Kernel 2: every block reduces cluster_size to n in the same
// fixed order (so all blocks get bit-identical n), then writes
// embed = embed_avg / ((cluster_size + eps) / (n + K eps) * n).
#include "common.cuh"

namespace lgvq {
namespace {

constexpr int kNormThreads = 256;
constexpr int kNormCodesPerBlock = 32;
constexpr int kNormMaxBlocks = 256;

template <typename ZT>
__global__ void _ema_accumulate_kernel(const ZT* __restrict__ z, int64_t z_stride, int d,
                                       const int64_t* __restrict__ perm, const int64_t* __restrict__ offsets,
                                       float decay, float* __restrict__ cluster_size,
                                       float* __restrict__ embed_avg) {
  const int k = blockIdx.x;
  const int64_t beg = offsets[k];
  const int64_t end = offsets[k + 1];
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    // Four independent partial sums keep four loads in flight; they are
    // combined in a fixed order, so the result depends only on the inputs.
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    int64_t i = beg;
    for (; i + 4 <= end; i += 4) {
      s0 += to_float(z[perm[i] * z_stride + c]);
      s1 += to_float(z[perm[i + 1] * z_stride + c]);
      s2 += to_float(z[perm[i + 2] * z_stride + c]);
      s3 += to_float(z[perm[i + 3] * z_stride + c]);
    }
    for (; i < end; ++i) s0 += to_float(z[perm[i] * z_stride + c]);
    const float sum = (s0 + s1) + (s2 + s3);
    float* ea = embed_avg + static_cast<int64_t>(k) * d + c;
    *ea = decay * *ea + (1.f - decay) * sum;
  }
  if (threadIdx.x == 0) {
    cluster_size[k] = decay * cluster_size[k] + (1.f - decay) * static_cast<float>(end - beg);
  }
}

template <typename ET>
__global__ void __launch_bounds__(kNormThreads)
    _ema_normalize_kernel(const float* __restrict__ cluster_size, const float* __restrict__ embed_avg,
                          ET* __restrict__ embed, int k_codes, int d, float eps) {
  __shared__ double partial[kNormThreads];
  double acc = 0.0;
  for (int i = threadIdx.x; i < k_codes; i += kNormThreads) acc += cluster_size[i];
  partial[threadIdx.x] = acc;
  __syncthreads();
  for (int width = kNormThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) partial[threadIdx.x] += partial[threadIdx.x + width];
    __syncthreads();
  }
  const float n = static_cast<float>(partial[0]);
  const float denom = n + static_cast<float>(k_codes) * eps;
  const int64_t total = static_cast<int64_t>(k_codes) * d;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kNormThreads;
  for (int64_t idx = static_cast<int64_t>(blockIdx.x) * kNormThreads + threadIdx.x; idx < total; idx += stride) {
    const int64_t k = idx / d;
    const float smoothed = (cluster_size[k] + eps) / denom * n;
    // n = 0 (nothing assigned yet) makes every smoothed size 0: keep embed rather than write 0/0
    if (smoothed > 0.f) embed[idx] = from_float<ET>(embed_avg[idx] / smoothed);
  }
}

template <typename ZT>
void launch_accumulate(const EmaArgs& a, cudaStream_t stream) {
  const int d = static_cast<int>(a.d);
  const int threads = d >= 256 ? 256 : (d + 31) / 32 * 32;
  _ema_accumulate_kernel<ZT><<<static_cast<unsigned>(a.k), threads, 0, stream>>>(
      static_cast<const ZT*>(a.z), a.z_row_stride, d, a.perm, a.offsets, a.decay, a.cluster_size, a.embed_avg);
  check_launch("_ema_accumulate_kernel");
}

template <typename ET>
void launch_normalize(const EmaArgs& a, cudaStream_t stream) {
  const int64_t wanted = (a.k + kNormCodesPerBlock - 1) / kNormCodesPerBlock;
  const int blocks = static_cast<int>(wanted < kNormMaxBlocks ? wanted : kNormMaxBlocks);
  _ema_normalize_kernel<ET><<<blocks, kNormThreads, 0, stream>>>(
      a.cluster_size, a.embed_avg, static_cast<ET*>(a.embed), static_cast<int>(a.k), static_cast<int>(a.d), a.eps);
  check_launch("_ema_normalize_kernel");
}

}  // namespace

void ema_update(const EmaArgs& a) {
  use_device(a.device);
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  switch (a.z_dtype) {
    case kFloat32: launch_accumulate<float>(a, stream); break;
    case kBFloat16: launch_accumulate<__nv_bfloat16>(a, stream); break;
    default: launch_accumulate<__half>(a, stream); break;
  }
  switch (a.embed_dtype) {
    case kFloat32: launch_normalize<float>(a, stream); break;
    case kBFloat16: launch_normalize<__nv_bfloat16>(a, stream); break;
    default: launch_normalize<__half>(a, stream); break;
  }
}

}  // namespace lgvq
