// Forward of frame-block-sparse attention for Hopper (sm_90a): FlashAttention-3 style.
//
// UNVERIFIED: written and compiled without a GPU; the Python backend takes this path on a compute capability
// 9.0 device only where it is verified (swift_kernels/verified_kernels.json) or when SWIFT_KERNELS_HOPPER=1
// (or SWIFT_KERNELS_UNVERIFIED=1) asks for it.
//
// Design. One CTA of three warpgroups owns a query tile of 128 tokens (one sparse block of the plan) of one
// (batch, head):
//   * warpgroup 0 is the producer: one thread issues TMA bulk tensor copies (cp.async.bulk.tensor) of the
//     Q tile (once) and of the K and V tiles its table row lists for this query tile (128 keys each)
//     into a ring of shared-memory stages. Each stage has a "K full", a "V full" and an "empty" mbarrier;
//     the copies complete on the full barriers (transaction bytes), consumers release a stage by arriving
//     on its empty barrier once their tensor-core reads of it are done.
//   * warpgroups 1 and 2 are consumers, 64 query rows each: S = Q K^T with wgmma.mma_async m64n128k16
//     (both operands from shared memory through 128-byte-swizzle matrix descriptors), the element mask on
//     partial tiles, the online softmax in registers, then O += P V with wgmma m64nDk16 (P from registers
//     as the A operand, V from shared memory read N-major through the descriptor).
//   setmaxnreg moves registers from the producer (40) to the consumers (232).
// Two consumer warpgroups work on the same K/V stage independently, so one's softmax overlaps the
// other's tensor-core products. (Ping-pong scheduling and overlapping a tile's softmax with the next
// tile's Q K^T inside one warpgroup, as FlashAttention-3 does, are future work once this is verified.)
//
// Shared-memory layout. Tiles are stored as the TMA writes them with CU_TENSOR_MAP_SWIZZLE_128B: panels
// of 64 head_dim columns (128 bytes per row), rows contiguous, each 16-byte chunk c of row r at chunk
// position c ^ (r % 8), every panel 1024-byte aligned. That is exactly the canonical 128B-swizzled wgmma
// layout: K-major for Q and K (8-row core groups 1024 bytes apart: SBO = 1024; a k16 step advances the
// start address by 32 bytes inside the 128-byte row), and N-major for V (the head_dim columns are the N
// dimension, contiguous within a panel; panels LBO = BK * 128 bytes apart; 8-key groups SBO = 1024
// apart; a k16 step advances 16 keys = 2048 bytes).
//
// Semantics are those of fba_fwd.cu: full key tiles without the element mask, partial ones with
// block_mask[q / P][k / P] and the sequence bounds (TMA zero-fills rows past the end), rows with no
// allowed key give 0 and lse = -inf, lse in natural log.
#include <cuda.h>  // CUtensorMap and the driver types only: the encoder is looked up at run time

#include <string>

#include "fba_common.cuh"
#include "fba_sm90.h"

// The body exists only for the sm_90a target (wgmma and setmaxnreg need the "a" feature set); every other
// device pass compiles a kernel that traps (__trap: the launch fails with an error), which the host launcher
// never starts.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SWIFT_SM90_DEVICE 1
#else
#define SWIFT_SM90_DEVICE 0
#endif

namespace swift_kernels {
namespace attention {
namespace {

constexpr int BQ = kSm90TileQ;   // query rows per CTA
constexpr int BK = kSm90TileK;   // keys per tile
constexpr int kWg = 128;         // threads per warpgroup
constexpr int kSm90Threads = 3 * kWg;
constexpr int kConsumerThreads = 2 * kWg;
constexpr int kPanelCols = 64;   // 16-bit elements in one 128-byte swizzled row
constexpr int kProducerRegs = 40;
constexpr int kConsumerRegs = 232;
static_assert(kProducerRegs + 2 * kConsumerRegs <= 65536 / kWg, "register split exceeds the register file");
static_assert(kWg + kConsumerThreads == kSm90Threads, "one producer and two consumer warpgroups");

template <int D>
struct Sm90Config {
  static constexpr int kPanels = D / kPanelCols;
  static constexpr int kStages = D == 64 ? 3 : 2;
  static constexpr int kQPanelBytes = BQ * 128;
  static constexpr int kKPanelBytes = BK * 128;
  static constexpr int kQBytes = kPanels * kQPanelBytes;
  static constexpr int kKBytes = kPanels * kKPanelBytes;  // one K (or V) stage
  static constexpr int kOffK = kQBytes;
  static constexpr int kOffV = kOffK + kStages * kKBytes;
  static constexpr int kOffBar = kOffV + kStages * kKBytes;
  static constexpr int kNumBars = 1 + 3 * kStages;
  // + 1024: the dynamic shared-memory base is aligned up to 1024 bytes at run time (the swizzle atom).
  static constexpr int kSmemBytes = kOffBar + 8 * kNumBars + 1024;
  static_assert(D % kPanelCols == 0, "head_dim must be a multiple of 64");
  static_assert(kQPanelBytes % 1024 == 0 && kKPanelBytes % 1024 == 0, "panels must keep 1024-byte alignment");
};

struct Sm90Params {
  int tokens, heads, block_tokens, num_blocks;
  const int8_t* block_mask;
  float scale_log2;  // softmax scale * log2(e)
  void* out;         // [B, L, H, D] contiguous
  float* lse;        // [B, H, L]
  BlockTable by_query;  // query sparse blocks, walked in key tiles of BK
};

#if SWIFT_SM90_DEVICE
// ---------------------------------------------------------------------------------------------------
// mbarrier, TMA and wgmma wrappers (PTX).
__device__ __forceinline__ void mbar_init(uint32_t bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_expect_tx(uint32_t bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Spin until the phase with the given parity has completed.
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// One box of a 4-D tensor map (coordinates innermost first: head_dim, token, head, batch) into shared
// memory; completion is counted in bytes on `bar`. Out-of-bounds rows are zero-filled.
__device__ __forceinline__ void tma_load_4d(uint32_t dst, const CUtensorMap* map, uint32_t bar, int c0, int c1,
                                            int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%3, %4, %5, %6}], "
      "[%2];\n" ::"r"(dst),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(bar), "r"(c0), "r"(c1), "r"(c2), "r"(c3)
      : "memory");
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keep the compiler from moving accesses of accumulator registers across the asynchronous products.
template <int N>
__device__ __forceinline__ void fence_regs(float (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j) asm volatile("" : "+f"(r[i][j])::"memory");
}

// Shared-memory matrix descriptor with 128-byte swizzle: start address, leading and stride byte offsets
// (all >> 4, 14 bits each at bits 0, 16, 32), base offset 0 (every atom is 1024-byte aligned), swizzle
// mode 1 (128B) at bits 62-63.
__device__ __forceinline__ uint64_t make_desc(uint32_t addr, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  return static_cast<uint64_t>((addr & 0x3FFFFu) >> 4) | (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3FFFu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3FFFu) << 32) | (1ull << 62);
}

// The wgmma wrappers below come in bf16 and f16 variants whose asm differs only in the PTX type suffix;
// each asm statement is written once as a macro taking that suffix (TY: "bf16" or "f16").
// Output operand lists of an f32 accumulator of 8 (N = 64) or 16 (N = 128) chunks d[j][0..3].
#define SWIFT_WGMMA_D8_OUT(d)                                                                       \
  "+f"(d[0][0]), "+f"(d[0][1]), "+f"(d[0][2]), "+f"(d[0][3]), "+f"(d[1][0]), "+f"(d[1][1]),         \
      "+f"(d[1][2]), "+f"(d[1][3]), "+f"(d[2][0]), "+f"(d[2][1]), "+f"(d[2][2]), "+f"(d[2][3]),     \
      "+f"(d[3][0]), "+f"(d[3][1]), "+f"(d[3][2]), "+f"(d[3][3]), "+f"(d[4][0]), "+f"(d[4][1]),     \
      "+f"(d[4][2]), "+f"(d[4][3]), "+f"(d[5][0]), "+f"(d[5][1]), "+f"(d[5][2]), "+f"(d[5][3]),     \
      "+f"(d[6][0]), "+f"(d[6][1]), "+f"(d[6][2]), "+f"(d[6][3]), "+f"(d[7][0]), "+f"(d[7][1]),     \
      "+f"(d[7][2]), "+f"(d[7][3])
#define SWIFT_WGMMA_D16_OUT(d)                                                                      \
  SWIFT_WGMMA_D8_OUT(d), "+f"(d[8][0]), "+f"(d[8][1]), "+f"(d[8][2]), "+f"(d[8][3]),                \
      "+f"(d[9][0]), "+f"(d[9][1]), "+f"(d[9][2]), "+f"(d[9][3]), "+f"(d[10][0]), "+f"(d[10][1]),   \
      "+f"(d[10][2]), "+f"(d[10][3]), "+f"(d[11][0]), "+f"(d[11][1]), "+f"(d[11][2]), "+f"(d[11][3]), \
      "+f"(d[12][0]), "+f"(d[12][1]), "+f"(d[12][2]), "+f"(d[12][3]), "+f"(d[13][0]), "+f"(d[13][1]), \
      "+f"(d[13][2]), "+f"(d[13][3]), "+f"(d[14][0]), "+f"(d[14][1]), "+f"(d[14][2]), "+f"(d[14][3]), \
      "+f"(d[15][0]), "+f"(d[15][1]), "+f"(d[15][2]), "+f"(d[15][3])

// d[64 x 128] (+)= A[64 x 16] * B[16 x 128], A and B K-major in shared memory (descriptors).
#define SWIFT_WGMMA_SS_N128(TY)                                                                     \
  asm volatile(                                                                                     \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                                  \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "                                  \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                     \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "            \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "            \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "           \
      "%64, %65, p, 1, 1, 0, 0;\n}\n"                                                               \
      : SWIFT_WGMMA_D16_OUT(d)                                                                      \
      : "l"(da), "l"(db), "r"(scale_d)                                                              \
      : "memory")

template <bool kBf16>
__device__ __forceinline__ void wgmma_ss_n128(float (&d)[16][4], uint64_t da, uint64_t db, int scale_d) {
  if constexpr (kBf16) {
    SWIFT_WGMMA_SS_N128("bf16");
  } else {
    SWIFT_WGMMA_SS_N128("f16");
  }
}

// d[64 x 64] += A[64 x 16] * B[16 x 64], A from registers (mma.sync A-fragment layout per warp),
// B N-major (imm-trans-b = 1) in shared memory.
#define SWIFT_WGMMA_RS_N64(TY)                                                                      \
  asm volatile(                                                                                     \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"                                                  \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " "                                   \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                     \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, "           \
      "{%32, %33, %34, %35}, %36, p, 1, 1, 1;\n}\n"                                                 \
      : SWIFT_WGMMA_D8_OUT(d)                                                                       \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1)                                 \
      : "memory")

template <bool kBf16>
__device__ __forceinline__ void wgmma_rs_n64(float (&d)[8][4], const uint32_t (&a)[4], uint64_t db) {
  if constexpr (kBf16) {
    SWIFT_WGMMA_RS_N64("bf16");
  } else {
    SWIFT_WGMMA_RS_N64("f16");
  }
}

// d[64 x 128] += A[64 x 16] * B[16 x 128], A from registers (mma.sync A-fragment layout per warp),
// B N-major (imm-trans-b = 1) in shared memory.
#define SWIFT_WGMMA_RS_N128(TY)                                                                     \
  asm volatile(                                                                                     \
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"                                                  \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " "                                  \
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "                     \
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "            \
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "            \
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "           \
      "{%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"                                                 \
      : SWIFT_WGMMA_D16_OUT(d)                                                                      \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(db), "r"(1)                                 \
      : "memory")

template <bool kBf16>
__device__ __forceinline__ void wgmma_rs_n128(float (&d)[16][4], const uint32_t (&a)[4], uint64_t db) {
  if constexpr (kBf16) {
    SWIFT_WGMMA_RS_N128("bf16");
  } else {
    SWIFT_WGMMA_RS_N128("f16");
  }
}

#undef SWIFT_WGMMA_SS_N128
#undef SWIFT_WGMMA_RS_N64
#undef SWIFT_WGMMA_RS_N128
#undef SWIFT_WGMMA_D16_OUT
#undef SWIFT_WGMMA_D8_OUT

// ---------------------------------------------------------------------------------------------------
template <bool kBf16, int D>
__device__ __forceinline__ void wgmma_pv(float (&o)[D / 8][4], const uint32_t (&a)[4], uint64_t db) {
  if constexpr (D == 64) {
    wgmma_rs_n64<kBf16>(o, a, db);
  } else {
    wgmma_rs_n128<kBf16>(o, a, db);
  }
}
#endif  // SWIFT_SM90_DEVICE

template <class Tr, int D>
__global__ void __launch_bounds__(kSm90Threads, 1)
    fba_fwd_sm90_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                        const __grid_constant__ CUtensorMap tm_v, const Sm90Params p) {
#if SWIFT_SM90_DEVICE
  using Cfg = Sm90Config<D>;
  constexpr int S = Cfg::kStages;
  extern __shared__ unsigned char smem_raw[];
  const uint32_t base = (smem_u32(smem_raw) + 1023u) & ~1023u;
  const uint32_t sQ = base;
  const uint32_t sK = base + Cfg::kOffK;
  const uint32_t sV = base + Cfg::kOffV;
  const uint32_t bar_q = base + Cfg::kOffBar;
  const auto full_k = [&](int s) { return bar_q + 8u * (1 + s); };
  const auto full_v = [&](int s) { return bar_q + 8u * (1 + S + s); };
  const auto empty = [&](int s) { return bar_q + 8u * (1 + 2 * S + s); };

  const int qt = blockIdx.x;
  const int b = blockIdx.y / p.heads;
  const int h = blockIdx.y % p.heads;
  const int L = p.tokens;
  const TableRow<BK> row = table_row<BK>(p.by_query, qt);
  const int n = row.n;
  // Warp-uniform role (the compiler cannot prove threadIdx.x / 128 uniform by itself).
  const int wg = __shfl_sync(0xffffffffu, static_cast<int>(threadIdx.x) / kWg, 0);

  if (threadIdx.x == 0) {
    mbar_init(bar_q, 1);
    for (int s = 0; s < S; ++s) {
      mbar_init(full_k(s), 1);
      mbar_init(full_v(s), 1);
      mbar_init(empty(s), kConsumerThreads);
    }
    // Make the initialised barriers visible to the async proxy (TMA) before any copy uses them.
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  if (wg == 0) {
    // ------------------------------------------------------------------ producer
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    if (threadIdx.x == 0 && n > 0) {
      mbar_expect_tx(bar_q, Cfg::kQBytes);
#pragma unroll
      for (int pn = 0; pn < Cfg::kPanels; ++pn) {
        tma_load_4d(sQ + pn * Cfg::kQPanelBytes, &tm_q, bar_q, pn * kPanelCols, qt * BQ, h, b);
      }
      for (int it = 0; it < n; ++it) {
        const int s = it % S;
        const uint32_t phase = (it / S) & 1;
        mbar_wait(empty(s), phase ^ 1);  // a fresh barrier passes parity 1 at once: the first S stages are free
        const int k0 = row.start(it);
        mbar_expect_tx(full_k(s), Cfg::kKBytes);
#pragma unroll
        for (int pn = 0; pn < Cfg::kPanels; ++pn) {
          tma_load_4d(sK + s * Cfg::kKBytes + pn * Cfg::kKPanelBytes, &tm_k, full_k(s), pn * kPanelCols, k0, h, b);
        }
        mbar_expect_tx(full_v(s), Cfg::kKBytes);
#pragma unroll
        for (int pn = 0; pn < Cfg::kPanels; ++pn) {
          tma_load_4d(sV + s * Cfg::kKBytes + pn * Cfg::kKPanelBytes, &tm_v, full_v(s), pn * kPanelCols, k0, h, b);
        }
      }
    }
  } else {
    // ------------------------------------------------------------------ consumers
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));
    const int cw = wg - 1;                       // 64-row half of the query tile
    const int warp = (threadIdx.x / 32) % 4;     // warp within the warpgroup: rows warp * 16 ..
    const int lane = threadIdx.x % 32;
    const int tok0 = qt * BQ + cw * 64 + warp * 16;
    const int row0 = tok0 + (lane >> 2);
    const int P = p.block_tokens;
    const int qblk[2] = {row0 < L ? row0 / P : -1, row0 + 8 < L ? (row0 + 8) / P : -1};
    const float c = p.scale_log2;

    float o[D / 8][4];
    zero_acc(o);
    float m[2] = {-INFINITY, -INFINITY};  // running max in log2 units
    float l[2] = {0.f, 0.f};              // per-thread partial row sums
    // This warpgroup's 64 rows of Q start 64 * 128 bytes into each Q panel.
    const uint32_t q_rows = sQ + cw * 64 * 128;
    if (n > 0) mbar_wait(bar_q, 0);

    for (int it = 0; it < n; ++it) {
      const int s = it % S;
      const uint32_t phase = (it / S) & 1;
      const uint32_t k_stage = sK + s * Cfg::kKBytes;
      const uint32_t v_stage = sV + s * Cfg::kKBytes;

      // S = Q K^T: D / 16 k-steps; step kk reads 32 bytes at column (kk % 4) * 16 of panel kk / 4.
      // Accumulator layout of wgmma m64nNk16 (f32): thread (warp w of the warpgroup, lane) holds, for each
      // 8-column chunk j, sc[j][0..1] at row 16w + lane/4, columns 8j + 2(lane%4) + {0,1}, and sc[j][2..3]
      // at row + 8 -- per chunk the mma.sync m16n8 layout, so the masking and softmax of fba_common.cuh apply.
      float sc[BK / 8][4];
      mbar_wait(full_k(s), phase);
      fence_regs(sc);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        const uint32_t off = (kk % 4) * 32;
        const uint64_t da = make_desc(q_rows + (kk / 4) * Cfg::kQPanelBytes + off, 16, 1024);
        const uint64_t db = make_desc(k_stage + (kk / 4) * Cfg::kKPanelBytes + off, 16, 1024);
        wgmma_ss_n128<Tr::kBf16>(sc, da, db, kk > 0 ? 1 : 0);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(sc);

      scale_mask_scores(sc, row.full(it), row.start(it), lane, qblk, L, P, p.block_mask, p.num_blocks, c);
      online_softmax_update(sc, o, m, l);  // as in fba_fwd.cu

      // P as the A operand: the accumulator layout of 8-column chunks 2kk, 2kk + 1 is the A-fragment
      // layout of k-step kk (the same correspondence as for mma.sync).
      uint32_t pf[BK / 16][4];
      acc_to_a<Tr, BK>(pf, sc);

      // O += P V: BK / 16 k-steps of 16 keys (2048 bytes of each V panel); N = D spans the panels.
      mbar_wait(full_v(s), phase);
      fence_regs(o);
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BK / 16; ++kk) {
        const uint64_t db = make_desc(v_stage + kk * 16 * 128, Cfg::kKPanelBytes, 1024);
        wgmma_pv<Tr::kBf16, D>(o, pf[kk], db);
      }
      wgmma_commit();
      wgmma_wait<0>();
      fence_regs(o);
      // This thread's reads of the stage are complete: release it to the producer.
      mbar_arrive(empty(s));
    }

    float inv[2];
    finalize_rows(inv, m, l, p.lse + (static_cast<int64_t>(b) * p.heads + h) * L, row0, L, lane);
    typename Tr::elem* ob = static_cast<typename Tr::elem*>(p.out) + (static_cast<int64_t>(b) * L * p.heads + h) * D;
    store_rows<Tr, D>(ob, static_cast<int64_t>(p.heads) * D, tok0, L, o, inv[0], inv[1], lane);
  }
#elif defined(__CUDA_ARCH__)
  // Compiled for an architecture without wgmma/setmaxnreg: the host never launches this, but if it ever
  // ran (a plain sm_90 cubin loaded on a Hopper), it must fail loudly, not leave out and lse unwritten.
  __trap();
#endif  // SWIFT_SM90_DEVICE
}

// ---------------------------------------------------------------------------------------------------
// Host side.
#ifdef SWIFT_KERNELS_SM90A
constexpr bool kCompiledSm90a = true;
#else
constexpr bool kCompiledSm90a = false;
#endif

using EncodeTiledFn = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                   const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                   CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// cuTensorMapEncodeTiled through the runtime's driver entry point, so the extension needs no link against
// the driver library.
EncodeTiledFn encode_tiled() {
  static EncodeTiledFn fn = nullptr;
  if (fn == nullptr) {
    void* ptr = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050
    check_cuda(cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &ptr, 12000, cudaEnableDefault, &found),
               "fba_fwd_sm90: looking up cuTensorMapEncodeTiled");
#else
    check_cuda(cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &ptr, cudaEnableDefault, &found),
               "fba_fwd_sm90: looking up cuTensorMapEncodeTiled");
#endif
    if (found != cudaDriverEntryPointSuccess || ptr == nullptr) {
      throw std::runtime_error("swift_kernels._C: fba_fwd_sm90: the CUDA driver has no cuTensorMapEncodeTiled");
    }
    fn = reinterpret_cast<EncodeTiledFn>(ptr);
  }
  return fn;
}

// A tensor map over a [B, L, H, D] tensor, dimensions innermost first (D, L, H, B), boxes of 64 head_dim
// columns x `rows` tokens of one (head, batch), 128-byte swizzle, zero fill out of bounds.
CUtensorMap make_map(const void* ptr, const Strides4& st, const Problem& pb, int rows, const char* name) {
  const uint64_t esize = 2;
  const uint64_t dims[4] = {static_cast<uint64_t>(pb.head_dim), static_cast<uint64_t>(pb.tokens),
                            static_cast<uint64_t>(pb.heads), static_cast<uint64_t>(pb.batch)};
  // A dimension of extent 1 is only ever read at coordinate 0, so its stride is free: torch may report any
  // value there (even 0), which the encoder would reject; such dimensions get their contiguous stride.
  const int64_t raw[3] = {st.l, st.h, st.b};
  const int64_t contiguous[3] = {static_cast<int64_t>(pb.heads) * pb.head_dim, pb.head_dim,
                                 static_cast<int64_t>(pb.tokens) * pb.heads * pb.head_dim};
  cuuint64_t strides[3];
  for (int i = 0; i < 3; ++i) {
    const int64_t s = (dims[i + 1] == 1 ? contiguous[i] : raw[i]) * static_cast<int64_t>(esize);
    if (s <= 0 || s % 16 != 0) {
      throw std::runtime_error(std::string("swift_kernels._C: fba_fwd_sm90: ") + name +
                               " needs positive strides that are multiples of 16 bytes");
    }
    strides[i] = static_cast<cuuint64_t>(s);
  }
  const cuuint64_t gdim[4] = {dims[0], dims[1], dims[2], dims[3]};
  const cuuint32_t box[4] = {static_cast<cuuint32_t>(kPanelCols), static_cast<cuuint32_t>(rows), 1, 1};
  const cuuint32_t estride[4] = {1, 1, 1, 1};
  CUtensorMap map;
  const CUresult res = encode_tiled()(
      &map, pb.dtype == DType::kBFloat16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4,
      const_cast<void*>(ptr), gdim, strides, box, estride, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  if (res != CUDA_SUCCESS) {
    throw std::runtime_error(std::string("swift_kernels._C: fba_fwd_sm90: cuTensorMapEncodeTiled failed for ") + name +
                             " (CUresult " + std::to_string(static_cast<int>(res)) + ")");
  }
  return map;
}

template <class Tr, int D>
void launch_sm90(const FwdArgs& args, cudaStream_t stream, const char* name) {
  const auto kernel = fba_fwd_sm90_kernel<Tr, D>;
  constexpr int smem = Sm90Config<D>::kSmemBytes;
  prepare_smem(reinterpret_cast<const void*>(kernel), smem, name);
  const CUtensorMap tq = make_map(args.q, args.sq, args.pb, BQ, "q");
  const CUtensorMap tk = make_map(args.k, args.sk, args.pb, BK, "k");
  const CUtensorMap tv = make_map(args.v, args.sv, args.pb, BK, "v");
  Sm90Params p;
  p.tokens = args.pb.tokens;
  p.heads = args.pb.heads;
  p.block_tokens = args.pb.block_tokens;
  p.num_blocks = args.pb.num_blocks;
  p.block_mask = args.pb.block_mask;
  p.scale_log2 = args.pb.scale * kLog2e;
  p.out = args.out;
  p.lse = args.lse;
  p.by_query = args.by_query;
  const dim3 grid(args.by_query.num_rows, args.pb.batch * args.pb.heads);
  kernel<<<grid, kSm90Threads, smem, stream>>>(tq, tk, tv, p);
  check_cuda(cudaGetLastError(), name);
}

}  // namespace

bool fba_sm90_compiled() { return kCompiledSm90a; }

void fba_forward_sm90(const FwdArgs& args, cudaStream_t stream) {
  if (!kCompiledSm90a) {
    throw std::runtime_error(
        "swift_kernels._C: fba_fwd_sm90 was not compiled for sm_90a (rebuild with SWIFT_KERNELS_CUDA_ARCHS "
        "including 90a)");
  }
  int device = 0, major = 0;
  check_cuda(cudaGetDevice(&device), "fba_fwd_sm90");
  check_cuda(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "fba_fwd_sm90");
  if (major != 9) {
    throw std::runtime_error("swift_kernels._C: fba_fwd_sm90 needs a compute capability 9.x (Hopper) device, got " +
                             std::to_string(major) + ".x");
  }
  if (args.by_query.num_rows == 0 || args.pb.batch * args.pb.heads == 0) return;
  const bool bf16 = args.pb.dtype == DType::kBFloat16;
  switch (args.pb.head_dim) {
    case 64:
      bf16 ? launch_sm90<BF16, 64>(args, stream, "fba_fwd_sm90_kernel<bf16, 64>")
           : launch_sm90<F16, 64>(args, stream, "fba_fwd_sm90_kernel<fp16, 64>");
      break;
    case 128:
      bf16 ? launch_sm90<BF16, 128>(args, stream, "fba_fwd_sm90_kernel<bf16, 128>")
           : launch_sm90<F16, 128>(args, stream, "fba_fwd_sm90_kernel<fp16, 128>");
      break;
    default:
      throw std::runtime_error("swift_kernels._C: fba_fwd_sm90 supports head_dim 64 and 128, got " +
                               std::to_string(args.pb.head_dim));
  }
}

}  // namespace attention
}  // namespace swift_kernels
