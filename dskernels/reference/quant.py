"""FP8 (E4M3) quantization, the specification.

Every scale covers one tile: 1 x 128 along the reduction dim for activations ("per token group"),
128 x 128 for weights ("per block"). For a tile with amax = max |x| (NaN ignored, floored at
AMAX_FLOOR so an all-zero tile gets a finite scale):

    scale = amax / 448                    (pow2_scale: rounded up to a power of two)
    q     = e4m3(clamp(x * (1 / scale), -448, 448))      round-to-nearest-even

All arithmetic is single IEEE fp32 operations, so every backend produces the same bytes.
Non-finite input: a NaN element quantizes to NaN and leaves the rest of its tile alone; an Inf
element makes its tile's scale Inf, so the whole tile dequantizes to NaN. Nothing is silently
made finite.
"""
import torch

FP8_MAX = 448.0
BLOCK = 128
AMAX_FLOOR = 1e-12


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def scale_from_amax(amax: torch.Tensor, pow2_scale: bool) -> torch.Tensor:
    # Divisions are tensor by tensor: torch's CUDA division by a Python scalar multiplies by the
    # rounded reciprocal instead, one ulp off the correctly rounded quotient the spec asks for.
    amax = amax.float().clamp(min=AMAX_FLOOR)
    scale = amax / torch.full_like(amax, FP8_MAX)
    if pow2_scale:
        # frexp: scale = m * 2**e with m in [0.5, 1); the next power of two up is 2**e unless m == 0.5.
        m, e = torch.frexp(scale)
        exact = (m == 0.5) | ~torch.isfinite(scale)
        scale = torch.where(exact, scale, torch.ldexp(torch.ones_like(scale), e))
    return scale


def to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x and scale broadcast against each other; returns float8_e4m3fn."""
    y = x.float() * (torch.ones_like(scale) / scale)
    return torch.where(torch.isnan(y), y, y.clamp(-FP8_MAX, FP8_MAX)).to(torch.float8_e4m3fn)


def _tile_amax(x: torch.Tensor, dim: int) -> torch.Tensor:
    a = x.float().abs()
    return torch.where(torch.isnan(a), torch.zeros_like(a), a).amax(dim=dim)


def _pad_to_blocks(x: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    M, K = x.shape
    return torch.nn.functional.pad(x.float(), (0, cdiv(K, cols) * cols - K, 0, cdiv(M, rows) * rows - M))


def per_token_group_quant(x: torch.Tensor, pow2_scale: bool = False):
    """x [M, K] -> (q [M, K] e4m3, scale [M, ceil(K/128)] fp32); one scale per 1 x 128 tile."""
    M, K = x.shape
    tiles = _pad_to_blocks(x, 1, BLOCK).view(M, -1, BLOCK)          # [M, Kb, 128]
    scale = scale_from_amax(_tile_amax(tiles, 2), pow2_scale)      # [M, Kb]
    q = to_e4m3(tiles, scale[:, :, None]).view(M, -1)[:, :K]        # [M, K]
    return q.contiguous(), scale


def per_token_group_quant_transposed(x: torch.Tensor, pow2_scale: bool = False):
    """x [M, K] -> (q_t [K, M] e4m3, scale [K, ceil(M/128)] fp32): x.T quantized per 1 x 128 tile,
    i.e. tiles of 128 x 1 along M of x, for GEMMs that reduce over tokens (weight gradients)."""
    return per_token_group_quant(x.t(), pow2_scale)


def per_block_quant(w: torch.Tensor, pow2_scale: bool = False):
    """w [N, K] -> (q [N, K] e4m3, scale [ceil(N/128), ceil(K/128)] fp32); one scale per 128 x 128."""
    N, K = w.shape
    blocks = _pad_to_blocks(w, BLOCK, BLOCK)
    blocks = blocks.view(blocks.shape[0] // BLOCK, BLOCK, -1, BLOCK)  # [Nb, 128, Kb, 128]
    scale = scale_from_amax(_tile_amax(blocks, 3).amax(dim=1), pow2_scale)  # [Nb, Kb]
    q = to_e4m3(blocks, scale[:, None, :, None]).view(blocks.shape[0] * BLOCK, -1)[:N, :K]
    return q.contiguous(), scale


def dequant(q: torch.Tensor, scale: torch.Tensor, block_rows: int, out_dtype: torch.dtype):
    """q [R, C] e4m3 with scale [ceil(R/block_rows), ceil(C/128)] -> q * scale as out_dtype [R, C]."""
    R, C = q.shape
    s = scale.float().repeat_interleave(block_rows, 0)[:R].repeat_interleave(BLOCK, 1)[:, :C]  # [R, C]
    return (q.float() * s).to(out_dtype)
