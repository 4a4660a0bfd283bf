// Host-side interface between the torch-facing bindings (bindings.cpp) and the CUDA kernels.
//
// This header deliberately includes no torch header: the kernels' translation units (.cu) stay cheap to
// compile, and only bindings.cpp pays for the torch includes. Tensors travel as raw pointers plus strides
// in elements (int64, so per-tensor offsets never overflow int32).
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

#include "fba_tiles.h"

namespace swift_kernels {
namespace attention {

// Tile sizes (kSparseBlock, kFwdTileQ, ...) come from swift_kernels/attention/tiles.py through the generated
// fba_tiles.h: the forward and the dQ kernel own query tiles of kFwdTileQ tokens (8 warps x 16 rows, one sparse
// block) and walk key tiles of kFwdTileK tokens; the dK/dV kernel owns key tiles of kBwdTileK tokens and walks
// query tiles of kBwdTileQ tokens.

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// Strides of a [B, L, H, D] tensor in elements (the head_dim stride is 1).
struct Strides4 {
  int64_t b, l, h;
};

// One direction of an attention plan's tables (swift_kernels/attention/plan.py: FlexAttention's BlockMask
// layout over sparse blocks of kSparseBlock tokens): row r lists num[r] partial sparse blocks in
// idx[r * row_stride ...] and full_num[r] full ones in full_idx[r * row_stride ...] (full: no element mask).
struct BlockTable {
  const int32_t* num;
  const int32_t* idx;
  const int32_t* full_num;
  const int32_t* full_idx;
  int num_rows;
  int row_stride;
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
  BlockTable by_query;  // rows: query sparse blocks (the kv_* tables), walked in key tiles of kFwdTileK
};

struct BwdArgs {
  Problem pb;
  const void *dout, *q, *k, *v, *out;
  Strides4 sdo, sq, sk, sv, so;
  const float* lse;  // [B, H, L] contiguous
  float* delta;      // [B, H, L] scratch, written by the preprocessing kernel
  void *dq, *dk, *dv;  // [B, L, H, D] contiguous
  BlockTable by_query;  // as in FwdArgs (the dQ kernel)
  BlockTable by_key;    // rows: key sparse blocks (the q_* tables), walked in query tiles of kBwdTileQ (dK/dV)
};

// Both throw std::runtime_error naming the kernel when a CUDA call or a launch fails.
void fba_forward(const FwdArgs& args, cudaStream_t stream);
void fba_backward(const BwdArgs& args, cudaStream_t stream);

}  // namespace attention
}  // namespace swift_kernels
