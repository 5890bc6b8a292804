// Split-K flash-decoding: one new query token per sequence against its KV cache.
//
// Grid (split, kv_head x head_tile, batch). A block owns one KV head and up to GROUP_TILE of the
// query heads that share it (GQA), so each cache row is read once for the whole group. Split s of
// sequence b covers rows [s * chunk, (s + 1) * chunk) of its valid prefix, chunk = ceil(len / S):
// every split of a sequence gets the same share, whatever the sequence's length.
//
// Inside a block each row of K/V (HEAD_DIM half values) is read by HEAD_DIM / 8 lanes with one
// 16-byte load each; a warp covers 32 / (HEAD_DIM / 8) rows per load and keeps UNROLL loads of K
// and of V in flight per lane. Scores are reduced across the row's lanes with shuffles and fed to
// an online softmax in base 2 (log2(e) folded into the scale), one rescale per UNROLL rows.
// Partial states (running max, sum, accumulator) are merged across a warp's row slots with
// shuffles, across warps in shared memory; a block then writes either the final output (one split)
// or its normalised partial output and log2-sum-exp2 for the combine kernel.
//
// Rows past a sequence's length are never loaded (cache entries there may hold anything, NaN
// included). An empty sequence or split gives max = -inf, sum = 0: output 0, weight 0 in the combine.
#pragma once

#include <cmath>

#include "common.cuh"

namespace mome {

constexpr int kDecodeWarps = 4;
constexpr int kDecodeThreads = kDecodeWarps * 32;
constexpr int kDecodeUnroll = 4;

template <typename scalar_t, int HEAD_DIM, int GROUP_TILE>
__global__ void __launch_bounds__(kDecodeThreads)
    decode_split_kernel(DecodeParams params, int group, int head_tiles, float scale_log2) {
  constexpr int kLanesPerRow = HEAD_DIM / 8;
  constexpr int kRowsPerLoad = 32 / kLanesPerRow;
  constexpr int kRowsPerWarpStep = kRowsPerLoad * kDecodeUnroll;
  constexpr int kRowsPerBlockStep = kRowsPerWarpStep * kDecodeWarps;
  static_assert(HEAD_DIM % 8 == 0 && 32 % kLanesPerRow == 0, "a row must split evenly over a warp's lanes");

  __shared__ float shared_max[kDecodeWarps][GROUP_TILE];
  __shared__ float shared_sum[kDecodeWarps][GROUP_TILE];
  __shared__ float shared_acc[kDecodeWarps][GROUP_TILE][HEAD_DIM];

  const int split = blockIdx.x;
  const int kv_head = blockIdx.y / head_tiles;
  const int first_in_group = (blockIdx.y % head_tiles) * GROUP_TILE;
  const int batch = blockIdx.z;
  const int lane = threadIdx.x & 31, warp = threadIdx.x / 32;
  const int slot = lane / kLanesPerRow;  // which row of a load this lane reads
  const int column = (lane % kLanesPerRow) * 8;

  const int length = params.cache_seqlens[batch];
  const int chunk = (length + params.num_splits - 1) / params.num_splits;
  const int row_begin = min(split * chunk, length);
  const int row_end = min(row_begin + chunk, length);

  const scalar_t* q = static_cast<const scalar_t*>(params.q);
  const int64_t cache_head = static_cast<int64_t>(batch) * params.kv_heads + kv_head;
  const scalar_t* k_rows = static_cast<const scalar_t*>(params.k_cache) + cache_head * params.nmax * HEAD_DIM + column;
  const scalar_t* v_rows = static_cast<const scalar_t*>(params.v_cache) + cache_head * params.nmax * HEAD_DIM + column;

  float q_part[GROUP_TILE][8];  // this lane's 8 dims of each query head, pre-scaled
#pragma unroll
  for (int g = 0; g < GROUP_TILE; ++g) {
    const int in_group = min(first_in_group + g, group - 1);  // padding heads repeat a real one, never stored
    const int64_t head = static_cast<int64_t>(batch) * params.heads + kv_head * group + in_group;
    Pack8<scalar_t>::to_float(*reinterpret_cast<const uint4*>(q + head * HEAD_DIM + column), q_part[g]);
#pragma unroll
    for (int i = 0; i < 8; ++i) q_part[g][i] *= scale_log2;
  }

  float running_max[GROUP_TILE], running_sum[GROUP_TILE], acc[GROUP_TILE][8];
#pragma unroll
  for (int g = 0; g < GROUP_TILE; ++g) {
    running_max[g] = -INFINITY;
    running_sum[g] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[g][i] = 0.f;
  }

  for (int step = row_begin + warp * kRowsPerWarpStep; step < row_end; step += kRowsPerBlockStep) {
    uint4 k_raw[kDecodeUnroll], v_raw[kDecodeUnroll];
    bool valid[kDecodeUnroll];
#pragma unroll
    for (int u = 0; u < kDecodeUnroll; ++u) {  // all loads first: UNROLL x 2 x 16 bytes in flight per lane
      const int row = step + u * kRowsPerLoad + slot;
      valid[u] = row < row_end;
      k_raw[u] = valid[u] ? load_streaming(k_rows + static_cast<int64_t>(row) * HEAD_DIM) : make_uint4(0, 0, 0, 0);
      v_raw[u] = valid[u] ? load_streaming(v_rows + static_cast<int64_t>(row) * HEAD_DIM) : make_uint4(0, 0, 0, 0);
    }
    float score[kDecodeUnroll][GROUP_TILE];
#pragma unroll
    for (int u = 0; u < kDecodeUnroll; ++u) {
      float k_part[8];
      Pack8<scalar_t>::to_float(k_raw[u], k_part);
#pragma unroll
      for (int g = 0; g < GROUP_TILE; ++g) {
        float dot = 0.f;
#pragma unroll
        for (int i = 0; i < 8; ++i) dot = fmaf(q_part[g][i], k_part[i], dot);
#pragma unroll
        for (int offset = kLanesPerRow / 2; offset >= 1; offset /= 2) dot += __shfl_xor_sync(kFullMask, dot, offset);
        score[u][g] = valid[u] ? dot : -INFINITY;
      }
    }
#pragma unroll
    for (int g = 0; g < GROUP_TILE; ++g) {
      float step_max = running_max[g];
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) step_max = fmaxf(step_max, score[u][g]);
      if (step_max == -INFINITY) continue;  // nothing valid for this slot yet
      const float rescale = exp2f(running_max[g] - step_max);
      running_max[g] = step_max;
      running_sum[g] *= rescale;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[g][i] *= rescale;
#pragma unroll
      for (int u = 0; u < kDecodeUnroll; ++u) {
        const float p = exp2f(score[u][g] - step_max);
        running_sum[g] += p;
        float v_part[8];
        Pack8<scalar_t>::to_float(v_raw[u], v_part);
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[g][i] = fmaf(p, v_part[i], acc[g][i]);
      }
    }
  }

  // Merge the row slots of this warp (lanes kLanesPerRow apart hold the same columns).
#pragma unroll
  for (int offset = kLanesPerRow; offset < 32; offset *= 2) {
#pragma unroll
    for (int g = 0; g < GROUP_TILE; ++g) {
      const float other_max = __shfl_xor_sync(kFullMask, running_max[g], offset);
      const float other_sum = __shfl_xor_sync(kFullMask, running_sum[g], offset);
      const float merged_max = fmaxf(running_max[g], other_max);
      const float mine = merged_max == -INFINITY ? 0.f : exp2f(running_max[g] - merged_max);
      const float theirs = merged_max == -INFINITY ? 0.f : exp2f(other_max - merged_max);
      running_sum[g] = running_sum[g] * mine + other_sum * theirs;
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const float other_acc = __shfl_xor_sync(kFullMask, acc[g][i], offset);
        acc[g][i] = acc[g][i] * mine + other_acc * theirs;
      }
      running_max[g] = merged_max;
    }
  }
  if (slot == 0) {
#pragma unroll
    for (int g = 0; g < GROUP_TILE; ++g) {
#pragma unroll
      for (int i = 0; i < 8; ++i) shared_acc[warp][g][column + i] = acc[g][i];
      if (lane == 0) {
        shared_max[warp][g] = running_max[g];
        shared_sum[warp][g] = running_sum[g];
      }
    }
  }
  __syncthreads();

  // Merge the warps and write: one thread per (head of the tile, dim).
  for (int item = threadIdx.x; item < GROUP_TILE * HEAD_DIM; item += kDecodeThreads) {
    const int g = item / HEAD_DIM, d = item % HEAD_DIM;
    if (first_in_group + g >= group) break;  // items are ordered by g: the rest are padding heads
    float block_max = -INFINITY;
#pragma unroll
    for (int w = 0; w < kDecodeWarps; ++w) block_max = fmaxf(block_max, shared_max[w][g]);
    float total = 0.f, value = 0.f;
    if (block_max != -INFINITY) {
#pragma unroll
      for (int w = 0; w < kDecodeWarps; ++w) {
        const float weight = exp2f(shared_max[w][g] - block_max);
        total += shared_sum[w][g] * weight;
        value += shared_acc[w][g][d] * weight;
      }
    }
    const float normalised = total > 0.f ? value / total : 0.f;
    const int64_t head = static_cast<int64_t>(batch) * params.heads + kv_head * group + first_in_group + g;
    if (params.num_splits == 1) {
      static_cast<scalar_t*>(params.out)[head * HEAD_DIM + d] = Pack8<scalar_t>::from_float(normalised);
    } else {
      const int64_t partial = head * params.num_splits + split;
      params.partial_out[partial * HEAD_DIM + d] = normalised;
      if (d == 0) params.partial_lse[partial] = total > 0.f ? block_max + log2f(total) : -INFINITY;
    }
  }
}

// Query heads per block: the group size rounded up to 1, 2, 4 or 8 (larger groups take several tiles).
inline int decode_group_tile(int group) { return group <= 1 ? 1 : group == 2 ? 2 : group <= 4 ? 4 : 8; }

// Launches the split kernel for one (dtype, head dim); one .cu file instantiates each pair.
template <typename scalar_t, int HEAD_DIM>
void launch_decode_split(const DecodeParams& params, cudaStream_t stream) {
  const int group = params.heads / params.kv_heads;
  const int tile = decode_group_tile(group);
  const int head_tiles = (group + tile - 1) / tile;
  const dim3 grid(params.num_splits, params.kv_heads * head_tiles, params.batch);
  const float scale_log2 = params.scale * 1.4426950408889634f;  // exp(x) = exp2(x * log2(e))
  switch (tile) {
    case 1:
      decode_split_kernel<scalar_t, HEAD_DIM, 1><<<grid, kDecodeThreads, 0, stream>>>(params, group, head_tiles,
                                                                                     scale_log2);
      break;
    case 2:
      decode_split_kernel<scalar_t, HEAD_DIM, 2><<<grid, kDecodeThreads, 0, stream>>>(params, group, head_tiles,
                                                                                     scale_log2);
      break;
    case 4:
      decode_split_kernel<scalar_t, HEAD_DIM, 4><<<grid, kDecodeThreads, 0, stream>>>(params, group, head_tiles,
                                                                                     scale_log2);
      break;
    default:
      decode_split_kernel<scalar_t, HEAD_DIM, 8><<<grid, kDecodeThreads, 0, stream>>>(params, group, head_tiles,
                                                                                     scale_log2);
      break;
  }
  check_launch("decode_split_kernel");
}

}  // namespace mome
