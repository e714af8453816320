// Heuristics of the FP8 GEMMs (gemm_heuristics.h): candidate tiles per layout, the cost model, the
// variant rules. Host code only; the kernels are in fp8_gemm_kernel.cuh, their instantiations in
// fp8_gemm.cu (dense) and fp8_grouped_gemm.cu (grouped), which compile every config chosen here.
#include "gemm_heuristics.h"

#include <algorithm>
#include <limits>

namespace dskernels {
namespace {

constexpr int kBlockK = 128;

struct TileShape {
  int block_m, block_n;
};

struct Candidates {
  GemmLayout layout;
  ScaleGranularity gran;
  TileShape tiles[8];
  int count;
};

// The tile shapes the cost model chooses among (register epilogue, cluster 1).
// Dense 1D2D: narrow 64-row tiles spread small-M problems over all SMs; 128 x 128 is the large-M
// workhorse; 128 x 144 fits N = 576 (4 x 144) into one wave at M = 4096. (128 x 112 and 128 x 160 were
// measured slower than 128 x 128 on every DeepSeek-V3 shape: BN > 128 cannot hold two partial fragments,
// and a straddling b_scale costs selects.) Dense 1D1D (weight gradients, M and N both large): two.
// Grouped (the experts' GEMMs, N = 2 x intermediate or hidden, multiples of 128 in every MoE model we
// know): 64-row tiles for decode-sized groups, 128-row ones for prefill and training; the weight
// gradient the dense 1D1D pair.
constexpr Candidates kCandidates[] = {
    {GemmLayout::kDense, ScaleGranularity::k1D2D, {{64, 16}, {64, 32}, {64, 64}, {64, 128}, {128, 64}, {128, 128},
                                                   {128, 144}}, 7},
    {GemmLayout::kDense, ScaleGranularity::k1D1D, {{64, 128}, {128, 128}}, 2},
    {GemmLayout::kContiguous, ScaleGranularity::k1D2D, {{64, 64}, {64, 128}, {128, 64}, {128, 128}}, 4},
    {GemmLayout::kMasked, ScaleGranularity::k1D2D, {{64, 64}, {64, 128}, {128, 64}, {128, 128}}, 4},
    {GemmLayout::kKGrouped, ScaleGranularity::k1D1D, {{64, 128}, {128, 128}}, 2},
};

// ------------------------------------------------------------------------------------------------
// Variant rules: the single place that turns the large-M variants on. gemm_pick_config first picks the
// tile shape among the candidates (cost model below), then applies the first row whose conditions hold.
// Measured on an H100 (`fp8_gemm_selftest sweep`, 2026-11-23, all 21 DeepSeek-V3 shapes): on every
// shape where the cost model picks a 128-row tile, the TMA-store epilogue of the same tile is faster,
// by 1.08x (4096x4096x7168) to 2.2x (4096x32768x512: the shorter K, the larger the share of a tile's
// time its epilogue takes when the tensor cores wait for it); kOverlap alone gains up to 1.06x. The 2-CTA
// multicast variants measured 0.93-0.98x of cluster_m = 1 after their fence fix (NOTES.md): no rule.
// 1D1D (the weight gradient) takes the same TMA-store rule: measured on an H200 (`fp8_gemm_selftest
// sweep-wgrad`, 2026-12-01, NOTES.md), it is the best or within 4 % of it on every weight-gradient shape of
// the FP8Linear benchmark where the cost model picks 128 x 128. The grouped forward GEMMs take it for the
// same reason (their tiles are the dense kernel's; a partial tile's rows go out as register stores).
// The k-grouped gradient's fp32 tiles go out the same way, as TMA stores or (accumulating) TMA reduce-adds
// of fp32 staged in shared memory: from registers, with the tensor cores waiting, the epilogue of a short
// segment took as long as its mainloop (H200, 2026-12-02: 380 TFLOPS at 16 groups of ~2064 tokens).
// (kTmaStore falls back to kOverlap's register stores by itself for fp32 / odd N / unaligned out.)
// ------------------------------------------------------------------------------------------------
struct VariantRule {
  GemmLayout layout;
  ScaleGranularity gran;
  int block_m, block_n;  // applies when the cost model picked this tile shape
  Fp8GemmEpilogue epilogue;
  int cluster_m;
};

constexpr VariantRule kVariantRules[] = {
    {GemmLayout::kDense, ScaleGranularity::k1D2D, 128, 128, Fp8GemmEpilogue::kTmaStore, 1},
    {GemmLayout::kDense, ScaleGranularity::k1D2D, 128, 144, Fp8GemmEpilogue::kTmaStore, 1},
    {GemmLayout::kDense, ScaleGranularity::k1D1D, 128, 128, Fp8GemmEpilogue::kTmaStore, 1},
    {GemmLayout::kContiguous, ScaleGranularity::k1D2D, 128, 64, Fp8GemmEpilogue::kTmaStore, 1},
    {GemmLayout::kContiguous, ScaleGranularity::k1D2D, 128, 128, Fp8GemmEpilogue::kTmaStore, 1},
    {GemmLayout::kMasked, ScaleGranularity::k1D2D, 128, 64, Fp8GemmEpilogue::kTmaStore, 1},
    {GemmLayout::kMasked, ScaleGranularity::k1D2D, 128, 128, Fp8GemmEpilogue::kTmaStore, 1},
    {GemmLayout::kKGrouped, ScaleGranularity::k1D1D, 128, 128, Fp8GemmEpilogue::kTmaStore, 1},
};

// Estimated cycles of one tile per K block on one SM: the slower of the tensor cores and the loads
// (about 64 bytes per cycle per SM from L2). The tensor cores give about 4096 FP8 MACs per cycle per SM
// to two pipelined math warpgroups (BM = 128, BN <= 128); a single warpgroup or a tile too wide for two
// partial fragments idles them during promotion (measured about 0.75 of that on an H100).
double tile_cycles_per_k_block(int block_m, int block_n) {
  const double macs_per_cycle = (block_m == 128 && block_n <= 128) ? 4096.0 : 3072.0;
  const double mma = double(block_m) * block_n * kBlockK / macs_per_cycle;
  const double load = double(block_m + block_n) * kBlockK / 64.0;
  return std::max(mma, load);
}

const Candidates* find_candidates(GemmLayout layout, ScaleGranularity gran) {
  for (const Candidates& c : kCandidates)
    if (c.layout == layout && c.gran == gran) return &c;
  return nullptr;
}

// Tiles of the problem with this tile shape: every tile walks the group's whole K, so K scales all
// candidates alike. Contiguous: the M_total rows (padding tiles are few); masked: the expected rows of
// each group; k-grouped: every group's [M, N] output.
long long tile_count(const GemmShape& s, int block_m, int block_n) {
  const long long per_group = static_cast<long long>((std::max(s.rows, 1) + block_m - 1) / block_m) *
                              ((s.N + block_n - 1) / block_n);
  const bool per_group_tiles = s.layout == GemmLayout::kMasked || s.layout == GemmLayout::kKGrouped;
  return per_group * (per_group_tiles ? std::max(s.groups, 1) : 1);
}

}  // namespace

int gemm_candidate_tiles(GemmLayout layout, ScaleGranularity gran, Fp8GemmConfig* tiles, int capacity) {
  const Candidates* c = find_candidates(layout, gran);
  if (c == nullptr) return 0;
  for (int i = 0; i < c->count && i < capacity && tiles != nullptr; ++i)
    tiles[i] = Fp8GemmConfig{c->tiles[i].block_m, c->tiles[i].block_n};
  return c->count;
}

Fp8GemmConfig gemm_pick_config(const GemmShape& s, int num_sms) {
  const Candidates* c = find_candidates(s.layout, s.gran);
  if (c == nullptr) return Fp8GemmConfig{0, 0};
  Fp8GemmConfig best{0, 0};
  double best_cost = 0.0;
  for (int i = 0; i < c->count; ++i) {
    const TileShape& e = c->tiles[i];
    const long long waves = (tile_count(s, e.block_m, e.block_n) + num_sms - 1) / std::max(1, num_sms);
    const double cost = double(waves) * tile_cycles_per_k_block(e.block_m, e.block_n);
    // Ties go to the larger tile (fewer bytes per FLOP).
    if (best.block_m == 0 || cost < best_cost * 0.999 ||
        (cost <= best_cost * 1.001 && e.block_m * e.block_n > best.block_m * best.block_n)) {
      best = {e.block_m, e.block_n};
      best_cost = cost;
    }
  }
  for (const VariantRule& r : kVariantRules)
    if (r.layout == s.layout && r.gran == s.gran && r.block_m == best.block_m && r.block_n == best.block_n)
      return Fp8GemmConfig{best.block_m, best.block_n, r.epilogue, r.cluster_m};
  return best;
}

Fp8GemmConfig fp8_gemm_pick_config(int M, int N, int K, ScaleGranularity b_gran, int num_sms) {
  return gemm_pick_config(GemmShape{GemmLayout::kDense, b_gran, M, N, K, 1}, num_sms);
}

}  // namespace dskernels
