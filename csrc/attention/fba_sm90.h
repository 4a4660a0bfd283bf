// Host-side interface of the Hopper (sm_90a) forward kernel, fba_fwd_sm90.cu. Like fba_launch.h it
// includes no torch header; bindings.cpp is the only torch-facing translation unit.
//
// Used by the Python backend on a compute capability 9.0 device only where verified on a GPU, or when asked for
// with SWIFT_KERNELS_HOPPER=1 (see swift_kernels/attention/cuda_backend.py).
#pragma once

#include <cuda_runtime.h>

#include "fba_launch.h"

namespace swift_kernels {
namespace attention {

// Tiles of the sm_90a forward (kSm90TileQ, kSm90TileK in fba_tiles.h): one CTA owns kSm90TileQ query tokens
// (two consumer warpgroups of 64 rows, one sparse block) and walks key tiles of kSm90TileK tokens.

// True when the extension was compiled with the sm_90a target (SWIFT_KERNELS_CUDA_ARCHS contains 90a):
// only then does the kernel below have a body.
bool fba_sm90_compiled();

// The forward with the semantics of fba_forward (same FwdArgs; q, k, v rows 16-byte aligned, strides of
// dimensions longer than 1 positive multiples of 8 elements). Throws std::runtime_error when the kernel
// was not compiled for sm_90a, when the current device is not compute capability 9.x, or when a CUDA or
// driver call fails (the message names the kernel).
void fba_forward_sm90(const FwdArgs& args, cudaStream_t stream);

}  // namespace attention
}  // namespace swift_kernels
