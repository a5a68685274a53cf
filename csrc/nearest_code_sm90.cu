// Nearest-code search for Hopper (sm_90a): TMA loads, wgmma products, the argmin in registers.
//
// Fast mode (bf16 products, fp32 accumulation and norms), the same scores and rule as the mma.sync kernel of
// nearest_code.cu: score(k) = c_k - 2 z.e_k with c_k = ||e_k||^2 (l2) or 0 (cos, both sides normalised); a
// score that is not finite never wins; ties go to the lowest index; a row with no finite score gets index 0
// and distance NaN.
//
// Why hand-written PTX and not CUTLASS/CuTe: the kernel needs one wgmma shape (m64n128k16, both operands
// K-major from shared memory), one TMA box shape and a two-stage barrier pipeline; the epilogue, which is the
// point of the kernel, keeps a running minimum per accumulator register and has no CUTLASS epilogue
// counterpart. Written directly it is ~300 lines with no build dependency and compiles in seconds, where a
// CuTe sm90 collective adds the CUTLASS headers to the build and minutes to CI's compile.
//
// Layout. Both operands are bf16 copies with rows padded to dp (prep kernel below): D rounded up to 16 or 32
// when D <= 16 or 32, else to a multiple of 64; z [n, dp] and the codebook [k, dp]. They are read in chunks of
// CHUNK = min(dp, 64) dims, each a TMA box of CHUNK dims x 128 rows in the swizzle of its row width (32, 64 or
// 128 bytes), which the wgmma descriptors name. One block owns 128 rows of z and walks every code tile:
//  - warpgroup 0, one thread: the producer. It loads the block's whole z tile once (dp / CHUNK boxes), then
//    code chunks into a ring of kStages buffers, each guarded by a "full" mbarrier (transaction bytes) and an
//    "empty" one (the consumers' release).
//  - warpgroups 1 and 2: consumers, 64 rows each. Per code tile and chunk: CHUNK / 16 wgmma k16 steps
//    accumulate into 64 fp32 registers per thread, one chunk's group left in flight while the next buffer is
//    awaited; after the tile's last chunk each thread folds its registers into a running (score, index) for
//    its two rows. Codes arrive in increasing order, so a strict < keeps the lowest index; the four threads
//    sharing a row merge at the end. While one consumer warpgroup reduces, the other's products run.
// Shared memory: 128 x dp x 2 bytes of z (64 KiB at D = 256) + kStages x 128 x CHUNK x 2 bytes of codes;
// D <= 512. Rows and codes past the tensor ends arrive as zeros; codes past k score +inf through c_k.
#include <cuda.h>
#include <cudaTypedefs.h>

#include <stdexcept>
#include <string>

#include "nearest_common.cuh"

namespace lgvq {
namespace {

constexpr int kRows = 128;         // rows of z per block: two consumer warpgroups of 64
constexpr int kCodes = 128;        // codes per tile: the wgmma n
constexpr int kStages = 4;         // code buffers in flight
constexpr int kThreads = 384;      // producer warpgroup + 2 consumer warpgroups
constexpr int kMaxDim = 512;       // z tile (128 KiB) + code ring (64 KiB) within 227 KiB
constexpr int kPrepWarps = 4;
static_assert(kRows == kCodes, "a z slab and a code buffer have one size");

// Dims per TMA box and per group of wgmma k16 steps: 16, 32 or 64 (32, 64 or 128 bytes per row, each with the
// swizzle of that width). D <= 16 and D <= 32 take one narrow chunk, so small D does not pay for 64-wide
// products; wider D is padded to a multiple of 64.
int chunk_for(int64_t d) { return d <= 16 ? 16 : d <= 32 ? 32 : 64; }

int64_t padded_for(int64_t d) {
  const int c = chunk_for(d);
  return (d + c - 1) / c * c;
}

size_t smem_bytes(int dp, int chunk) {
  // z tile, kStages code buffers, 2 kStages + 1 barriers, and slack to align the tiles to 1024 bytes
  return static_cast<size_t>(kRows) * dp * 2 + static_cast<size_t>(kStages) * kCodes * chunk * 2 + 1024 + 256;
}

// One warp per row: the row's fp32 auxiliary value (l2: ||x||^2; cos: 1 / max(||x||, eps), NaN at or beyond
// 2^126) and its bf16 copy (cos: of x / max(||x||, eps)), zero-padded to dp columns.
template <typename T>
__global__ void _rows_bf16_kernel(const T* __restrict__ x, int64_t rows, int d, int64_t stride, int dp, int metric,
                                  float eps, __nv_bfloat16* __restrict__ out, float* __restrict__ aux) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kPrepWarps + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= rows) return;
  const T* xr = x + row * stride;
  float scale = 1.f;
  if (metric == kCos) {
    scale = warp_cos_inv_norm(xr, d, true, lane, eps);
    if (lane == 0) aux[row] = scale;
  } else {
    const float sq = warp_sum_squares(xr, d, true, lane);
    if (lane == 0) aux[row] = sq;
  }
  __nv_bfloat16* o = out + row * dp;
  for (int c = lane; c < dp; c += 32) o[c] = __float2bfloat16_rn(c < d ? to_float(xr[c]) * scale : 0.f);
}

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define LGVQ_SM90A 1
#endif

#ifdef LGVQ_SM90A
__device__ __forceinline__ void mbar_init(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count));
}

__device__ __forceinline__ void mbar_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}

__device__ __forceinline__ void mbar_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}

__device__ __forceinline__ void mbar_wait(uint64_t* bar, uint32_t parity) {
  // PTX labels are local to the braces, so every inlined copy may use the same one.
  asm volatile(
      "{\n"
      ".reg .pred done;\n"
      "LGVQ_WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
      "@!done bra LGVQ_WAIT;\n"
      "}\n" ::"r"(smem_u32(bar)),
      "r"(parity)
      : "memory");
}

// One 2-D TMA box (x: dims, y: rows) into shared memory, completing on `bar`'s transaction count.
__device__ __forceinline__ void tma_load(void* dst, const CUtensorMap* map, int x, int y, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
      ::"r"(smem_u32(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(x), "r"(y), "r"(smem_u32(bar))
      : "memory");
}

// wgmma shared-memory descriptor of a K-major bf16 tile whose rows are CHUNK elements (2 CHUNK bytes) in the
// swizzle of that width: start address, leading byte offset 16 (unused by the swizzled K-major layouts, by
// convention 1 in 16-byte units), stride byte offset = 8 rows (the swizzle pattern's period), and the swizzle
// mode in bits 62-63 (1: 128B, 2: 64B, 3: 32B). Addresses and offsets in 16-byte units, 14 bits each.
template <int CHUNK>
__device__ __forceinline__ uint64_t smem_desc(const void* p) {
  constexpr uint64_t kMode = CHUNK == 64 ? 1 : CHUNK == 32 ? 2 : 3;
  constexpr uint64_t kStride = 8 * CHUNK * 2;
  const uint64_t addr = smem_u32(p);
  return ((addr & 0x3FFFF) >> 4) | (uint64_t{16 >> 4} << 16) | ((kStride >> 4) << 32) | (kMode << 62);
}

// An empty asm that "reads and writes" every accumulator register: the compiler may not move an access to
// them across it, so reads of the accumulators stay after the wgmma.wait_group that completes them.
__device__ __forceinline__ void fence_accumulators(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d[64] (+)= A[64 x 16] . B[128 x 16]^T, both from shared memory; scale_d = 0 overwrites d.
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], uint64_t a, uint64_t b, int scale_d) {
  asm volatile(
      "{\n"
      ".reg .pred p;\n"
      "setp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "%64, %65, p, 1, 1, 0, 0;\n"
      "}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
      : "l"(a), "l"(b), "r"(scale_d));
}
#endif  // LGVQ_SM90A

template <int CHUNK>
__global__ void __launch_bounds__(kThreads, 1) _nearest_code_wgmma_kernel(
    const __grid_constant__ CUtensorMap z_map, const __grid_constant__ CUtensorMap e_map, int64_t n_rows, int dp,
    int k_codes, int metric, const float* __restrict__ z_aux, const float* __restrict__ e_aux,
    int64_t* __restrict__ indices, float* __restrict__ distances) {
#ifdef LGVQ_SM90A
  constexpr int kSlab = kRows * CHUNK * 2;  // one CHUNK-dim slab of the z tile, and one code buffer
  extern __shared__ unsigned char smem_raw[];
  // Tiles aligned to 1024 bytes, a multiple of every swizzle pattern's period (8 rows): the descriptors'
  // addressing assumes a tile starts on it.
  const uint32_t raw = smem_u32(smem_raw);
  unsigned char* base = smem_raw + (((raw + 1023) & ~1023u) - raw);
  unsigned char* z_tile = base;                                         // nchunk slabs of [128 rows][CHUNK]
  unsigned char* e_ring = z_tile + static_cast<size_t>(kRows) * dp * 2;  // kStages x [128 codes][CHUNK]
  uint64_t* full = reinterpret_cast<uint64_t*>(e_ring + kStages * kSlab);
  uint64_t* empty = full + kStages;
  uint64_t* z_full = empty + kStages;

  const int tid = threadIdx.x;
  const int group = tid / 128;  // 0: producer, 1-2: consumers
  const int nchunk = dp / CHUNK;
  const int ntiles = (k_codes + kCodes - 1) / kCodes;
  const int total = ntiles * nchunk;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kRows;

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(&full[s], 1);
      mbar_init(&empty[s], 256);  // every consumer thread releases
    }
    mbar_init(z_full, 1);
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (group == 0) {
    if (tid != 0) return;
    mbar_expect_tx(z_full, static_cast<uint32_t>(kRows) * dp * 2);
    for (int c = 0; c < nchunk; ++c) {
      tma_load(z_tile + c * kSlab, &z_map, c * CHUNK, static_cast<int>(row0), z_full);
    }
    for (int it = 0; it < total; ++it) {
      const int s = it % kStages;
      if (it >= kStages) mbar_wait(&empty[s], ((it / kStages) - 1) & 1);
      const int t = it / nchunk;
      const int c = it - t * nchunk;
      mbar_expect_tx(&full[s], kSlab);
      tma_load(e_ring + s * kSlab, &e_map, c * CHUNK, t * kCodes, &full[s]);
    }
    return;
  }

  // Consumers: warpgroup w = group - 1 owns rows 64 w .. 64 w + 63 of the block.
  const int w = group - 1;
  const int lt = tid % 128;
  const int warp = lt / 32;
  const int lane = lt % 32;
  const int g = lane / 4;
  const int tig = lane % 4;
  float acc[64];
  float best_v[2] = {pos_inf(), pos_inf()};
  int best_i[2] = {0, 0};
  mbar_wait(z_full, 0);
  int it = 0;
  for (int t = 0; t < ntiles; ++t) {
    int prev = 0;  // the buffer of the previous chunk, released once its products are done
    for (int c = 0; c < nchunk; ++c, ++it) {
      const int s = it % kStages;
      mbar_wait(&full[s], (it / kStages) & 1);
      const unsigned char* a_tile = z_tile + c * kSlab + w * 64 * CHUNK * 2;  // this warpgroup's 64 rows
      const unsigned char* b_tile = e_ring + s * kSlab;
      fence_accumulators(acc);
      asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
      for (int ks = 0; ks < CHUNK / 16; ++ks) {
        // k16 step: 32 bytes further along each row, inside the swizzle atom
        wgmma_m64n128k16(acc, smem_desc<CHUNK>(a_tile + ks * 32), smem_desc<CHUNK>(b_tile + ks * 32),
                         (c > 0 || ks > 0) ? 1 : 0);
      }
      asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
      // This chunk's group stays in flight while the next buffer is awaited; the previous one is done.
      asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
      fence_accumulators(acc);
      if (c > 0) mbar_arrive(&empty[prev]);
      prev = s;
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    fence_accumulators(acc);
    mbar_arrive(&empty[prev]);
    // acc[4 j + 2 h + q]: row g + 8 h of this warp's 16, code 8 j + 2 tig + q of the tile
    const int k0 = t * kCodes;
#pragma unroll
    for (int j = 0; j < kCodes / 8; ++j) {
#pragma unroll
      for (int q = 0; q < 2; ++q) {
        const int code = k0 + j * 8 + tig * 2 + q;
        // Codes past k_codes score +inf and never win (TMA filled them with zeros).
        const float ck = code < k_codes ? (metric == kL2 ? __ldg(e_aux + code) : 0.f) : pos_inf();
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const float sc = ck - 2.f * acc[4 * j + 2 * h + q];
          if (wins(sc, best_v[h])) {
            best_v[h] = sc;
            best_i[h] = code;
          }
        }
      }
    }
  }
  // The 4 threads of a quad hold interleaved codes of the same two rows: merge them, then one stores.
#pragma unroll
  for (int h = 0; h < 2; ++h) {
    float v = best_v[h];
    int i = best_i[h];
    quad_merge(v, i);
    const int64_t row = row0 + w * 64 + warp * 16 + g + 8 * h;
    // No finite score: i is still 0, the distance NaN.
    if (tig == 0 && row < n_rows) store_row(indices, distances, row, metric, z_aux[row], v, i);
  }
#else
  __trap();  // only the sm_90a machine code runs this kernel (the launcher checks the device)
#endif
}

PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static PFN_cuTensorMapEncodeTiled_v12000 fn = nullptr;
  if (fn == nullptr) {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult status;
    check_cuda(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &status),
               "cudaGetDriverEntryPointByVersion(cuTensorMapEncodeTiled)");
    if (status != cudaDriverEntryPointSuccess || p == nullptr) {
      throw std::runtime_error("lgvq_fast._C: the CUDA driver has no cuTensorMapEncodeTiled (needs CUDA 12+)");
    }
    fn = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(p);
  }
  return fn;
}

// A [rows, dp] bf16 row-major tensor read in boxes of `chunk` dims x 128 rows, in the swizzle as wide as a box
// row (32, 64 or 128 bytes), zeros past the end.
CUtensorMap tensor_map(const void* ptr, int64_t rows, int dp, int chunk) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(dp), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(dp) * 2};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(chunk), kRows};
  const cuuint32_t elem_strides[2] = {1, 1};
  const CUtensorMapSwizzle swizzle = chunk == 64   ? CU_TENSOR_MAP_SWIZZLE_128B
                                     : chunk == 32 ? CU_TENSOR_MAP_SWIZZLE_64B
                                                   : CU_TENSOR_MAP_SWIZZLE_32B;
  const CUresult r = tensor_map_encoder()(
      &map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void*>(ptr), dims, strides, box, elem_strides,
      CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (r != CUDA_SUCCESS) {
    throw std::runtime_error("lgvq_fast._C: cuTensorMapEncodeTiled failed with CUresult " + std::to_string(r));
  }
  return map;
}

template <int CHUNK>
void launch_search_sm90(const NearestArgs& a, int dp, cudaStream_t stream) {
  const CUtensorMap z_map = tensor_map(a.z_hi, a.n, dp, CHUNK);
  const CUtensorMap e_map = tensor_map(a.e_hi, a.k, dp, CHUNK);
  const size_t smem = smem_bytes(dp, CHUNK);
  check_cuda(cudaFuncSetAttribute(_nearest_code_wgmma_kernel<CHUNK>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                  static_cast<int>(smem)),
             "cudaFuncSetAttribute(MaxDynamicSharedMemorySize)");
  const int64_t blocks = (a.n + kRows - 1) / kRows;
  _nearest_code_wgmma_kernel<CHUNK><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
      z_map, e_map, a.n, dp, static_cast<int>(a.k), a.metric, a.z_aux, a.e_norm2, a.indices, a.distances);
  check_launch("_nearest_code_wgmma_kernel");
}

template <typename T>
void launch_rows_prep(const T* x, int64_t rows, int d, int64_t stride, int dp, int metric, float eps,
                      __nv_bfloat16* out, float* aux, cudaStream_t stream) {
  const int64_t blocks = (rows + kPrepWarps - 1) / kPrepWarps;
  _rows_bf16_kernel<T><<<static_cast<unsigned>(blocks), kPrepWarps * 32, 0, stream>>>(x, rows, d, stride, dp, metric,
                                                                                     eps, out, aux);
  check_launch("_rows_bf16_kernel");
}

}  // namespace

int64_t tma_padded_dim(int64_t d) { return padded_for(d); }

int64_t tma_max_dim() { return kMaxDim; }

bool nearest_code_tma_supported(int64_t d, int device) {
  use_device(device);
  int major = 0, minor = 0;
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device),
             "cudaDeviceGetAttribute(ComputeCapabilityMajor)");
  check_cuda(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device),
             "cudaDeviceGetAttribute(ComputeCapabilityMinor)");
  // sm_90a machine code runs on compute capability 9.0 only
  return major == 9 && minor == 0 && d <= kMaxDim &&
         smem_bytes(static_cast<int>(padded_for(d)), chunk_for(d)) <=
             static_cast<size_t>(max_shared_per_block(device));
}

void nearest_code_sm90(const NearestArgs& a) {
  if (!nearest_code_tma_supported(a.d, a.device)) {
    throw std::runtime_error("lgvq_fast._C: the TMA/wgmma search needs an sm_90 GPU and d <= " +
                             std::to_string(kMaxDim) + ", got d = " + std::to_string(a.d));
  }
  // TMA coordinates are signed 32-bit
  if (a.n > INT32_MAX || a.k > INT32_MAX) {
    throw std::runtime_error("lgvq_fast._C: the TMA/wgmma search takes n, k < 2^31, got n = " +
                             std::to_string(a.n) + ", k = " + std::to_string(a.k));
  }
  cudaStream_t stream = reinterpret_cast<cudaStream_t>(a.stream);
  const int d = static_cast<int>(a.d);
  const int dp = static_cast<int>(padded_for(a.d));
  auto* z_hi = static_cast<__nv_bfloat16*>(a.z_hi);
  auto* e_hi = static_cast<__nv_bfloat16*>(a.e_hi);
  launch_rows_prep(a.codebook, a.k, d, a.d, dp, a.metric, a.eps, e_hi, a.e_norm2, stream);
  switch (a.z_dtype) {
    case kFloat32:
      launch_rows_prep(static_cast<const float*>(a.z), a.n, d, a.z_row_stride, dp, a.metric, a.eps, z_hi, a.z_aux,
                       stream);
      break;
    case kBFloat16:
      launch_rows_prep(static_cast<const __nv_bfloat16*>(a.z), a.n, d, a.z_row_stride, dp, a.metric, a.eps, z_hi,
                       a.z_aux, stream);
      break;
    default:
      launch_rows_prep(static_cast<const __half*>(a.z), a.n, d, a.z_row_stride, dp, a.metric, a.eps, z_hi, a.z_aux,
                       stream);
      break;
  }
  switch (chunk_for(a.d)) {
    case 16: launch_search_sm90<16>(a, dp, stream); break;
    case 32: launch_search_sm90<32>(a, dp, stream); break;
    default: launch_search_sm90<64>(a, dp, stream); break;
  }
}

}  // namespace lgvq
