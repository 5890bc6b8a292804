// Decode attention: the launcher (picks the split kernel for dtype x head dim) and the combine
// step that merges the per-split partial softmaxes.
//
// Combine, per (batch, head): weights w_s = exp2(lse_s - max_s lse_s) over the splits,
// out = sum_s w_s * partial_s / sum_s w_s; all splits empty (max = -inf) gives 0.
#include <cmath>

#include "common.cuh"

namespace mome {

void launch_decode_fp16_hd64(const DecodeParams& params, cudaStream_t stream);
void launch_decode_fp16_hd128(const DecodeParams& params, cudaStream_t stream);
void launch_decode_bf16_hd64(const DecodeParams& params, cudaStream_t stream);
void launch_decode_bf16_hd128(const DecodeParams& params, cudaStream_t stream);

namespace {

constexpr int kCombineThreads = 128;

template <typename scalar_t>
__global__ void __launch_bounds__(kCombineThreads)
    decode_combine_kernel(scalar_t* out, const float* partial_out, const float* partial_lse, int num_splits,
                          int head_dim) {
  __shared__ float weight[kDecodeMaxSplits];
  __shared__ float weight_sum;
  const int64_t head = blockIdx.x;  // flattened (batch, head)
  const float* lse = partial_lse + head * num_splits;
  if (threadIdx.x < 32) {
    float local = -INFINITY;
    for (int s = threadIdx.x; s < num_splits; s += 32) local = fmaxf(local, lse[s]);
    for (int offset = 16; offset >= 1; offset /= 2) local = fmaxf(local, __shfl_xor_sync(kFullMask, local, offset));
    float sum = 0.f;
    for (int s = threadIdx.x; s < num_splits; s += 32) {
      const float w = local == -INFINITY ? 0.f : exp2f(lse[s] - local);
      weight[s] = w;
      sum += w;
    }
    for (int offset = 16; offset >= 1; offset /= 2) sum += __shfl_xor_sync(kFullMask, sum, offset);
    if (threadIdx.x == 0) weight_sum = sum;
  }
  __syncthreads();
  const float* partial = partial_out + head * num_splits * head_dim;
  for (int d = threadIdx.x; d < head_dim; d += kCombineThreads) {
    float value = 0.f;
    if (weight_sum > 0.f) {
      for (int s = 0; s < num_splits; ++s) {
        if (weight[s] > 0.f) value += weight[s] * partial[static_cast<int64_t>(s) * head_dim + d];
      }
      value /= weight_sum;
    }
    out[head * head_dim + d] = Pack8<scalar_t>::from_float(value);
  }
}

template <typename scalar_t>
void launch_combine(const DecodeParams& params, cudaStream_t stream) {
  const int64_t heads = static_cast<int64_t>(params.batch) * params.heads;
  decode_combine_kernel<scalar_t><<<static_cast<unsigned>(heads), kCombineThreads, 0, stream>>>(
      static_cast<scalar_t*>(params.out), params.partial_out, params.partial_lse, params.num_splits,
      params.head_dim);
  check_launch("decode_combine_kernel");
}

}  // namespace

bool decode_supports_head_dim(int head_dim) { return head_dim == 64 || head_dim == 128; }

void decode_attention_fwd(const DecodeParams& params, void* stream_handle) {
  if (!decode_supports_head_dim(params.head_dim)) {
    throw std::invalid_argument("mome._C.decode_attention_fwd: head_dim must be 64 or 128, got " +
                                std::to_string(params.head_dim));
  }
  if (params.kv_heads < 1 || params.heads % params.kv_heads != 0) {
    throw std::invalid_argument("mome._C.decode_attention_fwd: heads must be a multiple of kv_heads");
  }
  if (params.num_splits < 1 || params.num_splits > kDecodeMaxSplits) {
    throw std::invalid_argument("mome._C.decode_attention_fwd: num_splits must be in [1, 128], got " +
                                std::to_string(params.num_splits));
  }
  if (params.batch == 0 || params.heads == 0) return;
  cudaStream_t stream = as_stream(stream_handle);
  const bool fp16 = params.dtype == HalfType::kFloat16;
  if (params.head_dim == 64) {
    fp16 ? launch_decode_fp16_hd64(params, stream) : launch_decode_bf16_hd64(params, stream);
  } else {
    fp16 ? launch_decode_fp16_hd128(params, stream) : launch_decode_bf16_hd128(params, stream);
  }
  if (params.num_splits > 1) {
    fp16 ? launch_combine<__half>(params, stream) : launch_combine<__nv_bfloat16>(params, stream);
  }
}

}  // namespace mome
