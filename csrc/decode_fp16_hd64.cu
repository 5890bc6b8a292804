// Decode split kernels for fp16, head dim 64 (one file per pair so the build runs them in parallel).
#include "decode_split.cuh"

namespace mome {

void launch_decode_fp16_hd64(const DecodeParams& params, cudaStream_t stream) {
  launch_decode_split<__half, 64>(params, stream);
}

}  // namespace mome
