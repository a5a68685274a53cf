// Host entry points of the CUDA kernels. Plain C++ (no CUDA headers), so the
// pybind11 bindings compile with the host compiler alone. Every entry takes
// raw device pointers; the bindings validate them before calling. CUDA errors
// are thrown as std::runtime_error (RuntimeError in Python).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace lgvq {

enum DType : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };
enum Metric : int { kL2 = 0, kCos = 1 };
// kFast: bf16 tensor-core products; kExact: split-bf16 (3 products) tensor-core
// products; kScalar: plain fp32 FMA loop (validation path); kFastTma: kFast's
// products through TMA loads and wgmma (sm_90 only, d <= tma_max_dim()).
enum Algo : int { kFast = 0, kExact = 1, kScalar = 2, kFastTma = 3 };

struct NearestArgs {
  const void* z;           // [n, d] rows z_row_stride elements apart, dtype z_dtype
  int z_dtype;
  int64_t n;
  int64_t d;
  int64_t z_row_stride;
  const float* codebook;   // [k, d] fp32 contiguous
  int64_t k;
  void* e_hi;              // [k, padded_dim(d)] bf16 workspace (kFast, kExact); [k, tma_padded_dim(d)] (kFastTma)
  void* e_lo;              // [k, padded_dim(d)] bf16 workspace (kExact)
  float* e_norm2;          // [k] fp32 workspace
  void* z_hi;              // [n, tma_padded_dim(d)] bf16 workspace (kFastTma)
  float* z_aux;            // [n] fp32 workspace (kFastTma)
  int64_t* indices;        // [n] out
  float* distances;        // [n] out
  int metric;
  int algo;
  float eps;
  int device;
  std::uintptr_t stream;
};

struct EmaArgs {
  float* cluster_size;     // [k] in/out
  float* embed_avg;        // [k, d] in/out
  void* embed;             // [k, d] out, dtype embed_dtype
  int embed_dtype;
  int64_t k;
  int64_t d;
  const void* z;           // [n, d] rows z_row_stride elements apart, dtype z_dtype
  int z_dtype;
  int64_t n;
  int64_t z_row_stride;
  const int64_t* perm;     // [n] row order grouping equal codes, ascending code
  const int64_t* offsets;  // [k + 1] segment bounds of each code in perm
  float decay;
  float eps;
  int device;
  std::uintptr_t stream;
};

int64_t padded_dim(int64_t d);
void nearest_code(const NearestArgs& args);
// kFastTma (nearest_code_sm90.cu): row length (16, 32 or a multiple of 64) of its bf16 workspaces, the
// largest d it takes, whether `device` runs it (compute capability 9.0, d within the limit), the search.
int64_t tma_padded_dim(int64_t d);
int64_t tma_max_dim();
bool nearest_code_tma_supported(int64_t d, int device);
void nearest_code_sm90(const NearestArgs& args);
// True when nearest_code with this d/algo runs on tensor cores on `device`
// (false: the shared-memory tile does not fit and the fp32 loop runs instead).
bool nearest_code_uses_tensor_cores(int64_t d, int algo, int device);
// Compute capability of the machine code the driver picked for the tensor-core
// kernel on `device` (e.g. 90 for sm_90a); needs a GPU.
int nearest_code_binary_version(int device);
void ema_update(const EmaArgs& args);
int cuda_runtime_version();
std::vector<std::string> compiled_archs();

}  // namespace lgvq
