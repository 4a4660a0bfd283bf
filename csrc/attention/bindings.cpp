// pybind11 bindings of the extension swift_kernels._C: the only translation unit that includes torch.
//
// Exposed (all tensors on one CUDA device):
//   tile_sizes(head_dim) -> (tile_q, tile_k)
//       the tiles of the forward schedule (also used by the dQ backward kernel).
//   bwd_tile_sizes(head_dim) -> (tile_q, tile_k)
//       the tiles of the schedule whose transpose (by_key) drives the dK/dV backward kernel.
//   fwd(q, k, v, mask_i8, block_tokens, scale, q_indptr, q_num_full, q_indices) -> (out, lse)
//       q, k, v: [B, L, H, D] fp16/bf16, stride(-1) == 1, L = n_blocks * block_tokens, D in {64, 128};
//       mask_i8: int8 [n_blocks, n_blocks] (nonzero = allowed); q_*: the by_query CSR (int32) of a schedule
//       built with tile_sizes(D). Returns out [B, L, H, D] (q's dtype, contiguous) and lse fp32 [B, H, L]
//       (natural log; -inf and a zero output row for a query with no allowed key).
//   sm90_tile_sizes(head_dim) -> (tile_q, tile_k)
//       the tiles of the schedule that fwd_sm90 walks.
//   fwd_sm90(q, k, v, mask_i8, block_tokens, scale, q_indptr, q_num_full, q_indices) -> (out, lse)
//       the Hopper (sm_90a: TMA + wgmma) forward, the same arguments and results as fwd, with q_* the
//       by_query CSR of a schedule built with sm90_tile_sizes(D). Raises RuntimeError when the module was
//       not compiled for sm_90a (HAS_SM90 is False) or the device is not compute capability 9.x.
//       Opt-in until verified on a GPU (see swift_kernels/attention/cuda_backend.py).
//   bwd(dout, q, k, v, out, lse, mask_i8, block_tokens, scale,
//       q_indptr, q_num_full, q_indices, k_indptr, k_num_full, k_indices) -> (dq, dk, dv)
//       q_*: as for fwd; k_*: the by_key CSR of a schedule built with bwd_tile_sizes(D).
// Bad arguments raise ValueError / TypeError naming the argument; CUDA errors raise RuntimeError naming
// the kernel. The CSR contents are trusted (they come from swift_kernels.attention.schedule).
#include <torch/extension.h>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>
#include <limits>
#include <string>
#include <tuple>

#include "fba_launch.h"
#include "fba_sm90.h"

namespace sa = swift_kernels::attention;

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

void check_head_dim(int64_t head_dim) {
  TORCH_CHECK_VALUE(head_dim == 64 || head_dim == 128,
                    "swift_kernels._C: head_dim must be 64 or 128, got ", head_dim);
}

// Validate q/k/v-like tensors: 4-D, CUDA, fp16/bf16, same shape/dtype/device as `ref`, unit head stride.
void check_qkv(const at::Tensor& t, const char* name, const at::Tensor& ref) {
  TORCH_CHECK_VALUE(t.is_cuda(), "swift_kernels._C: ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK_TYPE(t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
                   "swift_kernels._C: ", name, " must be float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 4, "swift_kernels._C: ", name, " must be [batch, tokens, heads, head_dim], got ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.sizes() == ref.sizes(), "swift_kernels._C: ", name, " must have the shape of q ",
                    ref.sizes(), ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), "swift_kernels._C: ", name, " must have the dtype of q (",
                   ref.scalar_type(), "), got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.device() == ref.device(), "swift_kernels._C: ", name, " must be on the device of q (",
                    ref.device(), "), got ", t.device());
  TORCH_CHECK_VALUE(t.stride(3) == 1, "swift_kernels._C: ", name,
                    " must be contiguous in head_dim (stride(-1) == 1), got strides ", t.strides());
}

// The kernels copy 16-byte chunks: every row must start 16-byte aligned. Tensors that are not (odd
// strides or offsets) are copied into a fresh contiguous tensor rather than rejected.
at::Tensor aligned(const at::Tensor& t) {
  const bool ok = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 && t.stride(0) % 8 == 0 &&
                  t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

// The TMA descriptors of the sm_90a kernel also need a positive stride in every dimension longer than 1
// (an expanded tensor has stride 0 there): copy such tensors too.
at::Tensor tma_ready(const at::Tensor& t) {
  const at::Tensor a = aligned(t);
  for (int d = 0; d < 3; ++d) {
    if (a.size(d) > 1 && a.stride(d) <= 0) return a.clone(at::MemoryFormat::Contiguous);
  }
  return a;
}

sa::Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2)}; }

sa::Problem make_problem(const at::Tensor& q, const at::Tensor& mask, int64_t block_tokens, double scale) {
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2), D = q.size(3);
  check_head_dim(D);
  TORCH_CHECK_VALUE(block_tokens >= 1, "swift_kernels._C: block_tokens must be >= 1, got ", block_tokens);
  TORCH_CHECK_VALUE(mask.is_cuda() && mask.device() == q.device(),
                    "swift_kernels._C: mask_i8 must be on the device of q (", q.device(), "), got ", mask.device());
  TORCH_CHECK_TYPE(mask.scalar_type() == at::kChar, "swift_kernels._C: mask_i8 must be int8, got ",
                   mask.scalar_type());
  TORCH_CHECK_VALUE(mask.dim() == 2 && mask.size(0) == mask.size(1) && mask.is_contiguous(),
                    "swift_kernels._C: mask_i8 must be a contiguous square [n_blocks, n_blocks] tensor, got ",
                    mask.sizes());
  const int64_t nb = mask.size(0);
  TORCH_CHECK_VALUE(L == nb * block_tokens, "swift_kernels._C: tokens (", L, ") must equal n_blocks (", nb,
                    ") * block_tokens (", block_tokens, ")");
  // Token indices, tile starts and mask indices are int32 inside the kernels; offsets are int64.
  TORCH_CHECK_VALUE(L + 256 < std::numeric_limits<int32_t>::max() && nb * nb < std::numeric_limits<int32_t>::max(),
                    "swift_kernels._C: tokens (", L, ") too large for int32 token indexing");
  TORCH_CHECK_VALUE(B * H <= 65535, "swift_kernels._C: batch * heads (", B * H, ") must be <= 65535 (grid.y)");
  sa::Problem pb;
  pb.batch = static_cast<int>(B);
  pb.tokens = static_cast<int>(L);
  pb.heads = static_cast<int>(H);
  pb.head_dim = static_cast<int>(D);
  pb.block_tokens = static_cast<int>(block_tokens);
  pb.num_blocks = static_cast<int>(nb);
  pb.block_mask = mask.data_ptr<int8_t>();
  pb.scale = static_cast<float>(scale);
  pb.dtype = q.scalar_type() == at::kBFloat16 ? sa::DType::kBFloat16 : sa::DType::kFloat16;
  return pb;
}

sa::Csr make_csr(const at::Tensor& indptr, const at::Tensor& num_full, const at::Tensor& indices, int64_t rows,
                 const at::Tensor& q, const char* which) {
  const std::string w(which);
  const auto check = [&](const at::Tensor& t, const std::string& name) {
    TORCH_CHECK_VALUE(t.is_cuda() && t.device() == q.device(), "swift_kernels._C: ", name,
                      " must be on the device of q (", q.device(), "), got ", t.device());
    TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, "swift_kernels._C: ", name, " must be int32, got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == 1 && t.is_contiguous(), "swift_kernels._C: ", name,
                      " must be a contiguous 1-D tensor, got ", t.sizes());
  };
  check(indptr, w + "_indptr");
  check(num_full, w + "_num_full");
  check(indices, w + "_indices");
  TORCH_CHECK_VALUE(indptr.numel() == rows + 1, "swift_kernels._C: ", w, "_indptr must have ", rows + 1,
                    " entries for this sequence and tile size, got ", indptr.numel(),
                    " (was the schedule built with the extension's tile sizes?)");
  TORCH_CHECK_VALUE(num_full.numel() == rows, "swift_kernels._C: ", w, "_num_full must have ", rows,
                    " entries, got ", num_full.numel());
  return {indptr.data_ptr<int32_t>(), num_full.data_ptr<int32_t>(), indices.data_ptr<int32_t>(),
          static_cast<int>(rows)};
}

// Run a launcher and re-raise its std::runtime_error as a torch error (RuntimeError in Python).
template <class F>
void guarded(F&& f) {
  try {
    f();
  } catch (const std::runtime_error& e) {
    TORCH_CHECK(false, e.what());
  }
}

// The forward of both kernels (sm90 selects the Hopper one; its schedule has query tiles of kSm90TileQ).
std::tuple<at::Tensor, at::Tensor> fwd_impl(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                            const at::Tensor& mask, int64_t block_tokens, double scale,
                                            const at::Tensor& q_indptr, const at::Tensor& q_num_full,
                                            const at::Tensor& q_indices, bool sm90) {
  check_qkv(q_in, "q", q_in);
  check_qkv(k_in, "k", q_in);
  check_qkv(v_in, "v", q_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = sm90 ? tma_ready(q_in) : aligned(q_in);
  const at::Tensor k = sm90 ? tma_ready(k_in) : aligned(k_in);
  const at::Tensor v = sm90 ? tma_ready(v_in) : aligned(v_in);
  sa::FwdArgs args{};
  args.pb = make_problem(q, mask, block_tokens, scale);
  const int64_t B = q.size(0), L = q.size(1), H = q.size(2);
  const int64_t tile_q = sm90 ? sa::kSm90TileQ : sa::kFwdTileQ;
  args.by_query = make_csr(q_indptr, q_num_full, q_indices, ceil_div(L, tile_q), q, "q");
  at::Tensor out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor lse = at::empty({B, H, L}, q.options().dtype(at::kFloat));
  args.q = q.data_ptr();
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.sq = strides_of(q);
  args.sk = strides_of(k);
  args.sv = strides_of(v);
  args.out = out.data_ptr();
  args.lse = lse.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  if (sm90) {
    guarded([&] { sa::fba_forward_sm90(args, stream); });
  } else {
    guarded([&] { sa::fba_forward(args, stream); });
  }
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor> fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       const at::Tensor& mask, int64_t block_tokens, double scale,
                                       const at::Tensor& q_indptr, const at::Tensor& q_num_full,
                                       const at::Tensor& q_indices) {
  return fwd_impl(q, k, v, mask, block_tokens, scale, q_indptr, q_num_full, q_indices, false);
}

std::tuple<at::Tensor, at::Tensor> fwd_sm90(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& mask, int64_t block_tokens, double scale,
                                            const at::Tensor& q_indptr, const at::Tensor& q_num_full,
                                            const at::Tensor& q_indices) {
  return fwd_impl(q, k, v, mask, block_tokens, scale, q_indptr, q_num_full, q_indices, true);
}

#ifndef SWIFT_KERNELS_NO_BACKWARD
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& mask, int64_t block_tokens, double scale,
    const at::Tensor& q_indptr, const at::Tensor& q_num_full, const at::Tensor& q_indices,
    const at::Tensor& k_indptr, const at::Tensor& k_num_full, const at::Tensor& k_indices) {
  check_qkv(q_in, "q", q_in);
  check_qkv(k_in, "k", q_in);
  check_qkv(v_in, "v", q_in);
  check_qkv(out_in, "out", q_in);
  check_qkv(dout_in, "dout", q_in);
  const int64_t B = q_in.size(0), L = q_in.size(1), H = q_in.size(2);
  TORCH_CHECK_VALUE(lse_in.is_cuda() && lse_in.device() == q_in.device(),
                    "swift_kernels._C: lse must be on the device of q (", q_in.device(), "), got ", lse_in.device());
  TORCH_CHECK_TYPE(lse_in.scalar_type() == at::kFloat, "swift_kernels._C: lse must be float32, got ",
                   lse_in.scalar_type());
  TORCH_CHECK_VALUE(lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == H && lse_in.size(2) == L,
                    "swift_kernels._C: lse must be [batch, heads, tokens] = [", B, ", ", H, ", ", L, "], got ",
                    lse_in.sizes());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = aligned(q_in), k = aligned(k_in), v = aligned(v_in), o = aligned(out_in),
                   dout = aligned(dout_in);
  const at::Tensor lse = lse_in.contiguous();
  sa::BwdArgs args{};
  args.pb = make_problem(q, mask, block_tokens, scale);
  args.by_query = make_csr(q_indptr, q_num_full, q_indices, ceil_div(L, sa::kFwdTileQ), q, "q");
  args.by_key = make_csr(k_indptr, k_num_full, k_indices, ceil_div(L, sa::kBwdTileK), q, "k");
  at::Tensor delta = at::empty({B, H, L}, q.options().dtype(at::kFloat));
  const auto contig = q.options().memory_format(at::MemoryFormat::Contiguous);
  at::Tensor dq = at::empty(q.sizes(), contig);
  at::Tensor dk = at::empty(q.sizes(), contig);
  at::Tensor dv = at::empty(q.sizes(), contig);
  args.dout = dout.data_ptr();
  args.q = q.data_ptr();
  args.k = k.data_ptr();
  args.v = v.data_ptr();
  args.out = o.data_ptr();
  args.sdo = strides_of(dout);
  args.sq = strides_of(q);
  args.sk = strides_of(k);
  args.sv = strides_of(v);
  args.so = strides_of(o);
  args.lse = lse.data_ptr<float>();
  args.delta = delta.data_ptr<float>();
  args.dq = dq.data_ptr();
  args.dk = dk.data_ptr();
  args.dv = dv.data_ptr();
  guarded([&] { sa::fba_backward(args, c10::cuda::getCurrentCUDAStream().stream()); });
  return {dq, dk, dv};
}
#endif

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "swift_kernels CUDA extension: frame-block-sparse attention (mma.sync, sm_80+; opt-in TMA + wgmma forward, "
      "sm_90a)";
  m.def(
      "tile_sizes",
      [](int64_t head_dim) {
        check_head_dim(head_dim);
        return std::make_tuple(sa::kFwdTileQ, sa::kFwdTileK);
      },
      "(tile_q, tile_k) of the forward / dQ schedule for a head_dim", pybind11::arg("head_dim"));
  m.def(
      "bwd_tile_sizes",
      [](int64_t head_dim) {
        check_head_dim(head_dim);
        return std::make_tuple(sa::kBwdTileQ, sa::kBwdTileK);
      },
      "(tile_q, tile_k) of the schedule whose by_key CSR drives the dK/dV kernel", pybind11::arg("head_dim"));
  m.def("fwd", &fwd, "frame-block-sparse attention forward -> (out, lse)", pybind11::arg("q"), pybind11::arg("k"),
        pybind11::arg("v"), pybind11::arg("mask_i8"), pybind11::arg("block_tokens"), pybind11::arg("scale"),
        pybind11::arg("q_indptr"), pybind11::arg("q_num_full"), pybind11::arg("q_indices"));
  m.def(
      "sm90_tile_sizes",
      [](int64_t head_dim) {
        check_head_dim(head_dim);
        return std::make_tuple(sa::kSm90TileQ, sa::kSm90TileK);
      },
      "(tile_q, tile_k) of the schedule of fwd_sm90 for a head_dim", pybind11::arg("head_dim"));
  m.def("fwd_sm90", &fwd_sm90,
        "frame-block-sparse attention forward on Hopper (sm_90a: TMA + wgmma) -> (out, lse); opt-in, unverified",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("mask_i8"),
        pybind11::arg("block_tokens"), pybind11::arg("scale"), pybind11::arg("q_indptr"), pybind11::arg("q_num_full"),
        pybind11::arg("q_indices"));
  // True when the sm_90a kernel was compiled (SWIFT_KERNELS_CUDA_ARCHS includes 90a); fwd_sm90 exists either
  // way and raises when it is False.
  m.attr("HAS_SM90") = sa::fba_sm90_compiled();
#ifndef SWIFT_KERNELS_NO_BACKWARD
  m.def("bwd", &bwd, "frame-block-sparse attention backward -> (dq, dk, dv)", pybind11::arg("dout"),
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"), pybind11::arg("lse"),
        pybind11::arg("mask_i8"), pybind11::arg("block_tokens"), pybind11::arg("scale"), pybind11::arg("q_indptr"),
        pybind11::arg("q_num_full"), pybind11::arg("q_indices"), pybind11::arg("k_indptr"),
        pybind11::arg("k_num_full"), pybind11::arg("k_indices"));
  m.attr("HAS_BACKWARD") = true;
#else
  m.attr("HAS_BACKWARD") = false;
#endif
  m.attr("SUPPORTED_HEAD_DIMS") = pybind11::make_tuple(64, 128);
}
