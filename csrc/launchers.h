// Host API of the CUDA kernels: plain C++ types only, so bindings.cpp needs no CUDA headers.
// Pointers are device addresses; `stream` is a cudaStream_t (torch's current stream).
// Every launcher throws std::runtime_error when a launch fails.
#pragma once

#include <cstdint>
#include <string>

namespace mome {

// Bumped whenever a launcher's arguments change; mome/cuda checks it before using the module.
constexpr int kAbiVersion = 1;

enum class HalfType : int { kFloat16 = 0, kBFloat16 = 1 };

// ---- modality routing ------------------------------------------------------------------------
constexpr int kRoutingMaxExperts = 256;

// int32 elements of scratch that modality_routing needs for `tokens` tokens and `experts` experts.
int64_t routing_workspace_elems(int64_t tokens, int experts);

// Stable counting sort of token positions by modality id (int64, in [0, experts); ids out of range
// are clamped to stay memory-safe). Writes perm (tokens,), inv_perm (tokens,), offsets (experts+1,).
void modality_routing(int32_t* perm, int32_t* inv_perm, int32_t* offsets, int32_t* workspace,
                      const int64_t* modality, int64_t tokens, int experts, void* stream);

// ---- decode attention ------------------------------------------------------------------------
constexpr int kDecodeMaxSplits = 128;

struct DecodeParams {
  void* out;             // (B, H, D), q's dtype
  float* partial_out;    // (B, H, S, D) fp32, unused when num_splits == 1
  float* partial_lse;    // (B, H, S) fp32 log2-sum-exp2 of each split, unused when num_splits == 1
  const void* q;         // (B, H, D)
  const void* k_cache;   // (B, Hkv, Nmax, D)
  const void* v_cache;   // (B, Hkv, Nmax, D)
  const int32_t* cache_seqlens;  // (B,)
  int batch, heads, kv_heads, nmax, head_dim, num_splits;
  float scale;
  HalfType dtype;
};

bool decode_supports_head_dim(int head_dim);
void decode_attention_fwd(const DecodeParams& params, void* stream);

// ---- device and build facts ------------------------------------------------------------------
// "" when the current device can run this module's kernels, else the reason it cannot.
std::string device_check();
int cudart_build_version();

}  // namespace mome
