// pybind11 bindings of the extension swift_kernels._C: the only translation unit that includes torch.
//
// Exposed (all tensors on one CUDA device):
//   fwd(q, k, v, mask_i8, block_tokens, scale, kv_num, kv_idx, full_kv_num, full_kv_idx) -> (out, lse)
//       q, k, v: [B, L, H, D] fp16/bf16, stride(-1) == 1, L = n_blocks * block_tokens, D in {64, 128};
//       mask_i8: int8 [n_blocks, n_blocks] (nonzero = allowed); kv_*: the forward tables of an attention plan
//       (swift_kernels/attention/plan.py, FlexAttention's BlockMask layout over sparse blocks of kSparseBlock
//       tokens: int32 num [R], idx [R, R] with R = ceil(L / kSparseBlock)). Returns out [B, L, H, D] (q's dtype,
//       contiguous) and lse fp32 [B, H, L] (natural log; -inf and a zero output row for a query with no allowed
//       key).
//   fwd_sm90(...) -> (out, lse)
//       the Hopper (sm_90a: TMA + wgmma) forward, the same arguments and results as fwd. Raises RuntimeError when
//       the module was not compiled for sm_90a (HAS_SM90 is False) or the device is not compute capability 9.x.
//   bwd(dout, q, k, v, out, lse, mask_i8, block_tokens, scale, kv_num, kv_idx, full_kv_num, full_kv_idx,
//       q_num, q_idx, full_q_num, full_q_idx) -> (dq, dk, dv)
//       kv_*: as for fwd (the dQ kernel); q_*: the plan's transposed tables (the dK/dV kernel).
//   TILES: {name: value} of the tile sizes compiled in (fba_tiles.h, generated from
//       swift_kernels/attention/tiles.py); CUDA_ARCHS: the architectures compiled in ("sm_80", "sm_90a",
//       "compute_90" for PTX); HAS_SM90, HAS_BACKWARD, SUPPORTED_HEAD_DIMS.
// Bad arguments raise ValueError / TypeError naming the argument; CUDA errors raise RuntimeError naming
// the kernel. The tables' contents are trusted (they come from swift_kernels.attention.plan); their shapes,
// dtypes and devices are checked.
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

// One direction of a plan's tables, checked against the sequence: R = ceil(L / kSparseBlock) rows of R columns.
sa::BlockTable make_table(const at::Tensor& num, const at::Tensor& idx, const at::Tensor& full_num,
                          const at::Tensor& full_idx, int64_t tokens, const at::Tensor& q, const char* which) {
  const std::string w(which);
  const int64_t rows = ceil_div(tokens, sa::kSparseBlock);
  const auto check = [&](const at::Tensor& t, const std::string& name, int64_t dim) {
    TORCH_CHECK_VALUE(t.is_cuda() && t.device() == q.device(), "swift_kernels._C: ", name,
                      " must be on the device of q (", q.device(), "), got ", t.device());
    TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, "swift_kernels._C: ", name, " must be int32, got ",
                     t.scalar_type());
    TORCH_CHECK_VALUE(t.dim() == dim && t.is_contiguous() && t.size(0) == rows && (dim == 1 || t.size(1) == rows),
                      "swift_kernels._C: ", name, " must be a contiguous ", dim == 1 ? "[R]" : "[R, R]",
                      " table with R = ceil(tokens / ", sa::kSparseBlock, ") = ", rows, ", got ", t.sizes(),
                      " (was the plan built for these tokens?)");
  };
  check(num, w + "_num", 1);
  check(idx, w + "_idx", 2);
  check(full_num, "full_" + w + "_num", 1);
  check(full_idx, "full_" + w + "_idx", 2);
  return {num.data_ptr<int32_t>(), idx.data_ptr<int32_t>(), full_num.data_ptr<int32_t>(),
          full_idx.data_ptr<int32_t>(), static_cast<int>(rows), static_cast<int>(rows)};
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

// The forward of both kernels (sm90 selects the Hopper one).
std::tuple<at::Tensor, at::Tensor> fwd_impl(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                            const at::Tensor& mask, int64_t block_tokens, double scale,
                                            const at::Tensor& kv_num, const at::Tensor& kv_idx,
                                            const at::Tensor& full_kv_num, const at::Tensor& full_kv_idx, bool sm90) {
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
  args.by_query = make_table(kv_num, kv_idx, full_kv_num, full_kv_idx, L, q, "kv");
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
                                       const at::Tensor& kv_num, const at::Tensor& kv_idx,
                                       const at::Tensor& full_kv_num, const at::Tensor& full_kv_idx) {
  return fwd_impl(q, k, v, mask, block_tokens, scale, kv_num, kv_idx, full_kv_num, full_kv_idx, false);
}

std::tuple<at::Tensor, at::Tensor> fwd_sm90(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& mask, int64_t block_tokens, double scale,
                                            const at::Tensor& kv_num, const at::Tensor& kv_idx,
                                            const at::Tensor& full_kv_num, const at::Tensor& full_kv_idx) {
  return fwd_impl(q, k, v, mask, block_tokens, scale, kv_num, kv_idx, full_kv_num, full_kv_idx, true);
}

#ifndef SWIFT_KERNELS_NO_BACKWARD
std::tuple<at::Tensor, at::Tensor, at::Tensor> bwd(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse_in, const at::Tensor& mask, int64_t block_tokens, double scale,
    const at::Tensor& kv_num, const at::Tensor& kv_idx, const at::Tensor& full_kv_num, const at::Tensor& full_kv_idx,
    const at::Tensor& q_num, const at::Tensor& q_idx, const at::Tensor& full_q_num, const at::Tensor& full_q_idx) {
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
  args.by_query = make_table(kv_num, kv_idx, full_kv_num, full_kv_idx, L, q, "kv");
  args.by_key = make_table(q_num, q_idx, full_q_num, full_q_idx, L, q, "q");
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

// SWIFT_KERNELS_CUDA_ARCHS is set by setup.py to the architectures compiled in, comma separated.
#define SWIFT_STR2(...) #__VA_ARGS__
#define SWIFT_STR(...) SWIFT_STR2(__VA_ARGS__)
#ifdef SWIFT_KERNELS_CUDA_ARCHS
constexpr const char* kCudaArchs = SWIFT_STR(SWIFT_KERNELS_CUDA_ARCHS);
#else
constexpr const char* kCudaArchs = "";
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "swift_kernels CUDA extension: frame-block-sparse attention (mma.sync, sm_80+; TMA + wgmma forward, sm_90a)";
  const pybind11::arg a0("kv_num"), a1("kv_idx"), a2("full_kv_num"), a3("full_kv_idx");
  m.def("fwd", &fwd, "frame-block-sparse attention forward -> (out, lse)", pybind11::arg("q"), pybind11::arg("k"),
        pybind11::arg("v"), pybind11::arg("mask_i8"), pybind11::arg("block_tokens"), pybind11::arg("scale"), a0, a1,
        a2, a3);
  m.def("fwd_sm90", &fwd_sm90, "frame-block-sparse attention forward on Hopper (sm_90a: TMA + wgmma) -> (out, lse)",
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("mask_i8"),
        pybind11::arg("block_tokens"), pybind11::arg("scale"), a0, a1, a2, a3);
  // True when the sm_90a kernel was compiled (SWIFT_KERNELS_CUDA_ARCHS includes 90a); fwd_sm90 exists either way
  // and raises when it is False.
  m.attr("HAS_SM90") = sa::fba_sm90_compiled();
#ifndef SWIFT_KERNELS_NO_BACKWARD
  m.def("bwd", &bwd, "frame-block-sparse attention backward -> (dq, dk, dv)", pybind11::arg("dout"),
        pybind11::arg("q"), pybind11::arg("k"), pybind11::arg("v"), pybind11::arg("out"), pybind11::arg("lse"),
        pybind11::arg("mask_i8"), pybind11::arg("block_tokens"), pybind11::arg("scale"), a0, a1, a2, a3,
        pybind11::arg("q_num"), pybind11::arg("q_idx"), pybind11::arg("full_q_num"), pybind11::arg("full_q_idx"));
  m.attr("HAS_BACKWARD") = true;
#else
  m.attr("HAS_BACKWARD") = false;
#endif
  m.attr("SUPPORTED_HEAD_DIMS") = pybind11::make_tuple(64, 128);
  pybind11::dict tiles;
  tiles["kSparseBlock"] = sa::kSparseBlock;
  tiles["kThreads"] = sa::kThreads;
  tiles["kFwdTileQ"] = sa::kFwdTileQ;
  tiles["kFwdTileK"] = sa::kFwdTileK;
  tiles["kBwdTileQ"] = sa::kBwdTileQ;
  tiles["kBwdTileK"] = sa::kBwdTileK;
  tiles["kSm90TileQ"] = sa::kSm90TileQ;
  tiles["kSm90TileK"] = sa::kSm90TileK;
  m.attr("TILES") = tiles;
  pybind11::list archs;
  std::string all(kCudaArchs), one;
  for (char ch : all + ",") {
    if (ch == ',' || ch == ' ') {
      if (!one.empty()) archs.append(one);
      one.clear();
    } else {
      one += ch;
    }
  }
  m.attr("CUDA_ARCHS") = pybind11::tuple(archs);
}
