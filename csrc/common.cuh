// Device helpers shared by the kernels: launch checks, 16-byte half-precision vectors.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "launchers.h"

namespace mome {

inline void check_launch(const char* kernel) {
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) {
    throw std::runtime_error(std::string("mome._C: launching ") + kernel + " failed: " + cudaGetErrorString(error));
  }
}

inline cudaStream_t as_stream(void* stream) { return static_cast<cudaStream_t>(stream); }

constexpr unsigned kFullMask = 0xffffffffu;

// Eight fp16/bf16 values: one 16-byte load or store, converted to/from fp32.
template <typename scalar_t>
struct Pack8;

template <>
struct Pack8<__half> {
  __device__ static void to_float(const uint4& raw, float out[8]) {
    const __half2* pairs = reinterpret_cast<const __half2*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 f = __half22float2(pairs[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  __device__ static __half from_float(float x) { return __float2half_rn(x); }
};

template <>
struct Pack8<__nv_bfloat16> {
  __device__ static void to_float(const uint4& raw, float out[8]) {
    const __nv_bfloat162* pairs = reinterpret_cast<const __nv_bfloat162*>(&raw);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float2 f = __bfloat1622float2(pairs[i]);
      out[2 * i] = f.x;
      out[2 * i + 1] = f.y;
    }
  }
  __device__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
};

// Read-only, streamed once: keep it out of L1 ("evict first" in L2).
__device__ __forceinline__ uint4 load_streaming(const void* address) {
  return __ldcs(reinterpret_cast<const uint4*>(address));
}

}  // namespace mome
