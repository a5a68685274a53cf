// Host-side CUDA helpers: error checks, device selection, device limits, build info.
#include <stdexcept>
#include <string>

#include "common.cuh"

namespace lgvq {

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("lgvq_fast._C: ") + what + " failed: " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

void check_launch(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("lgvq_fast._C: launch of ") + kernel + " failed: " + cudaGetErrorName(err) +
                             ": " + cudaGetErrorString(err));
  }
}

void use_device(int device) { check_cuda(cudaSetDevice(device), "cudaSetDevice"); }

int max_shared_per_block(int device) {
  int bytes = 0;
  check_cuda(cudaDeviceGetAttribute(&bytes, cudaDevAttrMaxSharedMemoryPerBlockOptin, device),
             "cudaDeviceGetAttribute(MaxSharedMemoryPerBlockOptin)");
  return bytes;
}

int cuda_runtime_version() {
  // CUDART_VERSION: the static runtime linked in, so no driver call is needed.
  return CUDART_VERSION;
}

std::vector<std::string> compiled_archs() {
  std::vector<std::string> out;
  std::string list = LGVQ_FAST_CUDA_ARCHS;
  size_t start = 0;
  while (start <= list.size()) {
    const size_t end = list.find(',', start);
    const std::string item = list.substr(start, end == std::string::npos ? std::string::npos : end - start);
    if (!item.empty()) out.push_back(item);
    if (end == std::string::npos) break;
    start = end + 1;
  }
  return out;
}

}  // namespace lgvq
