// Forward of frame-block-sparse attention: FlashAttention-2 style, mma.sync (sm_80+), driven by the plan's
// tables. One CTA of 8 warps owns a query tile of 128 tokens (one sparse block) of one (batch, head); each warp
// owns 16 query rows and keeps their Q fragments in registers. The CTA walks the sparse blocks its table row
// lists in key tiles of 64 tokens: full ones first with no element mask, then partial ones with the element mask
// block_mask[q / P][k / P] and the sequence bounds. K/V tiles are double-buffered with cp.async; the
// second buffer reuses the shared memory that staged Q.
//
// Work order: blockIdx.x is the query tile and blockIdx.y the (batch, head), so the CTAs resident at one
// time are consecutive query tiles of the same head. They share most key tiles (the anchor block is read
// by every tile), which therefore stay hot in L2.
#include "fba_common.cuh"

namespace swift_kernels {
namespace attention {
namespace {

constexpr int BQ = kFwdTileQ;  // 128 query rows per CTA, 16 per warp
constexpr int BK = kFwdTileK;  // 64 keys per tile

template <int D>
constexpr int fwd_smem_bytes() {
  // Stage 0: K0 [BK x D] + V0 [BK x D]; stage 1 (same size) first holds Q [BQ x D].
  return 2 * (2 * BK * D) * 2;
}

template <class Tr, int D>
__global__ void __launch_bounds__(kThreads, 1) fba_fwd_kernel(const FwdArgs args) {
  static_assert(2 * BK == BQ, "stage 1 must exactly alias the Q staging tile");
  using E = typename Tr::elem;
  extern __shared__ __align__(128) unsigned char smem_raw[];
  E* smem = reinterpret_cast<E*>(smem_raw);
  E* sQ = smem + 2 * BK * D;

  const Problem& pb = args.pb;
  const int qt = blockIdx.x;
  const int b = blockIdx.y / pb.heads;
  const int h = blockIdx.y % pb.heads;
  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int q0 = qt * BQ;
  const int L = pb.tokens;
  const int P = pb.block_tokens;

  const E* qb = head_base<E>(args.q, args.sq, b, h);
  const E* kb = head_base<E>(args.k, args.sk, b, h);
  const E* vb = head_base<E>(args.v, args.sv, b, h);

  const TableRow<BK> row = table_row<BK>(args.by_query, qt);
  const int n = row.n;

  load_tile<BQ, D>(sQ, qb, args.sq.l, q0, L, tid);
  cp_async_commit();
  if (n > 0) {
    const int k0 = row.start(0);
    load_tile<BK, D>(smem, kb, args.sk.l, k0, L, tid);
    load_tile<BK, D>(smem + BK * D, vb, args.sv.l, k0, L, tid);
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
  uint32_t qf[D / 16][4];
  load_a_frags<D>(qf, sQ, warp * 16, lane);
  __syncthreads();  // everyone holds its Q: stage 1 may be overwritten

  float o[D / 8][4];
  zero_acc(o);
  float m[2] = {-INFINITY, -INFINITY};  // running max, in log2 units (scores * scale * log2 e)
  float l[2] = {0.f, 0.f};              // this thread's partial row sums (reduced at the end)
  const int row0 = q0 + warp * 16 + (lane >> 2);
  // Query block of each of this thread's two rows; -1 past the end (such rows are masked everywhere).
  const int qblk[2] = {row0 < L ? row0 / P : -1, row0 + 8 < L ? (row0 + 8) / P : -1};
  const float c = pb.scale * kLog2e;

  for (int it = 0; it < n; ++it) {
    E* sK = smem + (it & 1) * (2 * BK * D);
    E* sV = sK + BK * D;
    prefetch_next_kv<BK, D>(smem, it, row, kb, args.sk.l, vb, args.sv.l, L, tid);
    __syncthreads();

    float s[BK / 8][4];
    zero_acc(s);
    gemm_abt<Tr, BK, D>(s, qf, sK, lane);

    scale_mask_scores(s, row.full(it), row.start(it), lane, qblk, L, P, pb.block_mask, pb.num_blocks, c);
    online_softmax_update(s, o, m, l);

    uint32_t pf[BK / 16][4];
    acc_to_a<Tr, BK>(pf, s);
    gemm_ab<Tr, BK / 16, D>(o, pf, sV, lane);
    __syncthreads();  // this stage is refilled two iterations later
  }

  float inv[2];
  finalize_rows(inv, m, l, args.lse + (static_cast<int64_t>(b) * pb.heads + h) * L, row0, L, lane);
  E* ob = static_cast<E*>(args.out) + (static_cast<int64_t>(b) * L * pb.heads + h) * D;
  store_rows<Tr, D>(ob, static_cast<int64_t>(pb.heads) * D, q0 + warp * 16, L, o, inv[0], inv[1], lane);
}

template <class Tr, int D>
void launch_fwd(const FwdArgs& args, cudaStream_t stream, const char* name) {
  const auto kernel = fba_fwd_kernel<Tr, D>;
  constexpr int smem = fwd_smem_bytes<D>();
  prepare_smem(reinterpret_cast<const void*>(kernel), smem, name);
  const dim3 grid(args.by_query.num_rows, args.pb.batch * args.pb.heads);
  kernel<<<grid, kThreads, smem, stream>>>(args);
  check_cuda(cudaGetLastError(), name);
}

}  // namespace

void fba_forward(const FwdArgs& args, cudaStream_t stream) {
  if (args.by_query.num_rows == 0 || args.pb.batch * args.pb.heads == 0) return;
  const bool bf16 = args.pb.dtype == DType::kBFloat16;
  switch (args.pb.head_dim) {
    case 64:
      bf16 ? launch_fwd<BF16, 64>(args, stream, "fba_fwd_kernel<bf16, 64>")
           : launch_fwd<F16, 64>(args, stream, "fba_fwd_kernel<fp16, 64>");
      break;
    case 128:
      bf16 ? launch_fwd<BF16, 128>(args, stream, "fba_fwd_kernel<bf16, 128>")
           : launch_fwd<F16, 128>(args, stream, "fba_fwd_kernel<fp16, 128>");
      break;
    default:
      throw std::runtime_error("swift_kernels._C: fba_forward supports head_dim 64 and 128, got " +
                               std::to_string(args.pb.head_dim));
  }
}

}  // namespace attention
}  // namespace swift_kernels
