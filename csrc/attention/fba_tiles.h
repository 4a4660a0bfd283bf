// GENERATED from swift_kernels/attention/tiles.py (its cuda_header()): do not edit.
// Tile sizes of the CUDA attention kernels; tests/test_plan.py checks that this file equals the generated text.
#pragma once

namespace swift_kernels {
namespace attention {

constexpr int kSparseBlock = 128;
constexpr int kThreads = 256;
constexpr int kFwdTileQ = 128;
constexpr int kFwdTileK = 64;
constexpr int kBwdTileQ = 64;
constexpr int kBwdTileK = 128;
constexpr int kSm90TileQ = 128;
constexpr int kSm90TileK = 128;

// Every CTA owns one sparse block of rows, and its partner tiles divide a sparse block.
static_assert(kFwdTileQ == kSparseBlock && kBwdTileK == kSparseBlock && kSm90TileQ == kSparseBlock,
              "a CTA owns one sparse block");
static_assert(kSparseBlock % kFwdTileK == 0 && kSparseBlock % kBwdTileQ == 0 && kSparseBlock % kSm90TileK == 0,
              "partner tiles divide a sparse block");

}  // namespace attention
}  // namespace swift_kernels
