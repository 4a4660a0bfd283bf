// Backward of frame-block-sparse attention (mma.sync, sm_80+), as three kernels and no atomics, so the
// gradients are deterministic:
//   1. fba_bwd_delta_kernel: delta = rowsum(dO * O) in fp32, [B, H, L].
//   2. fba_bwd_dq_kernel: per query sparse block of 128 (8 warps x 16 rows), walks the forward (kv_*) table's
//      sparse blocks in key tiles of 64: S = Q K^T, P = exp(S * scale - lse), dP = dO V^T, dS = P (dP - delta),
//      dQ += dS K.
//   3. fba_bwd_dkdv_kernel: per key sparse block of 128 (8 warps x 16 keys), walks the transposed (q_*) table's
//      sparse blocks in query tiles of 64: S^T = K Q^T, P^T, dP^T = V dO^T, dS^T, dV += P^T dO, dK += dS^T Q.
// S and dP are computed twice (once per kernel); the price of not reducing dQ across CTAs with atomics.
// Rows with lse = -inf (no allowed key) get P = 0 and so contribute nothing.
#include "fba_common.cuh"

namespace swift_kernels {
namespace attention {
namespace {

// ---------------------------------------------------------------------------------------------------
// delta[b, h, t] = sum_d dO[b, t, h, d] * O[b, t, h, d]; one warp per (b, t, h) row.
template <class Tr, int D>
__global__ void __launch_bounds__(kThreads) fba_bwd_delta_kernel(const BwdArgs args) {
  using E = typename Tr::elem;
  const Problem& pb = args.pb;
  const int64_t rows = static_cast<int64_t>(pb.batch) * pb.tokens * pb.heads;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * (kThreads / 32) + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const int h = static_cast<int>(row % pb.heads);
  const int64_t bt = row / pb.heads;
  const int t = static_cast<int>(bt % pb.tokens);
  const int b = static_cast<int>(bt / pb.tokens);
  const E* dob = static_cast<const E*>(args.dout) + b * args.sdo.b + t * args.sdo.l + h * args.sdo.h;
  const E* ob = static_cast<const E*>(args.out) + b * args.so.b + t * args.so.l + h * args.so.h;
  float acc = 0.f;
#pragma unroll
  for (int d = lane; d < D; d += 32) acc += Tr::to_float(dob[d]) * Tr::to_float(ob[d]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
  if (lane == 0) args.delta[(static_cast<int64_t>(b) * pb.heads + h) * pb.tokens + t] = acc;
}

// ---------------------------------------------------------------------------------------------------
// dQ. Shared memory: Q and dO staged in [0, 256 D); afterwards the same space holds two stages of
// (K [64 x D], V [64 x D]).
constexpr int DQ_BQ = kFwdTileQ;
constexpr int DQ_BK = kFwdTileK;

template <int D>
constexpr int dq_smem_bytes() {
  return 2 * (2 * DQ_BK * D) * 2;
}

template <class Tr, int D>
__global__ void __launch_bounds__(kThreads, 1) fba_bwd_dq_kernel(const BwdArgs args) {
  static_assert(2 * DQ_BK == DQ_BQ, "the K/V stages must exactly alias the Q/dO staging tiles");
  using E = typename Tr::elem;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  E* smem = reinterpret_cast<E*>(smem_raw);

  const Problem& pb = args.pb;
  const int qt = blockIdx.x;
  const int b = blockIdx.y / pb.heads;
  const int h = blockIdx.y % pb.heads;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int q0 = qt * DQ_BQ;
  const int L = pb.tokens;
  const int P = pb.block_tokens;

  const E* qb = head_base<E>(args.q, args.sq, b, h);
  const E* dob = head_base<E>(args.dout, args.sdo, b, h);
  const E* kb = head_base<E>(args.k, args.sk, b, h);
  const E* vb = head_base<E>(args.v, args.sv, b, h);

  const TableRow<DQ_BK> row = table_row<DQ_BK>(args.by_query, qt);
  const int n = row.n;

  load_tile<DQ_BQ, D>(smem, qb, args.sq.l, q0, L, tid);
  load_tile<DQ_BQ, D>(smem + DQ_BQ * D, dob, args.sdo.l, q0, L, tid);
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[D / 16][4];
  uint32_t dof[D / 16][4];
  load_a_frags<D>(qf, smem, warp * 16, lane);
  load_a_frags<D>(dof, smem + DQ_BQ * D, warp * 16, lane);
  __syncthreads();  // the staging space becomes the K/V stages

  const int row0 = q0 + warp * 16 + (lane >> 2);
  const int64_t stat_base = (static_cast<int64_t>(b) * pb.heads + h) * L;
  int qblk[2];
  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = row0 + 8 * r;
    qblk[r] = row < L ? row / P : -1;
    const float lse = row < L ? args.lse[stat_base + row] : -INFINITY;
    // -inf (no allowed key) becomes +inf so that exp2(s - lse2) = 0 for the whole row.
    lse2[r] = lse == -INFINITY ? INFINITY : lse * kLog2e;
    dlt[r] = row < L ? args.delta[stat_base + row] : 0.f;
  }
  const float c = pb.scale * kLog2e;

  float dq[D / 8][4];
  zero_acc(dq);
  if (n > 0) {
    const int k0 = row.start(0);
    load_tile<DQ_BK, D>(smem, kb, args.sk.l, k0, L, tid);
    load_tile<DQ_BK, D>(smem + DQ_BK * D, vb, args.sv.l, k0, L, tid);
    cp_async_commit();
  }
  for (int it = 0; it < n; ++it) {
    E* sK = smem + (it & 1) * (2 * DQ_BK * D);
    E* sV = sK + DQ_BK * D;
    prefetch_next_kv<DQ_BK, D>(smem, it, row, kb, args.sk.l, vb, args.sv.l, L, tid);
    __syncthreads();

    float s[DQ_BK / 8][4];
    zero_acc(s);
    gemm_abt<Tr, DQ_BK, D>(s, qf, sK, lane);
    const int k0 = row.start(it);
    const bool full = row.full(it);
#pragma unroll
    for (int nt = 0; nt < DQ_BK / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        bool ok = true;
        if (!full) {
          const int col = k0 + nt * 8 + (lane & 3) * 2 + (i & 1);
          const int qbk = qblk[i >> 1];
          ok = col < L && qbk >= 0 && __ldg(pb.block_mask + qbk * pb.num_blocks + col / P) != 0;
        }
        s[nt][i] = ok ? exp2f(s[nt][i] * c - lse2[i >> 1]) : 0.f;
      }
    }
    float dp[DQ_BK / 8][4];
    zero_acc(dp);
    gemm_abt<Tr, DQ_BK, D>(dp, dof, sV, lane);
#pragma unroll
    for (int nt = 0; nt < DQ_BK / 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) dp[nt][i] = s[nt][i] * (dp[nt][i] - dlt[i >> 1]);
    uint32_t dsf[DQ_BK / 16][4];
    acc_to_a<Tr, DQ_BK>(dsf, dp);
    gemm_ab<Tr, DQ_BK / 16, D>(dq, dsf, sK, lane);
    __syncthreads();
  }
  E* out = static_cast<E*>(args.dq) + (static_cast<int64_t>(b) * L * pb.heads + h) * D;
  store_rows<Tr, D>(out, static_cast<int64_t>(pb.heads) * D, q0 + warp * 16, L, dq, pb.scale, pb.scale, lane);
}

// ---------------------------------------------------------------------------------------------------
// dK, dV. Shared memory: K, V [128 x D] for the whole kernel, then one query tile Q, dO [64 x D] and its
// lse (log2 units) and delta. The next tile's Q is fetched while dV is computed from the current dO, and
// the next dO after that, so the loads overlap the products.
constexpr int KV_BK = kBwdTileK;
constexpr int KV_BQ = kBwdTileQ;

template <int D>
constexpr int dkdv_smem_bytes() {
  return (2 * KV_BK * D + 2 * KV_BQ * D) * 2 + 2 * KV_BQ * 4;
}

template <class E>
__device__ __forceinline__ void load_row_stats(float* s_lse, float* s_dlt, const BwdArgs& args, int64_t stat_base,
                                               int q0, int tid) {
  if (tid < KV_BQ) {
    const int row = q0 + tid;
    const bool in = row < args.pb.tokens;
    const float lse = in ? args.lse[stat_base + row] : -INFINITY;
    s_lse[tid] = lse == -INFINITY ? INFINITY : lse * kLog2e;  // rows with no key (or past the end): P = 0
    s_dlt[tid] = in ? args.delta[stat_base + row] : 0.f;
  }
}

template <class Tr, int D>
__global__ void __launch_bounds__(kThreads, 1) fba_bwd_dkdv_kernel(const BwdArgs args) {
  using E = typename Tr::elem;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  E* sK = reinterpret_cast<E*>(smem_raw);
  E* sV = sK + KV_BK * D;
  E* sQ = sV + KV_BK * D;
  E* sdO = sQ + KV_BQ * D;
  float* s_lse = reinterpret_cast<float*>(sdO + KV_BQ * D);
  float* s_dlt = s_lse + KV_BQ;

  const Problem& pb = args.pb;
  const int kt = blockIdx.x;
  const int b = blockIdx.y / pb.heads;
  const int h = blockIdx.y % pb.heads;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int k0 = kt * KV_BK;
  const int L = pb.tokens;
  const int P = pb.block_tokens;
  const int64_t stat_base = (static_cast<int64_t>(b) * pb.heads + h) * L;

  const E* qb = head_base<E>(args.q, args.sq, b, h);
  const E* dob = head_base<E>(args.dout, args.sdo, b, h);
  const E* kb = head_base<E>(args.k, args.sk, b, h);
  const E* vb = head_base<E>(args.v, args.sv, b, h);

  const TableRow<KV_BQ> row = table_row<KV_BQ>(args.by_key, kt);
  const int n = row.n;

  load_tile<KV_BK, D>(sK, kb, args.sk.l, k0, L, tid);
  load_tile<KV_BK, D>(sV, vb, args.sv.l, k0, L, tid);
  cp_async_commit();
  if (n > 0) {
    const int q0 = row.start(0);
    load_tile<KV_BQ, D>(sQ, qb, args.sq.l, q0, L, tid);
    cp_async_commit();
    load_tile<KV_BQ, D>(sdO, dob, args.sdo.l, q0, L, tid);
    cp_async_commit();
    load_row_stats<E>(s_lse, s_dlt, args, stat_base, q0, tid);
  }

  const int krow0 = k0 + warp * 16 + (lane >> 2);
  const int kblk[2] = {krow0 < L ? krow0 / P : -1, krow0 + 8 < L ? (krow0 + 8) / P : -1};
  const float c = pb.scale * kLog2e;
  float dk[D / 8][4], dv[D / 8][4];
  zero_acc(dk);
  zero_acc(dv);

  for (int it = 0; it < n; ++it) {
    cp_async_wait<1>();  // K, V and this tile's Q have landed; dO may still be in flight
    __syncthreads();
    const int q0 = row.start(it);
    const bool full = row.full(it);

    // P^T [16 keys x 64 queries] per warp.
    float p[KV_BQ / 8][4];
    zero_acc(p);
    gemm_abt_ss<Tr, KV_BQ, D>(p, sK, warp * 16, sQ, lane);
#pragma unroll
    for (int nt = 0; nt < KV_BQ / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int cq = nt * 8 + (lane & 3) * 2 + (i & 1);
        bool ok = true;
        if (!full) {
          const int q = q0 + cq;
          const int kbk = kblk[i >> 1];
          ok = q < L && kbk >= 0 && __ldg(pb.block_mask + (q / P) * pb.num_blocks + kbk) != 0;
        }
        p[nt][i] = ok ? exp2f(p[nt][i] * c - s_lse[cq]) : 0.f;
      }
    }

    cp_async_wait<0>();
    __syncthreads();  // dO has landed
    float ds[KV_BQ / 8][4];
    zero_acc(ds);
    gemm_abt_ss<Tr, KV_BQ, D>(ds, sV, warp * 16, sdO, lane);
#pragma unroll
    for (int nt = 0; nt < KV_BQ / 8; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int cq = nt * 8 + (lane & 3) * 2 + (i & 1);
        ds[nt][i] = p[nt][i] * (ds[nt][i] - s_dlt[cq]);
      }
    }
    uint32_t af[KV_BQ / 16][4];
    acc_to_a<Tr, KV_BQ>(af, ds);
    gemm_ab<Tr, KV_BQ / 16, D>(dk, af, sQ, lane);
    __syncthreads();  // every warp is done with Q, lse and delta of this tile
    const bool more = it + 1 < n;
    if (more) {
      const int q0n = row.start(it + 1);
      load_tile<KV_BQ, D>(sQ, qb, args.sq.l, q0n, L, tid);
      cp_async_commit();
      load_row_stats<E>(s_lse, s_dlt, args, stat_base, q0n, tid);
    }
    acc_to_a<Tr, KV_BQ>(af, p);
    gemm_ab<Tr, KV_BQ / 16, D>(dv, af, sdO, lane);
    __syncthreads();  // every warp is done with dO
    if (more) {
      load_tile<KV_BQ, D>(sdO, dob, args.sdo.l, row.start(it + 1), L, tid);
      cp_async_commit();
    }
  }
  if (n == 0) cp_async_wait<0>();  // no copy may outlive the kernel's shared memory

  const int64_t row_stride = static_cast<int64_t>(pb.heads) * D;
  const int64_t head_off = (static_cast<int64_t>(b) * L * pb.heads + h) * D;
  store_rows<Tr, D>(static_cast<E*>(args.dk) + head_off, row_stride, k0 + warp * 16, L, dk, pb.scale, pb.scale,
                    lane);
  store_rows<Tr, D>(static_cast<E*>(args.dv) + head_off, row_stride, k0 + warp * 16, L, dv, 1.f, 1.f, lane);
}

// ---------------------------------------------------------------------------------------------------
template <class Tr, int D>
void launch_bwd(const BwdArgs& args, cudaStream_t stream, const char* tag) {
  const Problem& pb = args.pb;
  const std::string t(tag);
  {
    const std::string name = "fba_bwd_delta_kernel<" + t + ">";
    const int64_t rows = static_cast<int64_t>(pb.batch) * pb.tokens * pb.heads;
    const int64_t blocks = (rows + kThreads / 32 - 1) / (kThreads / 32);
    if (blocks > 0x7fffffffLL) throw std::runtime_error("swift_kernels._C: " + name + ": too many rows");
    fba_bwd_delta_kernel<Tr, D><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(args);
    check_cuda(cudaGetLastError(), name.c_str());
  }
  {
    const std::string name = "fba_bwd_dq_kernel<" + t + ">";
    const auto kernel = fba_bwd_dq_kernel<Tr, D>;
    constexpr int smem = dq_smem_bytes<D>();
    prepare_smem(reinterpret_cast<const void*>(kernel), smem, name.c_str());
    kernel<<<dim3(args.by_query.num_rows, pb.batch * pb.heads), kThreads, smem, stream>>>(args);
    check_cuda(cudaGetLastError(), name.c_str());
  }
  {
    const std::string name = "fba_bwd_dkdv_kernel<" + t + ">";
    const auto kernel = fba_bwd_dkdv_kernel<Tr, D>;
    constexpr int smem = dkdv_smem_bytes<D>();
    prepare_smem(reinterpret_cast<const void*>(kernel), smem, name.c_str());
    kernel<<<dim3(args.by_key.num_rows, pb.batch * pb.heads), kThreads, smem, stream>>>(args);
    check_cuda(cudaGetLastError(), name.c_str());
  }
}

}  // namespace

void fba_backward(const BwdArgs& args, cudaStream_t stream) {
  if (args.pb.batch * args.pb.heads == 0 || args.pb.tokens == 0) return;
  const bool bf16 = args.pb.dtype == DType::kBFloat16;
  switch (args.pb.head_dim) {
    case 64:
      bf16 ? launch_bwd<BF16, 64>(args, stream, "bf16, 64") : launch_bwd<F16, 64>(args, stream, "fp16, 64");
      break;
    case 128:
      bf16 ? launch_bwd<BF16, 128>(args, stream, "bf16, 128") : launch_bwd<F16, 128>(args, stream, "fp16, 128");
      break;
    default:
      throw std::runtime_error("swift_kernels._C: fba_backward supports head_dim 64 and 128, got " +
                               std::to_string(args.pb.head_dim));
  }
}

}  // namespace attention
}  // namespace swift_kernels
