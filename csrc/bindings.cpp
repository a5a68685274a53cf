// pybind11 module lgvq_fast._C. It does not link torch: Python passes raw
// device pointers (Tensor.data_ptr()), sizes, dtype codes, the device index and
// the CUDA stream handle. Every argument is checked here and a bad one raises
// ValueError naming it; CUDA failures raise RuntimeError.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <limits>
#include <string>

#include "ops.h"

namespace py = pybind11;

namespace {

constexpr int64_t kMaxInt = std::numeric_limits<int32_t>::max();

void require(bool ok, const char* op, const std::string& msg) {
  if (!ok) throw py::value_error(std::string(op) + ": " + msg);
}

std::string num(int64_t v) { return std::to_string(v); }

void check_ptr(const char* op, const char* name, std::uintptr_t p, size_t align, bool may_be_null) {
  if (p == 0) {
    require(may_be_null, op, std::string(name) + " is a null pointer");
    return;
  }
  require(p % align == 0, op, std::string(name) + " must be " + num(static_cast<int64_t>(align)) +
                                  "-byte aligned, got address " + num(static_cast<int64_t>(p)));
}

size_t dtype_size(const char* op, const char* name, int dtype) {
  require(dtype == lgvq::kFloat32 || dtype == lgvq::kBFloat16 || dtype == lgvq::kFloat16, op,
          std::string(name) + " must be 0 (float32), 1 (bfloat16) or 2 (float16), got " + num(dtype));
  return dtype == lgvq::kFloat32 ? 4 : 2;
}

void check_common(const char* op, int device, std::uintptr_t stream, double eps) {
  (void)stream;
  require(device >= 0, op, "device must be a CUDA device index >= 0, got " + num(device));
  require(eps >= 0.0, op, "eps must be >= 0, got " + std::to_string(eps));
}

void nearest_code_py(std::uintptr_t z, int z_dtype, int64_t n, int64_t d, int64_t z_row_stride,
                     std::uintptr_t codebook, int64_t k, std::uintptr_t e_hi, std::uintptr_t e_lo,
                     std::uintptr_t e_norm2, std::uintptr_t indices, std::uintptr_t distances, int metric, int algo,
                     double eps, int device, std::uintptr_t stream, std::uintptr_t z_hi, std::uintptr_t z_aux) {
  const char* op = "lgvq_fast._C.nearest_code";
  const size_t zsize = dtype_size(op, "z_dtype", z_dtype);
  require(n >= 0, op, "n must be >= 0, got " + num(n));
  require(d >= 1 && d <= kMaxInt, op, "d must be in [1, 2^31), got " + num(d));
  require(k >= 1 && k <= kMaxInt, op, "k must be in [1, 2^31), got " + num(k));
  require(z_row_stride >= d, op, "z_row_stride must be >= d = " + num(d) + ", got " + num(z_row_stride));
  require(metric == lgvq::kL2 || metric == lgvq::kCos, op, "metric must be 0 (l2) or 1 (cos), got " + num(metric));
  require(algo == lgvq::kFast || algo == lgvq::kExact || algo == lgvq::kScalar || algo == lgvq::kFastTma, op,
          "algo must be 0 (fast), 1 (exact), 2 (scalar) or 3 (fast_tma), got " + num(algo));
  const bool tma = algo == lgvq::kFastTma;
  require(!tma || d <= lgvq::tma_max_dim(), op,
          "algo 3 (fast_tma) takes d <= " + num(lgvq::tma_max_dim()) + ", got " + num(d));
  require(!tma || n <= kMaxInt, op, "algo 3 (fast_tma) takes n < 2^31 (TMA coordinates), got " + num(n));
  check_common(op, device, stream, eps);
  const bool empty = n == 0;
  check_ptr(op, "z", z, zsize, empty);
  check_ptr(op, "codebook", codebook, 4, false);
  check_ptr(op, "e_hi", e_hi, 16, algo == lgvq::kScalar);
  check_ptr(op, "e_lo", e_lo, 16, algo != lgvq::kExact);
  check_ptr(op, "e_norm2", e_norm2, 4, false);
  check_ptr(op, "indices", indices, 8, empty);
  check_ptr(op, "distances", distances, 4, empty);
  check_ptr(op, "z_hi", z_hi, 16, !tma || empty);
  check_ptr(op, "z_aux", z_aux, 4, !tma || empty);
  lgvq::NearestArgs a;
  a.z = reinterpret_cast<const void*>(z);
  a.z_dtype = z_dtype;
  a.n = n;
  a.d = d;
  a.z_row_stride = z_row_stride;
  a.codebook = reinterpret_cast<const float*>(codebook);
  a.k = k;
  a.e_hi = reinterpret_cast<void*>(e_hi);
  a.e_lo = reinterpret_cast<void*>(e_lo);
  a.e_norm2 = reinterpret_cast<float*>(e_norm2);
  a.z_hi = reinterpret_cast<void*>(z_hi);
  a.z_aux = reinterpret_cast<float*>(z_aux);
  a.indices = reinterpret_cast<int64_t*>(indices);
  a.distances = reinterpret_cast<float*>(distances);
  a.metric = metric;
  a.algo = algo;
  a.eps = static_cast<float>(eps);
  a.device = device;
  a.stream = stream;
  lgvq::nearest_code(a);
}

void ema_update_py(std::uintptr_t cluster_size, std::uintptr_t embed_avg, std::uintptr_t embed, int embed_dtype,
                   int64_t k, int64_t d,
                   std::uintptr_t z, int z_dtype, int64_t n, int64_t z_row_stride, std::uintptr_t perm,
                   std::uintptr_t offsets, double decay, double eps, int device, std::uintptr_t stream) {
  const char* op = "lgvq_fast._C.ema_update";
  const size_t zsize = dtype_size(op, "z_dtype", z_dtype);
  const size_t esize = dtype_size(op, "embed_dtype", embed_dtype);
  require(k >= 1 && k <= kMaxInt, op, "k must be in [1, 2^31), got " + num(k));
  require(d >= 1 && d <= kMaxInt, op, "d must be in [1, 2^31), got " + num(d));
  require(n >= 0, op, "n must be >= 0, got " + num(n));
  require(z_row_stride >= d, op, "z_row_stride must be >= d = " + num(d) + ", got " + num(z_row_stride));
  require(decay >= 0.0 && decay <= 1.0, op, "decay must be in [0, 1], got " + std::to_string(decay));
  check_common(op, device, stream, eps);
  const bool empty = n == 0;
  check_ptr(op, "cluster_size", cluster_size, 4, false);
  check_ptr(op, "embed_avg", embed_avg, 4, false);
  check_ptr(op, "embed", embed, esize, false);
  check_ptr(op, "z", z, zsize, empty);
  check_ptr(op, "perm", perm, 8, empty);
  check_ptr(op, "offsets", offsets, 8, false);
  lgvq::EmaArgs a;
  a.cluster_size = reinterpret_cast<float*>(cluster_size);
  a.embed_avg = reinterpret_cast<float*>(embed_avg);
  a.embed = reinterpret_cast<void*>(embed);
  a.embed_dtype = embed_dtype;
  a.k = k;
  a.d = d;
  a.z = reinterpret_cast<const void*>(z);
  a.z_dtype = z_dtype;
  a.n = n;
  a.z_row_stride = z_row_stride;
  a.perm = reinterpret_cast<const int64_t*>(perm);
  a.offsets = reinterpret_cast<const int64_t*>(offsets);
  a.decay = static_cast<float>(decay);
  a.eps = static_cast<float>(eps);
  a.device = device;
  a.stream = stream;
  lgvq::ema_update(a);
}

bool uses_tensor_cores_py(int64_t d, int algo, int device) {
  const char* op = "lgvq_fast._C.nearest_code_uses_tensor_cores";
  require(d >= 1 && d <= kMaxInt, op, "d must be in [1, 2^31), got " + num(d));
  require(device >= 0, op, "device must be a CUDA device index >= 0, got " + num(device));
  return lgvq::nearest_code_uses_tensor_cores(d, algo, device);
}

bool tma_supported_py(int64_t d, int device) {
  const char* op = "lgvq_fast._C.nearest_code_tma_supported";
  require(d >= 1 && d <= kMaxInt, op, "d must be in [1, 2^31), got " + num(d));
  require(device >= 0, op, "device must be a CUDA device index >= 0, got " + num(device));
  return lgvq::nearest_code_tma_supported(d, device);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lgvq_fast CUDA kernels (nearest-code search, codebook EMA update); called through lgvq_fast._cuda";
  m.def("nearest_code", &nearest_code_py, py::arg("z"), py::arg("z_dtype"), py::arg("n"), py::arg("d"),
        py::arg("z_row_stride"), py::arg("codebook"), py::arg("k"), py::arg("e_hi"), py::arg("e_lo"),
        py::arg("e_norm2"), py::arg("indices"), py::arg("distances"), py::arg("metric"), py::arg("algo"),
        py::arg("eps"), py::arg("device"), py::arg("stream"), py::arg("z_hi") = 0, py::arg("z_aux") = 0);
  m.def("ema_update", &ema_update_py, py::arg("cluster_size"), py::arg("embed_avg"), py::arg("embed"),
        py::arg("embed_dtype"), py::arg("k"), py::arg("d"), py::arg("z"), py::arg("z_dtype"), py::arg("n"),
        py::arg("z_row_stride"), py::arg("perm"), py::arg("offsets"), py::arg("decay"), py::arg("eps"),
        py::arg("device"), py::arg("stream"));
  m.def("padded_dim", &lgvq::padded_dim, py::arg("d"), "Row length (multiple of 16) of the bf16 codebook workspaces.");
  m.def("tma_padded_dim", &lgvq::tma_padded_dim, py::arg("d"),
        "Row length (16, 32 or a multiple of 64) of the bf16 workspaces of algo 3 (fast_tma).");
  m.def("tma_max_dim", &lgvq::tma_max_dim, "The largest d algo 3 (fast_tma) takes.");
  m.def("nearest_code_tma_supported", &tma_supported_py, py::arg("d"), py::arg("device"),
        "Whether algo 3 (fast_tma) runs for this d on `device` (compute capability 9.0; needs a GPU).");
  m.def("nearest_code_uses_tensor_cores", &uses_tensor_cores_py, py::arg("d"), py::arg("algo"), py::arg("device"));
  m.def("nearest_code_binary_version", &lgvq::nearest_code_binary_version, py::arg("device"),
        "Compute capability of the machine code the driver loads for the search kernel (needs a GPU).");
  m.def("cuda_runtime_version", &lgvq::cuda_runtime_version, "CUDART_VERSION of the linked static runtime.");
  m.def("compiled_archs", &lgvq::compiled_archs, "Machine-code targets compiled in, e.g. ['sm_90a', 'sm_80'].");
  m.attr("DTYPE_CODES") = py::dict(py::arg("float32") = 0, py::arg("bfloat16") = 1, py::arg("float16") = 2);
  m.attr("METRIC_CODES") = py::dict(py::arg("l2") = 0, py::arg("cos") = 1);
  m.attr("ALGO_CODES") = py::dict(py::arg("fast") = 0, py::arg("exact") = 1, py::arg("scalar") = 2,
                                  py::arg("fast_tma") = 3);
}
