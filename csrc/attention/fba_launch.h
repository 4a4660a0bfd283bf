// Host-side interface between the torch-facing bindings (bindings.cpp) and the CUDA kernels.
//
// This header deliberately includes no torch header: the kernels' translation units (.cu) stay cheap to
// compile, and only bindings.cpp pays for the torch includes. Tensors travel as raw pointers plus strides
// in elements (int64, so per-tensor offsets never overflow int32).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace swift_kernels {
namespace attention {

// Tile sizes. The forward and the dQ kernel walk query tiles of kFwdTileQ tokens (8 warps x 16 rows)
// against key tiles of kFwdTileK tokens; the dK/dV kernel walks key tiles of kBwdTileK tokens (8 warps x
// 16 rows) against query tiles of kBwdTileQ tokens. Python builds the CSR schedules with these.
constexpr int kFwdTileQ = 128;
constexpr int kFwdTileK = 64;
constexpr int kBwdTileQ = 64;
constexpr int kBwdTileK = 128;
constexpr int kThreads = 256;

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// Strides of a [B, L, H, D] tensor in elements (the head_dim stride is 1).
struct Strides4 {
  int64_t b, l, h;
};

// The CSR tile schedule (see swift_kernels/attention/schedule.py): row r visits indices[indptr[r] :
// indptr[r+1]], the first num_full[r] of them without the element mask.
struct Csr {
  const int32_t* indptr;
  const int32_t* num_full;
  const int32_t* indices;
  int num_rows;
};

struct Problem {
  int batch, tokens, heads, head_dim;
  int block_tokens, num_blocks;
  const int8_t* block_mask;  // [num_blocks, num_blocks], 1 = allowed, on the device
  float scale;               // softmax scale (natural units)
  DType dtype;
};

struct FwdArgs {
  Problem pb;
  const void *q, *k, *v;
  Strides4 sq, sk, sv;
  void* out;       // [B, L, H, D] contiguous, q's dtype
  float* lse;      // [B, H, L] fp32, natural log
  Csr by_query;    // rows: query tiles of kFwdTileQ; cols: key tiles of kFwdTileK
};

struct BwdArgs {
  Problem pb;
  const void *dout, *q, *k, *v, *out;
  Strides4 sdo, sq, sk, sv, so;
  const float* lse;  // [B, H, L] contiguous
  float* delta;      // [B, H, L] scratch, written by the preprocessing kernel
  void *dq, *dk, *dv;  // [B, L, H, D] contiguous
  Csr by_query;      // as in FwdArgs (the dQ kernel)
  Csr by_key;        // rows: key tiles of kBwdTileK; cols: query tiles of kBwdTileQ (the dK/dV kernel)
};

// Both throw std::runtime_error naming the kernel when a CUDA call or a launch fails.
void fba_forward(const FwdArgs& args, cudaStream_t stream);
void fba_backward(const BwdArgs& args, cudaStream_t stream);

}  // namespace attention
}  // namespace swift_kernels
