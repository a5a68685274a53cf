// Device helpers shared by the kernels: dtype conversion, bf16 splitting,
// the m16n8k16 bf16 tensor-core product, cp.async copies.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "ops.h"

namespace lgvq {

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }

// fp32 x = hi + lo + r with hi = bf16(x), lo = bf16(x - hi): |x - hi| <= 2^-9 |x|
// and |r| <= 2^-9 |x - hi| <= 2^-18 |x| (round to nearest both times).
__device__ __forceinline__ void split_bf16(float x, __nv_bfloat16& hi, __nv_bfloat16& lo) {
  hi = __float2bfloat16_rn(x);
  lo = __float2bfloat16_rn(x - __bfloat162float(hi));
}

// D += A * B for one m16n8k16 tile: A row-major 16x16 bf16 (4 regs), B
// "col" 16x8 bf16 (2 regs), D 16x8 fp32 (4 regs). Fragment layouts are the
// PTX ISA's (groupID = lane / 4, tig = lane % 4):
//   a[0]: row g,   k 2tig..2tig+1     a[1]: row g+8, k 2tig..2tig+1
//   a[2]: row g,   k 2tig+8..+9       a[3]: row g+8, k 2tig+8..+9
//   b[0]: k 2tig..2tig+1, col g       b[1]: k 2tig+8..+9, col g
//   d[0], d[1]: row g, cols 2tig, 2tig+1;  d[2], d[3]: row g+8, same cols
__device__ __forceinline__ void mma_bf16_16816(float d[4], const uint32_t a[4], const uint32_t b[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
      "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; src_bytes = 0 writes zeros and reads nothing.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(src_bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ uint32_t lds_u32(const __nv_bfloat16* p) {
  return *reinterpret_cast<const uint32_t*>(p);
}

}  // namespace lgvq

namespace lgvq {

constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float pos_inf() { return __int_as_float(0x7f800000); }

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) x += __shfl_xor_sync(kFullMask, x, off);
  return x;
}

void check_cuda(cudaError_t err, const char* what);
// Raises when the launch just issued failed (bad configuration, missing machine code).
void check_launch(const char* kernel);
// Sets the calling thread's device for this module's CUDA runtime (the module
// links its own static runtime, so this does not move torch's current device).
void use_device(int device);
int max_shared_per_block(int device);

}  // namespace lgvq
