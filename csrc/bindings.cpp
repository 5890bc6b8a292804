// pybind11 module mome._C: the CUDA launchers behind plain integers (device pointers, sizes, the
// stream handle), so the module has no link to torch and imports without a GPU. mome/cuda wraps
// each function in a torch custom op that checks and allocates the tensors.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "build_info.h"
#include "launchers.h"

namespace py = pybind11;

namespace {

template <typename T>
T* pointer(std::uintptr_t address) {
  return reinterpret_cast<T*>(address);
}

void* stream_of(std::uintptr_t handle) { return reinterpret_cast<void*>(handle); }

void modality_routing(std::uintptr_t perm, std::uintptr_t inv_perm, std::uintptr_t offsets,
                      std::uintptr_t workspace, std::uintptr_t modality, std::int64_t tokens, int experts,
                      std::uintptr_t stream) {
  py::gil_scoped_release unlocked;
  mome::modality_routing(pointer<std::int32_t>(perm), pointer<std::int32_t>(inv_perm), pointer<std::int32_t>(offsets),
                         pointer<std::int32_t>(workspace), pointer<const std::int64_t>(modality), tokens, experts,
                         stream_of(stream));
}

void decode_attention_fwd(std::uintptr_t out, std::uintptr_t partial_out, std::uintptr_t partial_lse,
                          std::uintptr_t q, std::uintptr_t k_cache, std::uintptr_t v_cache,
                          std::uintptr_t cache_seqlens, int batch, int heads, int kv_heads, int nmax, int head_dim,
                          int num_splits, float scale, bool bfloat16, std::uintptr_t stream) {
  mome::DecodeParams params;
  params.out = pointer<void>(out);
  params.partial_out = pointer<float>(partial_out);
  params.partial_lse = pointer<float>(partial_lse);
  params.q = pointer<const void>(q);
  params.k_cache = pointer<const void>(k_cache);
  params.v_cache = pointer<const void>(v_cache);
  params.cache_seqlens = pointer<const std::int32_t>(cache_seqlens);
  params.batch = batch;
  params.heads = heads;
  params.kv_heads = kv_heads;
  params.nmax = nmax;
  params.head_dim = head_dim;
  params.num_splits = num_splits;
  params.scale = scale;
  params.dtype = bfloat16 ? mome::HalfType::kBFloat16 : mome::HalfType::kFloat16;
  py::gil_scoped_release unlocked;
  mome::decode_attention_fwd(params, stream_of(stream));
}

py::dict build_info() {
  py::dict info;
  info["archs"] = MOME_CUDA_ARCHS;
  info["nvcc"] = MOME_NVCC_VERSION;
  int cudart = mome::cudart_build_version();
  info["cudart"] = std::to_string(cudart / 1000) + "." + std::to_string(cudart % 1000 / 10);
  info["pybind11"] = std::to_string(PYBIND11_VERSION_MAJOR) + "." + std::to_string(PYBIND11_VERSION_MINOR) + "." +
                     std::to_string(PYBIND11_VERSION_PATCH);
  info["compiler"] = __VERSION__;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, module) {
  module.doc() = "mome CUDA kernels (raw device pointers in; see mome.cuda for the tensor API)";
  module.attr("ABI_VERSION") = mome::kAbiVersion;
  module.attr("ROUTING_MAX_EXPERTS") = mome::kRoutingMaxExperts;
  module.attr("DECODE_MAX_SPLITS") = mome::kDecodeMaxSplits;
  module.def("build_info", &build_info, "archs, nvcc, cudart, pybind11 and host compiler versions of this build");
  module.def("device_check", &mome::device_check,
             "'' when the current CUDA device can run these kernels, else the reason it cannot");
  module.def("routing_workspace_elems", &mome::routing_workspace_elems, py::arg("tokens"), py::arg("experts"));
  module.def("modality_routing", &modality_routing, py::arg("perm"), py::arg("inv_perm"), py::arg("offsets"),
             py::arg("workspace"), py::arg("modality"), py::arg("tokens"), py::arg("experts"), py::arg("stream"));
  module.def("decode_supports_head_dim", &mome::decode_supports_head_dim, py::arg("head_dim"));
  module.def("decode_attention_fwd", &decode_attention_fwd, py::arg("out"), py::arg("partial_out"),
             py::arg("partial_lse"), py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_seqlens"),
             py::arg("batch"), py::arg("heads"), py::arg("kv_heads"), py::arg("nmax"), py::arg("head_dim"),
             py::arg("num_splits"), py::arg("scale"), py::arg("bfloat16"), py::arg("stream"));
}
