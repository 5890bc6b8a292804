// Can the current device run this module? Driver version and kernel-image checks, asked before
// the first launch so that a mismatch becomes a reason to fall back instead of a failed launch.
#include "common.cuh"

namespace mome {
namespace {

__global__ void probe_kernel() {}

}  // namespace

int cudart_build_version() { return CUDART_VERSION; }

std::string device_check() {
  int driver = 0;
  cudaError_t error = cudaDriverGetVersion(&driver);
  if (error != cudaSuccess || driver == 0) {
    cudaGetLastError();
    return "no CUDA driver is loaded on this machine";
  }
  if (driver < CUDART_VERSION) {
    return "the CUDA driver supports CUDA " + std::to_string(driver / 1000) + "." + std::to_string(driver % 1000 / 10) +
           " but mome._C was built with CUDA " + std::to_string(CUDART_VERSION / 1000) + "." +
           std::to_string(CUDART_VERSION % 1000 / 10) + ": update the driver or rebuild with an older toolkit";
  }
  int device = 0;
  cudaDeviceProp properties;
  error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaGetDeviceProperties(&properties, device);
  if (error != cudaSuccess) {
    cudaGetLastError();
    return std::string("cannot query the current CUDA device: ") + cudaGetErrorString(error);
  }
  cudaFuncAttributes attributes;
  error = cudaFuncGetAttributes(&attributes, probe_kernel);
  if (error != cudaSuccess) {
    cudaGetLastError();
    return "mome._C has no kernel image for " + std::string(properties.name) + " (sm_" +
           std::to_string(properties.major) + std::to_string(properties.minor) + "); rebuild with MOME_CUDA_ARCHS=" +
           std::to_string(properties.major) + std::to_string(properties.minor) + " (" + cudaGetErrorString(error) + ")";
  }
  return "";
}

}  // namespace mome
