// Device building blocks shared by the frame-block attention kernels (Ampere-style, sm_80 and later):
// cp.async global->shared copies, ldmatrix fragment loads, mma.sync m16n8k16 (fp16/bf16 in, fp32 out),
// a swizzled shared-memory tile layout, warp-level GEMM loops over it, and the online-softmax steps that
// both forward kernels share (their accumulators have the same per-warp register layout).
//
// Hopper-specific code (TMA, wgmma, warp specialisation) lives in fba_fwd_sm90.cu; this is the portable
// mma.sync path, which also runs on sm_90 through the sm_90a build.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "fba_launch.h"

namespace swift_kernels {
namespace attention {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// ---------------------------------------------------------------------------------------------------
// Element types. pack() turns two fp32 values into one 32-bit register of two 16-bit values, the
// operand format of mma.sync.
struct F16 {
  using elem = __half;
  static constexpr bool kBf16 = false;
  __device__ __forceinline__ static uint32_t pack(float a, float b) {
    __half2 h = __floats2half2_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float to_float(elem x) { return __half2float(x); }
};

struct BF16 {
  using elem = __nv_bfloat16;
  static constexpr bool kBf16 = true;
  __device__ __forceinline__ static uint32_t pack(float a, float b) {
    __nv_bfloat162 h = __floats2bfloat162_rn(a, b);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static float to_float(elem x) { return __bfloat162float(x); }
};

// ---------------------------------------------------------------------------------------------------
// PTX wrappers.
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy; src_bytes = 0 zero-fills the destination (rows past the sequence end must be zeros,
// not garbage: a masked probability of 0 times a NaN would still be NaN).
__device__ __forceinline__ void cp_async16(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)), "l"(gmem_src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(smem)));
}

// c[16x8] += a[16x16] * b[16x8], fp32 accumulate.
template <class Tr>
__device__ __forceinline__ void mma16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (Tr::kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// ---------------------------------------------------------------------------------------------------
// Shared-memory tiles: R rows of D 16-bit elements, stored row-major in 16-byte chunks whose chunk index
// is XORed with (row & 7). ldmatrix reads 8 rows x 16 bytes at a time; without the swizzle those 8 rows
// (128 or 256 bytes apart) would all hit the same banks. Padding would also work but costs shared memory
// that the D = 128 kernels cannot spare on Ada (99 KB per block).
template <int D>
__device__ __forceinline__ int swz(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// Copy R rows (tokens row0 .. row0+R-1) of one (batch, head) slice into a shared tile; rows at or past
// `tokens` are zero-filled. `base` already points at (b, token 0, h, 0).
template <int R, int D, class E>
__device__ __forceinline__ void load_tile(E* smem, const E* base, int64_t row_stride, int row0, int tokens,
                                          int tid) {
  constexpr int kChunks = D / 8;
  static_assert((R * kChunks) % kThreads == 0, "tile copy must divide evenly over the threads");
#pragma unroll
  for (int i = 0; i < R * kChunks / kThreads; ++i) {
    const int idx = i * kThreads + tid;
    const int r = idx / kChunks;
    const int c = idx % kChunks;
    const int tok = row0 + r;
    const bool ok = tok < tokens;
    const E* src = ok ? base + static_cast<int64_t>(tok) * row_stride + c * 8 : base;
    cp_async16(smem + swz<D>(r, c), src, ok ? 16 : 0);
  }
}

// A fragments (16 rows x D) of rows row0.. of a shared tile, one [4] per 16-wide k step.
template <int D, class E>
__device__ __forceinline__ void load_a_frags(uint32_t (&a)[D / 16][4], const E* smem, int row0, int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    ldmatrix_x4(a[kk], smem + swz<D>(row0 + (lane & 15), kk * 2 + (lane >> 4)));
  }
}

// acc[16 x N] += A[16 x D] * B^T where B is a shared [N x D] tile (its rows are the output columns):
// S = Q K^T, dP = dO V^T. A comes from registers.
template <class Tr, int N, int D, class E>
__device__ __forceinline__ void gemm_abt(float (&acc)[N / 8][4], const uint32_t (&a)[D / 16][4],
                                         const E* sb, int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
    for (int pp = 0; pp < N / 16; ++pp) {
      uint32_t b[4];
      ldmatrix_x4(b, sb + swz<D>(pp * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1)));
      mma16816<Tr>(acc[2 * pp], a[kk], b[0], b[1]);
      mma16816<Tr>(acc[2 * pp + 1], a[kk], b[2], b[3]);
    }
  }
}

// The same with A read from shared memory (rows arow0.. of sa), one k step at a time to keep register
// pressure down (the dK/dV kernel holds two D-wide accumulators already).
template <class Tr, int N, int D, class E>
__device__ __forceinline__ void gemm_abt_ss(float (&acc)[N / 8][4], const E* sa, int arow0, const E* sb,
                                            int lane) {
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    ldmatrix_x4(a, sa + swz<D>(arow0 + (lane & 15), kk * 2 + (lane >> 4)));
#pragma unroll
    for (int pp = 0; pp < N / 16; ++pp) {
      uint32_t b[4];
      ldmatrix_x4(b, sb + swz<D>(pp * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1)));
      mma16816<Tr>(acc[2 * pp], a, b[0], b[1]);
      mma16816<Tr>(acc[2 * pp + 1], a, b[2], b[3]);
    }
  }
}

// acc[16 x D] += A[16 x K] * B where B is a shared [K x D] tile read transposed by ldmatrix:
// O += P V, dQ += dS K, dK += dS^T Q, dV += P^T dO. A (K = 16 * KS wide) comes from registers.
template <class Tr, int KS, int D, class E>
__device__ __forceinline__ void gemm_ab(float (&acc)[D / 8][4], const uint32_t (&a)[KS][4], const E* sb,
                                        int lane) {
#pragma unroll
  for (int kk = 0; kk < KS; ++kk) {
#pragma unroll
    for (int pp = 0; pp < D / 16; ++pp) {
      uint32_t b[4];
      ldmatrix_x4_trans(b, sb + swz<D>(kk * 16 + (lane & 7) + (((lane >> 3) & 1) << 3), pp * 2 + (lane >> 4)));
      mma16816<Tr>(acc[2 * pp], a[kk], b[0], b[1]);
      mma16816<Tr>(acc[2 * pp + 1], a[kk], b[2], b[3]);
    }
  }
}

// Accumulator tiles (16 x 8 each, c[0..1] on row lane/4, c[2..3] on row lane/4 + 8) to A fragments of a
// following product: k step kk takes accumulator tiles 2kk and 2kk+1.
template <class Tr, int N>
__device__ __forceinline__ void acc_to_a(uint32_t (&a)[N / 16][4], const float (&c)[N / 8][4]) {
#pragma unroll
  for (int kk = 0; kk < N / 16; ++kk) {
    a[kk][0] = Tr::pack(c[2 * kk][0], c[2 * kk][1]);
    a[kk][1] = Tr::pack(c[2 * kk][2], c[2 * kk][3]);
    a[kk][2] = Tr::pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
    a[kk][3] = Tr::pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
  }
}

template <int N>
__device__ __forceinline__ void zero_acc(float (&c)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) c[i][0] = c[i][1] = c[i][2] = c[i][3] = 0.f;
}

// Write a warp's 16 x D accumulator rows (scaled by row_scale[0] / [1] for rows lane/4 and lane/4 + 8)
// to a contiguous [B, L, H, D] output at rows tok0 + lane/4 (+8), skipping rows past the sequence end.
template <class Tr, int D>
__device__ __forceinline__ void store_rows(typename Tr::elem* base, int64_t row_stride, int tok0, int tokens,
                                           const float (&acc)[D / 8][4], float s0, float s1, int lane) {
  const int r0 = tok0 + (lane >> 2);
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = r0 + half * 8;
    if (r >= tokens) continue;
    const float s = half ? s1 : s0;
    typename Tr::elem* row = base + static_cast<int64_t>(r) * row_stride;
#pragma unroll
    for (int dt = 0; dt < D / 8; ++dt) {
      const int d = dt * 8 + (lane & 3) * 2;
      *reinterpret_cast<uint32_t*>(row + d) = Tr::pack(acc[dt][2 * half] * s, acc[dt][2 * half + 1] * s);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Kernel prologue helpers.

// Element (b, token 0, h, 0) of a [B, L, H, D] tensor with strides st: the base of one (batch, head) slice.
template <class E>
__device__ __forceinline__ const E* head_base(const void* p, const Strides4& st, int b, int h) {
  return static_cast<const E*>(p) + b * st.b + h * st.h;
}

// Row `row` of a plan's table, walked in tiles of TILE tokens (TILE divides kSparseBlock): first the tiles of
// its full sparse blocks (no element mask), then those of its partial ones. Tile `it` is part it % kParts of
// the sparse block listed at it / kParts.
template <int TILE>
struct TableRow {
  static constexpr int kParts = kSparseBlock / TILE;
  static_assert(kSparseBlock % TILE == 0, "a tile is a part of a sparse block");
  int n;      // tiles to walk
  int nfull;  // the first nfull of them belong to full sparse blocks
  const int32_t* full_idx;
  const int32_t* part_idx;

  __device__ __forceinline__ bool full(int it) const { return it < nfull; }
  // First token of tile `it`.
  __device__ __forceinline__ int start(int it) const {
    const int e = it / kParts;
    const int ef = nfull / kParts;
    const int blk = e < ef ? full_idx[e] : part_idx[e - ef];
    return blk * kSparseBlock + (it % kParts) * TILE;
  }
};
template <int TILE>
__device__ __forceinline__ TableRow<TILE> table_row(const BlockTable& t, int row) {
  const int64_t off = static_cast<int64_t>(row) * t.row_stride;
  const int nf = t.full_num[row] * TableRow<TILE>::kParts;
  return {nf + t.num[row] * TableRow<TILE>::kParts, nf, t.full_idx + off, t.idx + off};
}

// Double-buffered K/V stages of the forward and dQ kernels: stage t holds a [BK x D] K tile and then a
// [BK x D] V tile at smem + t * 2 * BK * D. At iteration it of row.n, prefetch key tile it + 1 into the
// other stage (it was last read in iteration it - 1, which every warp finished before that iteration's
// closing barrier) and wait until this iteration's stage has landed; the caller's __syncthreads follows.
template <int BK, int D, class E>
__device__ __forceinline__ void prefetch_next_kv(E* smem, int it, const TableRow<BK>& row, const E* kb,
                                                 int64_t k_stride, const E* vb, int64_t v_stride, int L,
                                                 int tid) {
  if (it + 1 < row.n) {
    E* nK = smem + ((it + 1) & 1) * (2 * BK * D);
    const int k0n = row.start(it + 1);
    load_tile<BK, D>(nK, kb, k_stride, k0n, L, tid);
    load_tile<BK, D>(nK + BK * D, vb, v_stride, k0n, L, tid);
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
}

// ---------------------------------------------------------------------------------------------------
// Forward softmax steps shared by the mma.sync forward (fba_fwd.cu) and the Hopper wgmma forward
// (fba_fwd_sm90.cu). Both hold a warp's scores as NT accumulator tiles of 16 rows x 8 columns in the
// mma.sync m16n8 layout: s[j][0..1] on row lane/4, columns 8j + 2(lane%4) + {0,1}, s[j][2..3] on row
// lane/4 + 8 (the wgmma m64nNk16 accumulator has exactly this layout per warp and 8-column chunk).

// Scores to log2 units (times c = scale * log2 e). Partial key tiles (full == false) also apply the element
// mask block_mask[q / P][k / P] and the sequence end: key column k0 + ..., query blocks qblk[0..1] of the
// thread's two rows (-1 for rows past the end, which are masked everywhere); masked scores become -inf.
template <int NT>
__device__ __forceinline__ void scale_mask_scores(float (&s)[NT][4], bool full, int k0, int lane,
                                                  const int (&qblk)[2], int L, int P, const int8_t* block_mask,
                                                  int num_blocks, float c) {
  if (full) {
#pragma unroll
    for (int j = 0; j < NT; ++j)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[j][i] *= c;
  } else {
#pragma unroll
    for (int j = 0; j < NT; ++j) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int col = k0 + j * 8 + (lane & 3) * 2 + (i & 1);
        const int qbk = qblk[i >> 1];
        const bool ok = col < L && qbk >= 0 && __ldg(block_mask + qbk * num_blocks + col / P) != 0;
        s[j][i] = ok ? s[j][i] * c : -INFINITY;
      }
    }
  }
}

// Online softmax update, per row (the 4 lanes of a quad share a row): new running max m (log2 units),
// scores replaced by exp2(s - m), partial row sums l and the output accumulator o rescaled by
// exp2(m_old - m_new).
template <int NT, int ND>
__device__ __forceinline__ void online_softmax_update(float (&s)[NT][4], float (&o)[ND][4], float (&m)[2],
                                                      float (&l)[2]) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = m[r];
#pragma unroll
    for (int j = 0; j < NT; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    // A row with no allowed key so far keeps max -inf; subtracting 0 instead keeps exp2 at 0, not NaN.
    const float mu = mx == -INFINITY ? 0.f : mx;
    const float alpha = exp2f(m[r] - mu);
    m[r] = mx;
    float rs = 0.f;
#pragma unroll
    for (int j = 0; j < NT; ++j) {
      s[j][2 * r] = exp2f(s[j][2 * r] - mu);
      s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - mu);
      rs += s[j][2 * r] + s[j][2 * r + 1];
    }
    l[r] = l[r] * alpha + rs;
#pragma unroll
    for (int dt = 0; dt < ND; ++dt) {
      o[dt][2 * r] *= alpha;
      o[dt][2 * r + 1] *= alpha;
    }
  }
}

// End of the forward: reduce the quad's partial row sums, return 1 / sum per row in inv (0 for a row that
// saw no allowed key, whose output is then 0) and write the natural-log lse of rows row0 and row0 + 8
// (-inf for such rows: the contract) to lse_bh, the [L] lse row of this (batch, head).
__device__ __forceinline__ void finalize_rows(float (&inv)[2], const float (&m)[2], const float (&l)[2],
                                              float* lse_bh, int row0, int L, int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = l[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    inv[r] = sum > 0.f ? 1.f / sum : 0.f;
    const int row = row0 + r * 8;
    if ((lane & 3) == 0 && row < L) {
      lse_bh[row] = sum > 0.f ? (m[r] + log2f(sum)) * kLn2 : -INFINITY;
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// Host-side error handling: every CUDA call and launch is checked and turned into an exception that
// names the kernel (pybind11 turns std::runtime_error into a Python RuntimeError).
inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("swift_kernels._C: ") + what + ": " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

// Raise the kernel's dynamic shared-memory limit when it needs more than the default 48 KB, after checking
// that the device can give it.
inline void prepare_smem(const void* kernel, int smem_bytes, const char* name) {
  int device = 0;
  check_cuda(cudaGetDevice(&device), name);
  int optin = 0;
  check_cuda(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device), name);
  if (smem_bytes > optin) {
    throw std::runtime_error(std::string("swift_kernels._C: ") + name + " needs " + std::to_string(smem_bytes) +
                             " bytes of shared memory per block; this device allows " + std::to_string(optin));
  }
  check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes), name);
}

}  // namespace attention
}  // namespace swift_kernels
