// Modality routing metadata: a stable counting sort of token positions by expert id.
//
// perm[k] = original index of the k-th token in expert-sorted order (ties keep token order),
// inv_perm[t] = sorted position of token t, offsets[e] = first sorted position of expert e,
// offsets[E] = T. Everything stays on the device: no host sync.
//
// Stable ranks come from warps: __match_any_sync groups the lanes holding the same expert,
// popc of the lower peers is a lane's rank inside its warp; per-warp counts in shared memory
// are scanned across warps (warp order = token order), then across chunks and blocks.
//
// Small T (<= kSingleBlockMaxTokens): one block counts, scans and scatters (one launch).
// Large T: (1) count per block tile, (2) one block scans the expert-major (E x blocks) count
// table in place (its exclusive scan is exactly each block's base position per expert),
// (3) each block scatters its tile from those bases.
#include "common.cuh"

namespace mome {
namespace {

constexpr int kTileThreads = 256;
constexpr int kTileTokens = 4096;
constexpr int kSingleBlockThreads = 1024;
constexpr int kSingleBlockMaxTokens = 16384;
constexpr int kScanThreads = 1024;

__device__ __forceinline__ int expert_of(const int64_t* modality, int64_t token, int experts) {
  int64_t id = modality[token];
  return id < 0 ? 0 : (id >= experts ? experts - 1 : static_cast<int>(id));
}

// Lanes holding the same expert (invalid lanes hold -1 and only match each other) and this lane's
// rank among them.
__device__ __forceinline__ unsigned peers_of(int expert, int& rank) {
  unsigned peers = __match_any_sync(kFullMask, expert);
  unsigned lower = (1u << (threadIdx.x & 31)) - 1u;
  rank = __popc(peers & lower);
  return peers;
}

// Adds this chunk's per-expert counts (one token per thread) to counts[E] in shared memory.
__device__ __forceinline__ void count_chunk(int* counts, const int64_t* modality, int64_t token, bool valid,
                                            int experts) {
  int expert = valid ? expert_of(modality, token, experts) : -1;
  int rank;
  unsigned peers = peers_of(expert, rank);
  if (valid && rank == 0) atomicAdd(&counts[expert], __popc(peers));
}

// Scatters one chunk (one token per thread, in token order) and advances next[e], the next free
// sorted position of each expert. warp_slots holds (THREADS / 32) x E ints of shared memory.
template <int THREADS>
__device__ void scatter_chunk(int32_t* perm, int32_t* inv_perm, const int64_t* modality, int64_t token,
                              bool valid, int experts, int* warp_slots, int* next) {
  constexpr int kWarps = THREADS / 32;
  const int warp = threadIdx.x / 32;
  for (int i = threadIdx.x; i < kWarps * experts; i += THREADS) warp_slots[i] = 0;
  __syncthreads();
  int expert = valid ? expert_of(modality, token, experts) : -1;
  int rank;
  unsigned peers = peers_of(expert, rank);
  if (valid && rank == 0) warp_slots[warp * experts + expert] = __popc(peers);
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += THREADS) {  // counts -> first position, in warp order
    int position = next[e];
    for (int w = 0; w < kWarps; ++w) {
      int count = warp_slots[w * experts + e];
      warp_slots[w * experts + e] = position;
      position += count;
    }
    next[e] = position;
  }
  __syncthreads();
  if (valid) {
    int position = warp_slots[warp * experts + expert] + rank;
    perm[position] = static_cast<int32_t>(token);
    inv_perm[token] = position;
  }
  __syncthreads();  // warp_slots is reused by the next chunk
}

__global__ void __launch_bounds__(kSingleBlockThreads)
    routing_single_block_kernel(int32_t* perm, int32_t* inv_perm, int32_t* offsets, const int64_t* modality,
                                int tokens, int experts) {
  extern __shared__ int shared[];
  int* counts = shared;                  // [E]
  int* next = shared + experts;          // [E]
  int* warp_slots = shared + 2 * experts;  // [warps, E]
  for (int e = threadIdx.x; e < experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  for (int start = 0; start < tokens; start += kSingleBlockThreads) {
    int token = start + threadIdx.x;
    count_chunk(counts, modality, token, token < tokens, experts);
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    int position = 0;
    for (int e = 0; e < experts; ++e) {
      next[e] = position;
      offsets[e] = position;
      position += counts[e];
    }
    offsets[experts] = position;
  }
  __syncthreads();
  for (int start = 0; start < tokens; start += kSingleBlockThreads) {
    int token = start + threadIdx.x;
    scatter_chunk<kSingleBlockThreads>(perm, inv_perm, modality, token, token < tokens, experts, warp_slots, next);
  }
}

// block_counts is expert-major: block_counts[e * blocks + b].
__global__ void __launch_bounds__(kTileThreads)
    routing_count_kernel(int32_t* block_counts, const int64_t* modality, int64_t tokens, int experts) {
  extern __shared__ int counts[];  // [E]
  for (int e = threadIdx.x; e < experts; e += blockDim.x) counts[e] = 0;
  __syncthreads();
  const int64_t tile_start = static_cast<int64_t>(blockIdx.x) * kTileTokens;
  for (int i = 0; i < kTileTokens; i += kTileThreads) {
    int64_t token = tile_start + i + threadIdx.x;
    count_chunk(counts, modality, token, token < tokens, experts);
  }
  __syncthreads();
  for (int e = threadIdx.x; e < experts; e += blockDim.x) block_counts[e * gridDim.x + blockIdx.x] = counts[e];
}

// In-place exclusive scan of block_counts (length E * blocks) by one block; writes offsets.
__global__ void __launch_bounds__(kScanThreads)
    routing_scan_kernel(int32_t* block_counts, int32_t* offsets, int blocks, int experts) {
  __shared__ int warp_totals[kScanThreads / 32];
  __shared__ int carry;
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const int64_t length = static_cast<int64_t>(blocks) * experts;
  if (threadIdx.x == 0) carry = 0;
  __syncthreads();
  for (int64_t start = 0; start < length; start += kScanThreads) {
    int64_t index = start + threadIdx.x;
    int value = index < length ? block_counts[index] : 0;
    int inclusive = value;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      int other = __shfl_up_sync(kFullMask, inclusive, offset);
      if (lane >= offset) inclusive += other;
    }
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      int total = warp_totals[lane];
#pragma unroll
      for (int offset = 1; offset < 32; offset *= 2) {
        int other = __shfl_up_sync(kFullMask, total, offset);
        if (lane >= offset) total += other;
      }
      warp_totals[lane] = total;  // inclusive over warps
    }
    __syncthreads();
    int before = (warp == 0 ? 0 : warp_totals[warp - 1]) + carry;
    if (index < length) block_counts[index] = before + inclusive - value;
    __syncthreads();
    if (threadIdx.x == 0) carry += warp_totals[kScanThreads / 32 - 1];
    __syncthreads();
  }
  for (int e = threadIdx.x; e < experts; e += blockDim.x) offsets[e] = block_counts[static_cast<int64_t>(e) * blocks];
  if (threadIdx.x == 0) offsets[experts] = carry;
}

__global__ void __launch_bounds__(kTileThreads)
    routing_scatter_kernel(int32_t* perm, int32_t* inv_perm, const int32_t* block_bases, const int64_t* modality,
                           int64_t tokens, int experts) {
  extern __shared__ int shared[];
  int* next = shared;                // [E]
  int* warp_slots = shared + experts;  // [warps, E]
  for (int e = threadIdx.x; e < experts; e += blockDim.x) next[e] = block_bases[e * gridDim.x + blockIdx.x];
  __syncthreads();
  const int64_t tile_start = static_cast<int64_t>(blockIdx.x) * kTileTokens;
  if (tile_start >= tokens) return;
  const int64_t tile_end = tile_start + kTileTokens < tokens ? tile_start + kTileTokens : tokens;
  for (int64_t start = tile_start; start < tile_end; start += kTileThreads) {
    int64_t token = start + threadIdx.x;
    scatter_chunk<kTileThreads>(perm, inv_perm, modality, token, token < tile_end, experts, warp_slots, next);
  }
}

int64_t tile_blocks(int64_t tokens) { return (tokens + kTileTokens - 1) / kTileTokens; }

}  // namespace

int64_t routing_workspace_elems(int64_t tokens, int experts) {
  return tokens <= kSingleBlockMaxTokens ? 0 : tile_blocks(tokens) * experts;
}

void modality_routing(int32_t* perm, int32_t* inv_perm, int32_t* offsets, int32_t* workspace,
                      const int64_t* modality, int64_t tokens, int experts, void* stream_handle) {
  if (experts < 1 || experts > kRoutingMaxExperts) {
    throw std::invalid_argument("mome._C.modality_routing: experts must be in [1, 256], got " +
                                std::to_string(experts));
  }
  if (tokens < 0 || tokens > INT32_MAX) {
    throw std::invalid_argument("mome._C.modality_routing: tokens must be in [0, 2^31), got " +
                                std::to_string(tokens));
  }
  cudaStream_t stream = as_stream(stream_handle);
  if (tokens == 0) {
    cudaMemsetAsync(offsets, 0, sizeof(int32_t) * (experts + 1), stream);
    check_launch("routing memset");
    return;
  }
  if (tokens <= kSingleBlockMaxTokens) {
    size_t shared = sizeof(int) * experts * (2 + kSingleBlockThreads / 32);
    routing_single_block_kernel<<<1, kSingleBlockThreads, shared, stream>>>(perm, inv_perm, offsets, modality,
                                                                             static_cast<int>(tokens), experts);
    check_launch("routing_single_block_kernel");
    return;
  }
  const int blocks = static_cast<int>(tile_blocks(tokens));
  routing_count_kernel<<<blocks, kTileThreads, sizeof(int) * experts, stream>>>(workspace, modality, tokens, experts);
  check_launch("routing_count_kernel");
  routing_scan_kernel<<<1, kScanThreads, 0, stream>>>(workspace, offsets, blocks, experts);
  check_launch("routing_scan_kernel");
  size_t shared = sizeof(int) * experts * (1 + kTileThreads / 32);
  routing_scatter_kernel<<<blocks, kTileThreads, shared, stream>>>(perm, inv_perm, workspace, modality, tokens,
                                                                   experts);
  check_launch("routing_scatter_kernel");
}

}  // namespace mome
